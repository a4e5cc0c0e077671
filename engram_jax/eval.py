"""Validation loss and perplexity of a checkpoint.

    python -m engram_jax.eval --gin_file=configs/models/engram_moe_tiny.gin --gin_file=configs/runs/eval.gin \
        --gin.CHECKPOINT_PATH="'/tmp/quickstart'"

CHECKPOINT_PATH is a MODEL_DIR (its latest checkpoint), its checkpoints/ directory, or checkpoints/<step>.
Only the parameters and non-trainable variables are read (not the optimizer state), onto the configured mesh.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax

from engram_jax import checkpoint as ckpt_lib
from engram_jax import cli, sharding
from engram_jax.data.feed import check_batch_size, open_data, to_global
from engram_jax.run_config import RunConfig
from engram_jax.steps import make_setup, validation_loss
from engram_jax.models.config import ModelConfig


def resolve_checkpoint(path: str | os.PathLike) -> tuple[Path, int]:
  """(checkpoints directory, step) for a model dir, a checkpoints dir or a step dir; a clear error otherwise."""
  path = Path(path).absolute()
  candidates = [(path / "checkpoints", None), (path, None)]
  if path.name.isdigit():
    candidates.insert(0, (path.parent, int(path.name)))
  for directory, step in candidates:
    if (directory / ckpt_lib.CONFIG_FILE).is_file():
      steps = ckpt_lib.Checkpointer(directory).all_steps()
      if step is None and steps:
        step = max(steps)
      if step is not None and step in steps:
        return directory, step
      raise ValueError(f"CHECKPOINT_PATH={str(path)!r}: no finished checkpoint{'' if step is None else f' {step}'} "
                       f"in {directory} (steps there: {steps}); train first or pick one of those steps")
  raise ValueError(f"CHECKPOINT_PATH={str(path)!r} holds no checkpoints ({ckpt_lib.CONFIG_FILE} not found there or "
                   "in its checkpoints/ subdirectory); pass the MODEL_DIR of a training run")


def evaluate(model_config: ModelConfig, run: RunConfig, checkpoint_path: str | os.PathLike,
             output_dir: str | os.PathLike | None = None) -> dict[str, Any]:
  """Mean validation NLL (nats/token) and perplexity over `run.eval_batches` batches of `run.task`."""
  t0 = time.time()
  if run.compute_dtype:
    model_config = dataclasses.replace(model_config, compute_dtype=run.compute_dtype)
  # --- checks before anything compiles: checkpoint exists and belongs to this model config, batch fits the mesh
  directory, step = resolve_checkpoint(checkpoint_path)
  checkpointer = ckpt_lib.Checkpointer(directory)
  checkpointer.check_model_config(model_config)
  mesh = sharding.make_mesh(run.mesh)
  check_batch_size(run.batch_size, mesh, run.mesh)

  # --- data, model, restore (parameters and non-trainable variables only)
  _, val_batches = open_data(run, model_config.vocab_size)
  val_batches = [to_global(b, mesh) for b in val_batches]
  setup = make_setup(model_config, run.optimizer, run.steps, mesh)
  target = {k: setup.abstract[k] for k in ("params", "rest", "step")}
  restored = checkpointer.restore_subset(step, target)
  checkpointer.close()

  # --- evaluate
  loss = validation_loss(setup.eval_step, restored, val_batches)
  tokens = int(sum(int(jax.device_get(b["segment_ids"] > 0).sum()) for b in val_batches))
  result = {"checkpoint": str(directory / str(step)), "step": int(jax.device_get(restored["step"])),
            "val_loss": loss, "val_perplexity": math.exp(min(loss, 50.0)), "val_tokens": tokens,
            "val_batches": len(val_batches), "task": run.task, "wall_time_s": time.time() - t0}
  out = Path(output_dir) if output_dir else directory.parent
  if jax.process_index() == 0:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"eval_step{step}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['checkpoint']}: validation loss {loss:.4f} nats/token, perplexity "
          f"{result['val_perplexity']:.2f} over {tokens:,} tokens", flush=True)
  return result


def main(argv: Sequence[str] | None = None) -> dict:
  gin_files, bindings, args = cli.parse_flags(sys.argv[1:] if argv is None else argv, __doc__.split("\n")[0])
  from engram_jax import configurables  # registers the library's classes with gin
  if args.distributed:
    cli.initialize_distributed()
  model_config, run, checkpoint_path, output_dir = configurables.resolve("evaluate", gin_files, bindings,
                                                                         args.gin_search_path)
  return evaluate(model_config, run, checkpoint_path, output_dir)


if __name__ == "__main__":  # run the importable module's main, so gin and the caches see a single copy
  from engram_jax import eval as _entry
  _entry.main()
