"""Cooldown branches: a run that starts from another run's checkpoint and decays to its own length.

With a warmup-stable-decay schedule (OptimizerConfig.schedule='wsd') the learning rate before the cooldown does not
depend on the run's length, so one long run saved every k steps yields runs of several token budgets: each branch
(RunConfig.init_from=SOURCE_DIR, init_step=k, steps=T) restores the source's state at step k — parameters,
optimizer state, step, RNG key and data position — into its own MODEL_DIR and trains steps k..T with its own
cooldown. The source directory is only read (a read-only orbax manager; nothing is created there). A rerun of the
branch resumes from the branch's own checkpoints and no longer reads the source.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orbax.checkpoint as ocp

from engram_jax import checkpoint as ckpt_lib
from engram_jax import ckpt_integrity, fileio, optim, run_dir


def check_source(run, model_config, model_dir) -> Any:
  """Checks a branch's source before anything is written: another directory, a recorded run of the same model,
  a finished checkpoint at init_step, and the same learning rate as the branch on every step before init_step.
  Returns the source's RunRecord."""
  source = fileio.as_path(run.init_from)
  if str(source.resolve()) == str(fileio.as_path(model_dir).resolve()):
    raise ValueError(f"RunConfig.init_from={run.init_from!r} is MODEL_DIR itself; a branch writes to a new MODEL_DIR")
  record = run_dir.read_record(source)
  if record is None:
    raise ValueError(f"RunConfig.init_from={run.init_from!r} holds no training run (no {run_dir.RECORD_FILE}); "
                     "point it at a MODEL_DIR written by engram_jax.train")
  diff = ckpt_lib.config_differences(ckpt_lib.config_to_dict(record.model_config),
                                     ckpt_lib.config_to_dict(model_config))
  if diff:
    raise ValueError(f"RunConfig.init_from={run.init_from!r} trained another model:\n  " + "\n  ".join(diff) +
                     "\nFix: branch with the source's model config (its run_record.json / config.gin)")
  steps = ckpt_lib.finished_steps(source / "checkpoints")
  if run.init_step not in steps:
    raise ValueError(f"RunConfig.init_step={run.init_step}: {run.init_from}/checkpoints holds steps {steps}; pick "
                     "one of them (the source's checkpoint_every / keep_checkpoints decide which exist)")
  src_opt = record.run_config.get("optimizer")
  if src_opt is not None:
    check_same_lr(optim.OptimizerConfig(**{k: v for k, v in src_opt.items()}), int(record.run_config["steps"]),
                  run.optimizer, run.steps, run.init_step)
  return record


def check_same_lr(source: optim.OptimizerConfig, source_steps: int, branch: optim.OptimizerConfig,
                  branch_steps: int, init_step: int) -> None:
  """The branch must have followed the source's learning rate on steps 0..init_step-1 (and use the same table
  multiplier), else its state at init_step is not what its own schedule would have produced."""
  t = np.arange(init_step)
  a = np.asarray(optim.learning_rate_schedule(source, source_steps)(t))
  b = np.asarray(optim.learning_rate_schedule(branch, branch_steps)(t))
  bad = np.flatnonzero(~np.isclose(a, b, rtol=1e-6, atol=0.0))
  if bad.size or source.table_lr_multiplier != branch.table_lr_multiplier:
    where = f"step {int(bad[0])}: source lr {a[bad[0]]:.3e}, branch lr {b[bad[0]]:.3e}" if bad.size else (
        "table_lr_multiplier")
    raise ValueError(f"RunConfig.init_step={init_step}: the branch's learning rate differs from the source run's "
                     f"before the branch point ({where}). Fix: use OptimizerConfig.schedule='wsd' with the source's "
                     "peak and warmup, and a cooldown that starts at or after init_step in both runs "
                     "(decay_steps <= steps - init_step, and the source's cooldown after init_step)")


def restore_source(run, abstract_state) -> tuple[Any, dict[str, int]]:
  """(state, this process's data position) of the source checkpoint at init_step, verified, read-only."""
  directory = fileio.as_path(run.init_from) / "checkpoints"
  ckpt_integrity.check(directory / str(run.init_step))
  options = ocp.CheckpointManagerOptions(read_only=True, create=False)
  manager = ocp.CheckpointManager(directory, options=options, item_names=("state", "data"))
  try:
    restored = manager.restore(run.init_step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
  finally:
    manager.close()
  return restored["state"], ckpt_lib._own_position(dict(restored["data"]))
