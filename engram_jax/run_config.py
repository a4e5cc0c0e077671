"""RunConfig: everything about a training run that is not the model (data, length, optimizer, cadence, mesh);
EvalConfig: what evaluation of a checkpoint reads (defaults: as in training)."""

from __future__ import annotations

import dataclasses

from engram_jax import optim
from engram_jax.config_checks import check_types


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
  # Engram tokenizer compression (paper section 2.2): 'vocab' merges the task vocabulary's pieces that normalise
  # alike (the map is saved in the run directory); 'none' hashes raw ids (identity map).
  engram_compression: str = "vocab"
  # A non-finite loss or gradient (engram_jax.guard): 'stop' ends the run with an error naming the step and the
  # parameter group, never saving the bad state; 'skip_step' keeps the previous state for that step and goes on.
  on_nonfinite: str = "stop"
  # In-loop benchmark evaluation (the evals package, evals/inloop.py): these tasks (e.g. ('arc_easy', 'hellaswag',
  # 'lambada')) every inloop_every steps and at the end; bits per byte and the primary accuracy go to
  # metrics.jsonl and TensorBoard as eval/<task>/<metric>. () = off.
  inloop_tasks: tuple[str, ...] = ()
  inloop_every: int = 500
  inloop_limit: int | None = 200  # Documents per task (the same seeded subset every time); None = all.
  # Cooldown branch (engram_jax.branch): a new MODEL_DIR starts from the checkpoint at init_step of the run in
  # init_from (parameters, optimizer state, data position) and trains to its own `steps`; init_from is only read.
  # Meant for OptimizerConfig.schedule='wsd', whose learning rate before the cooldown does not depend on `steps`.
  init_from: str | None = None
  init_step: int | None = None

  def __post_init__(self):
    check_types(self)
    if self.seed < 0:
      raise ValueError(f"RunConfig.seed={self.seed} must be >= 0 (it seeds jax.random and numpy)")
    for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_batches", "checkpoint_every",
                 "keep_checkpoints", "log_every", "inloop_every"):
      if getattr(self, name) < 1:
        raise ValueError(f"RunConfig.{name}={getattr(self, name)} must be >= 1")
    if self.compute_dtype not in (None, "float32", "bfloat16"):
      raise ValueError(f"RunConfig.compute_dtype={self.compute_dtype!r}: use None, 'float32' or 'bfloat16'")
    if self.engram_compression not in ("vocab", "none"):
      raise ValueError(f"RunConfig.engram_compression={self.engram_compression!r}: use 'vocab' or 'none'")
    if self.on_nonfinite not in ("stop", "skip_step"):
      raise ValueError(f"RunConfig.on_nonfinite={self.on_nonfinite!r}: use 'stop' or 'skip_step'")
    if (self.init_from is None) != (self.init_step is None):
      raise ValueError(f"RunConfig.init_from={self.init_from!r} and init_step={self.init_step!r}: set both (a cooldown "
                       "branch from that run's checkpoint at that step) or neither")
    if self.init_step is not None and not 0 < self.init_step < self.steps:
      raise ValueError(f"RunConfig.init_step={self.init_step} must be in [1, steps={self.steps}) (the branch trains "
                       "from init_step to steps)")
    if self.stop_after is not None and not 0 < self.stop_after <= self.steps:
      raise ValueError(f"RunConfig.stop_after={self.stop_after} must be in [1, steps={self.steps}]")

  def warnings(self) -> list[str]:
    """Settings that run but are probably not meant (printed before training starts)."""
    out = []
    if self.optimizer.warmup_steps >= self.steps:
      out.append(f"OptimizerConfig.warmup_steps={self.optimizer.warmup_steps} >= RunConfig.steps={self.steps} "
                 "(TRAIN_STEPS): the learning rate never reaches its peak nor decays")
    return out


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """What to evaluate on; None fields take the value training used (from the run record)."""

  task: str | None = None  # Data task (MIXTURE_OR_TASK_NAME).
  data_dir: str | None = None  # Corpus directory of the task.
  seq_len: int | None = None  # Tokens per row.
  batch_size: int | None = None  # Global rows per batch; must divide over the mesh's data x expert devices.
  eval_batches: int | None = None  # Validation batches (the split may hold fewer: then all of it is used).
  mesh: str = "data=-1"  # sharding.make_mesh spec of the devices to evaluate on.
  compute_dtype: str | None = None  # 'bfloat16' / 'float32' overrides the model's; None keeps it.

  def __post_init__(self):
    check_types(self)
    for name in ("seq_len", "batch_size", "eval_batches"):
      value = getattr(self, name)
      if value is not None and (not isinstance(value, int) or value < 1):
        raise ValueError(f"EvalConfig.{name}={value!r} must be an integer >= 1 (or None: as in training)")
    if self.compute_dtype not in (None, "float32", "bfloat16"):
      raise ValueError(f"EvalConfig.compute_dtype={self.compute_dtype!r}: use None, 'float32' or 'bfloat16'")
