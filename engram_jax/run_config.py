"""RunConfig: everything about a training run that is not the model (data, length, optimizer, cadence, mesh)."""

from __future__ import annotations

import dataclasses

from engram_jax import optim


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Everything about a run that is not the model: data, length, optimizer, cadence, mesh."""

  steps: int = 1000  # Total optimizer steps; the learning-rate schedule spans exactly these.
  batch_size: int = 16  # Global batch B (rows of S tokens); must divide over the mesh's data x expert devices.
  seq_len: int = 256
  optimizer: optim.OptimizerConfig = optim.OptimizerConfig()
  eval_every: int = 100  # Validation loss every this many steps (and at the end).
  eval_batches: int = 8  # Validation batches per evaluation (the same batches every time).
  checkpoint_every: int = 500  # Also saved at the last step.
  keep_checkpoints: int = 3
  log_every: int = 10
  mesh: str = "data=-1"  # sharding.make_mesh spec over ('data', 'expert', 'model').
  seed: int = 0  # Model init, data order.
  compute_dtype: str | None = None  # 'bfloat16' / 'float32' overrides ModelConfig.compute_dtype; None keeps it.
  task: str = "engram_corpus_en"  # Data task (MIXTURE_OR_TASK_NAME).
  data_dir: str | None = None  # Corpus directory; None: $ENGRAM_DATA_DIR or ~/.cache/engram_jax/corpus.
  stop_after: int | None = None  # Stop (and checkpoint) at this step although the schedule spans `steps`.
  # Engram tokenizer compression (paper section 2.2) when ModelConfig.engram_compression_path is unset:
  # 'vocab' merges the task vocabulary's pieces that normalise alike and saves the map to
  # MODEL_DIR/engram_compression.npy; 'none' hashes raw ids (identity map).
  engram_compression: str = "vocab"
  # In-loop benchmark evaluation (the evals package, evals/inloop.py): these tasks (e.g. ('arc_easy', 'hellaswag',
  # 'lambada')) every inloop_every steps and at the end; bits per byte and the primary accuracy go to
  # metrics.jsonl and TensorBoard as eval/<task>/<metric>. () = off.
  inloop_tasks: tuple[str, ...] = ()
  inloop_every: int = 500
  inloop_limit: int | None = 200  # Documents per task (the same seeded subset every time); None = all.

  def __post_init__(self):
    for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_batches", "checkpoint_every",
                 "keep_checkpoints", "log_every", "inloop_every"):
      if getattr(self, name) < 1:
        raise ValueError(f"RunConfig.{name}={getattr(self, name)} must be >= 1")
    if self.compute_dtype not in (None, "float32", "bfloat16"):
      raise ValueError(f"RunConfig.compute_dtype={self.compute_dtype!r}: use None, 'float32' or 'bfloat16'")
    if self.engram_compression not in ("vocab", "none"):
      raise ValueError(f"RunConfig.engram_compression={self.engram_compression!r}: use 'vocab' or 'none'")
    if self.stop_after is not None and not 0 < self.stop_after <= self.steps:
      raise ValueError(f"RunConfig.stop_after={self.stop_after} must be in [1, steps={self.steps}]")

