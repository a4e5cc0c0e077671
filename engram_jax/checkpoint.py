"""Orbax checkpoints of a train state plus the data iterator's position, guarded by the model config.

Layout of `directory`:
  model_config.json   the ModelConfig the checkpoints belong to (written once, atomically; compared on resume)
  <step>/state        the train state pytree (params, optimizer state, non-trainable variables, step, rng)
  <step>/data         the data iterator's position (a small JSON dict of ints)
Orbax writes each step into a temporary directory and renames it when complete, so a crash mid-save never leaves
a half checkpoint that `latest_step` would pick. Saves are asynchronous; `wait()` blocks until they are on disk.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

CONFIG_FILE = "model_config.json"
# ModelConfig fields that change how a model computes, not what its parameters are: they may differ on resume.
# ('engram_compression_path' is a field of older versions' model_config.json; the map is data now.)
NON_STRUCTURAL_FIELDS = frozenset({"engram_compression_path", "compute_dtype", "remat", "engram.lookup",
                                   "engram.all_to_all_capacity_factor", "moe.dispatch", "moe.capacity_factor",
                                   "moe.bias_update_rate", "moe.seq_aux_loss_coef"})


def config_to_dict(config: Any) -> dict:
  """A (nested) config dataclass -> a JSON-compatible dict (tuples become lists)."""
  return json.loads(json.dumps(dataclasses.asdict(config)))


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def config_differences(saved: dict, current: dict) -> list[str]:
  """Structural fields whose values differ, as 'field: saved -> current' lines."""
  a, b = _flatten(saved), _flatten(current)
  lines = []
  for key in sorted(set(a) | set(b)):
    if key in NON_STRUCTURAL_FIELDS:
      continue
    if key not in a or key not in b or a[key] != b[key]:
      show = lambda d: repr(d[key]) if key in d else "<absent>"
      lines.append(f"{key}: {show(a)} -> {show(b)}")
  return lines


def finished_steps(directory) -> list[int]:
  """Steps whose save completed (orbax's finalized step directories), sorted; [] for a missing directory."""
  return sorted(ocp.path.step.checkpoint_steps(directory))


class Checkpointer:
  """An orbax CheckpointManager (async, keeps the last `max_to_keep`) for {'state': pytree, 'data': dict}."""

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 3, async_save: bool = True):
    self.directory = Path(directory).absolute()
    self.directory.mkdir(parents=True, exist_ok=True)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                           create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

  def check_model_config(self, config: Any) -> None:
    """Records `config` on first use; raises ValueError if the directory holds checkpoints of another model."""
    current = config_to_dict(config)
    path = self.directory / CONFIG_FILE
    if path.exists():
      saved = json.loads(path.read_text())
      diff = config_differences(saved, current)
      if diff:
        raise ValueError(
            f"checkpoints in {self.directory} belong to a different model config:\n  " + "\n  ".join(diff) +
            f"\nFix: use the model config saved in {path} (the same configs/models/*.gin and overrides), or "
            "train this config in a new model_dir (MODEL_DIR).")
      return
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(current, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any, data_state: dict[str, int], *, force: bool = False) -> bool:
    """Starts an asynchronous save of `state` and the data position at `step`."""
    data_state = {k: int(v) for k, v in data_state.items()}
    return self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                           data=ocp.args.JsonSave(data_state)), force=force)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, int]]:
    """(state, data position) of `step`; `abstract_state` gives shapes, dtypes and target shardings."""
    restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                                  data=ocp.args.JsonRestore()))
    return restored["state"], dict(restored["data"])

  def restore_subset(self, step: int, abstract_subset: dict) -> dict:
    """Only some top-level entries of the saved state (e.g. params and rest for evaluation, no optimizer)."""
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_subset)
    args = ocp.args.PyTreeRestore(item=abstract_subset, restore_args=restore_args, partial_restore=True)
    return self.manager.restore(step, args=ocp.args.Composite(state=args))["state"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()

