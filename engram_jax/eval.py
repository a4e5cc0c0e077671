"""Validation loss and perplexity of a checkpoint; the run directory describes the model (no model gin file).

    python -m engram_jax.eval --gin.CHECKPOINT_PATH="'/tmp/engram_quickstart'"

CHECKPOINT_PATH is a MODEL_DIR (its latest checkpoint), its checkpoints/ directory, or checkpoints/<step>.
The model, its Engram compression map and hash specs come from the run's record (engram_jax.run_dir.load_model);
the task, corpus, sequence length, batch size and number of validation batches default to training's, so the loss
equals the one training logged at that step. Only parameters and non-trainable variables are read.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from engram_jax import cli, fileio, run_dir
from engram_jax.data.feed import check_batch_size, make_mesh, open_data, to_global
from engram_jax.run_config import EvalConfig, RunConfig
from engram_jax.steps import make_eval_step, validation_loss


def eval_run_config(record: run_dir.RunRecord, config: EvalConfig) -> RunConfig:
  """The RunConfig whose validation batches evaluation reads: training's, with `config`'s overrides."""
  trained = record.run_config
  pick = lambda name, default: getattr(config, name) if getattr(config, name) is not None else trained.get(name,
                                                                                                           default)
  task = pick("task", "engram_corpus_en")
  data_dir = config.data_dir if config.data_dir is not None else (record.data_dir if task == record.task else None)
  return RunConfig(task=task, data_dir=data_dir, seq_len=pick("seq_len", 256), batch_size=pick("batch_size", 16),
                   eval_batches=pick("eval_batches", 8), mesh=config.mesh, seed=trained.get("seed", 0))


def evaluate(checkpoint_path: str | os.PathLike, config: EvalConfig | None = None,
             output_dir: str | os.PathLike | None = None) -> dict[str, Any]:
  """Mean validation NLL (nats/token) and perplexity of a checkpoint; writes eval_step<N>.json."""
  t0 = time.time()
  config = config or EvalConfig()
  mesh = make_mesh(config.mesh)
  # --- the run's record first: a bad path or a corrupt step fails before any data is read
  model_dir, _, _ = run_dir.locate(checkpoint_path)
  record = run_dir.read_record(model_dir)
  if record is None:
    raise ValueError(f"CHECKPOINT_PATH={os.fspath(checkpoint_path)!r}: {model_dir} holds no run record; pass the "
                     "MODEL_DIR of a training run")
  run = eval_run_config(record, config)
  check_batch_size(run.batch_size, mesh, run.mesh)
  model, record = run_dir.load_model(checkpoint_path, mesh)

  # --- data, evaluation (the same jitted step and shardings as training's validation)
  with run_dir.x64_context(record.model_config):
    _, val_batches = open_data(run, record.model_config.vocab_size)
    val_batches = [to_global(b, mesh) for b in val_batches]
    if config.compute_dtype:
      model = _with_compute_dtype(model, config.compute_dtype, mesh)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    state = {"params": nnx.to_pure_dict(params), "rest": nnx.to_pure_dict(rest)}
    loss = validation_loss(jax.jit(make_eval_step(graphdef)), state, val_batches)
  tokens = int(sum(int(jax.device_get(b["segment_ids"] > 0).sum()) for b in val_batches))
  step = record.step
  result = {"checkpoint": str(fileio.as_path(model_dir) / "checkpoints" / str(step)), "step": step,
            "val_loss": loss, "val_perplexity": math.exp(min(loss, 50.0)), "val_tokens": tokens,
            "val_batches": len(val_batches), "task": run.task, "seq_len": run.seq_len, "batch_size": run.batch_size,
            **training_validation(model_dir, record, run, len(val_batches)), "wall_time_s": time.time() - t0}
  out = fileio.as_path(output_dir) if output_dir else fileio.as_path(model_dir)
  if jax.process_index() == 0:
    fileio.atomic_write(out / f"eval_step{step}.json", json.dumps(result, indent=2) + "\n")
    print(f"{result['checkpoint']}: validation loss {loss:.4f} nats/token, perplexity {result['val_perplexity']:.2f} "
          f"over {len(val_batches)} batches ({tokens:,} tokens) of {run.task!r}; {result['compared_to_training']}",
          flush=True)
  return result


def training_validation(model_dir, record: run_dir.RunRecord, run: RunConfig, batches: int) -> dict[str, Any]:
  """How this evaluation's validation set compares with the one training's losses (result.json) used."""
  trained = record.run_config
  try:  # the number training actually used (the split may hold fewer than eval_batches)
    trained_batches = json.loads((fileio.as_path(model_dir) / "result.json").read_text())["val_batches"]
  except (OSError, ValueError, KeyError):
    trained_batches = trained.get("eval_batches")
  theirs = {"val_batches": trained_batches, "batch_size": trained.get("batch_size"), "seq_len": trained.get("seq_len"),
            "task": record.task}
  ours = {"val_batches": batches, "batch_size": run.batch_size, "seq_len": run.seq_len, "task": run.task}
  same = theirs == ours and (run.data_dir is None or record.data_dir is None or
                             os.path.abspath(run.data_dir) == os.path.abspath(record.data_dir))
  if same:
    text = f"the same {batches} validation batches as training's logged losses"
  else:
    diff = ", ".join(f"{k} {theirs[k]!r} -> {ours[k]!r}" for k in ours if theirs[k] != ours[k]) or "data_dir"
    text = (f"other validation batches than training's logged losses ({diff}): the two losses differ by design; "
            "leave EvalConfig.eval_batches / batch_size / seq_len / task unset to reproduce training's")
  return {"training_val_batches": trained_batches, "same_validation_as_training": same,
          "compared_to_training": text}


def _with_compute_dtype(model, compute_dtype: str, mesh):
  """The same parameters in a model built with another compute dtype."""
  from engram_jax.models.decoder import Decoder
  config = dataclasses.replace(model.config, compute_dtype=compute_dtype)
  compression = next((np.asarray(b.engram.compression[...]) for b in model.blocks if b.engram is not None), None)
  abstract = nnx.eval_shape(lambda: Decoder(config, mesh, compression=compression, rngs=nnx.Rngs(0)))
  graphdef, _, _ = nnx.split(abstract, nnx.Param, ...)
  _, params, rest = nnx.split(model, nnx.Param, ...)
  return nnx.merge(graphdef, params, rest)


def main(argv: Sequence[str] | None = None) -> dict:
  """python -m engram_jax.eval (flags and --help: engram_jax.cli.EVAL)."""
  return cli.run(cli.EVAL, argv, evaluate)


if __name__ == "__main__":  # run the importable module's main, so gin and the caches see a single copy
  from engram_jax import eval as _entry
  _entry.main()
