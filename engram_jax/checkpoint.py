"""Orbax checkpoints of a train state plus the data iterator's position, guarded by the model config.

Layout of `directory`:
  <step>/state                  the train state pytree (params, optimizer state, non-trainable variables, step, rng)
  <step>/data                   every process's data-iterator position ({"processes": [{...}, ...]})
  <step>/engram_integrity.json  sha256 and size of every file of the step (ckpt_integrity), written once committed
  <step>.corrupt                a step that failed verification on resume, moved aside (never deleted)
  model_config.json             (runs of older versions; a run's model is now recorded in MODEL_DIR/run_record.json)
Orbax writes each step into a temporary directory and renames it when complete, so a crash mid-save never leaves
a half checkpoint that `latest_step` would pick. Saves are asynchronous; `wait()` blocks until they are on disk.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from engram_jax import ckpt_integrity, fileio

CONFIG_FILE = "model_config.json"
# ModelConfig fields that change how a model computes, not what its parameters are: they may differ on resume.
# ('engram_compression_path' is a field of older versions' model_config.json; the map is data now.)
NON_STRUCTURAL_FIELDS = frozenset({"engram_compression_path", "compute_dtype", "remat", "engram.lookup",
                                   "engram.all_to_all_capacity_factor", "moe.dispatch", "moe.capacity_factor",
                                   "moe.bias_update_rate", "moe.seq_aux_loss_coef", "engram.table_placement"})


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
  """An orbax CheckpointManager (async, keeps the last `max_to_keep`) for {'state': pytree, 'data': per-process
  data positions}, with a checksum manifest per step (ckpt_integrity) and restore that falls back past bad steps."""

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 3, async_save: bool = True):
    self.directory = fileio.as_path(directory)
    self.directory.mkdir(parents=True, exist_ok=True)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                           create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))
    self._unsealed: list[int] = []  # steps saved here whose manifest is not written yet
    self._sealer: threading.Thread | None = None

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
    fileio.atomic_write(path, json.dumps(current, indent=2, sort_keys=True) + "\n")

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any, data_state: dict[str, int], *, force: bool = False) -> bool:
    """Starts an asynchronous save of `state` and of every process's data position at `step` (each process
    restores its own). The previous save is sealed (manifest) in the background once orbax has committed it."""
    self.manager.wait_until_finished()
    self._seal(background=True)
    positions = _gather_positions({k: int(v) for k, v in data_state.items()})
    saved = self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                            data=ocp.args.JsonSave({"processes": positions})),
                              force=force)
    if saved:
      self._unsealed.append(int(step))
    return saved

  def _seal(self, background: bool) -> None:
    """Writes the manifests of committed steps saved here (process 0; the files of all processes are shared)."""
    if self._sealer is not None:
      self._sealer.join()
      self._sealer = None
    steps, self._unsealed = self._unsealed, []
    if not steps or jax.process_index() != 0:
      return

    def seal():
      for step in steps:
        step_dir = self.directory / str(step)
        try:
          ckpt_integrity.write_manifest(step_dir, step)
        except (FileNotFoundError, NotADirectoryError):  # rotated away meanwhile (max_to_keep=1)
          if step_dir.exists():
            raise

    if background:
      self._sealer = threading.Thread(target=seal, name=f"engram_seal_{steps[-1]}", daemon=True)
      self._sealer.start()
    else:
      seal()

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, int]]:
    """(state, this process's data position) of `step`, verified against its manifest; `abstract_state` gives
    shapes, dtypes and target shardings. Raises CorruptCheckpointError naming the bad files."""
    ckpt_integrity.check(self.directory / str(step))
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    except Exception as e:  # orbax / tensorstore errors on truncated or missing files
      mismatch = shape_mismatch_error(self.directory, step, e)
      if mismatch is not None:  # intact files of another model shape: not corrupt, never moved aside
        raise mismatch from e
      raise ckpt_integrity.CorruptCheckpointError(
          f"checkpoint {self.directory / str(step)} could not be restored: {type(e).__name__}: "
          f"{str(e).splitlines()[0] if str(e) else ''}") from e
    return restored["state"], _own_position(dict(restored["data"]))

  def restore_latest(self, abstract_state: Any, log=print) -> tuple[Any, dict[str, int], int] | None:
    """(state, data position, step) of the newest step that verifies and restores; None without checkpoints.
    A bad step is reported by path and moved aside to '<step>.corrupt' (never deleted); the one before is tried."""
    failures = []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        state, data = self.restore(step, abstract_state)
      except ckpt_integrity.CorruptCheckpointError as e:
        failures.append(str(e))
        aside = self._move_aside(step)
        if jax.process_index() == 0:
          log(f"{e}\nIt was moved to {aside} (not deleted); trying the step before.")
        continue
      if failures and jax.process_index() == 0:
        log(f"resuming from step {step}, the newest good checkpoint")
      return state, data, step
    if failures:
      raise ckpt_integrity.CorruptCheckpointError(
          "no checkpoint in {} restores:\n".format(self.directory) + "\n".join(failures) +
          "\nFix: copy good step directories back from a backup, or start a new MODEL_DIR.")
    return None

  def _move_aside(self, step: int):
    src = self.directory / str(step)
    dst = self.directory / f"{step}.corrupt"
    n = 1
    while dst.exists():
      n += 1
      dst = self.directory / f"{step}.corrupt{n}"
    if jax.process_index() == 0:
      src.rename(dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"engram_jax moved checkpoint {step} aside")
    self.manager.reload()
    return dst

  def verify(self, step: int) -> None:
    """Raises CorruptCheckpointError if `step` does not match its manifest (eval and load_model refuse it)."""
    ckpt_integrity.check(self.directory / str(step))

  def restore_subset(self, step: int, abstract_subset: dict) -> dict:
    """Only some top-level entries of the saved state (e.g. params and rest for evaluation, no optimizer)."""
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_subset)
    args = ocp.args.PyTreeRestore(item=abstract_subset, restore_args=restore_args, partial_restore=True)
    return self.manager.restore(step, args=ocp.args.Composite(state=args))["state"]

  def wait(self) -> None:
    """Blocks until every save is committed and sealed."""
    self.manager.wait_until_finished()
    self._seal(background=False)

  def close(self) -> None:
    """Waits for in-flight saves and their manifests, then releases the manager (idempotent)."""
    if self.manager is not None:
      self.wait()
      self.manager.close()
      self.manager = None


def shape_mismatch_error(directory, step: int, error: Exception) -> ValueError | None:
  """A clear ValueError when orbax refused a restore because stored shapes differ from the model's; else None."""
  text = str(error)
  if "tree structures do not match" in text:  # another state layout, e.g. another table optimizer's state
    paths = [line.strip().rstrip(":") for line in text.splitlines()[1:] if line and not line.startswith(" ")]
    return ValueError(
        f"checkpoint {directory / str(step)} holds a state of another structure than this run's (differing "
        f"entries: {', '.join(p for p in paths if not p.startswith('If this'))[:300]}). Nothing was moved or "
        "changed. The optimizer state's layout follows OptimizerConfig.table_optimizer (adam_lazy keeps its moments "
        "in one 'moments' array; earlier versions wrote 'mu' and 'nu'; 'sgd' is row-sparse with a count only). "
        "Fix: resume with the config and the engram_jax version that wrote it, or start a new MODEL_DIR.")
  if "is not compatible with the stored shape" not in text:
    return None
  return ValueError(
      f"checkpoint {directory / str(step)} holds arrays of other shapes than this model ({text.splitlines()[0][:200]}). "
      "Nothing was moved or changed. Shapes follow the model config alone: an Engram table has its hashed rows "
      "padded to EngramConfig.table_row_multiple (checkpoints of earlier versions also padded them to the mesh's "
      "row shards, e.g. 3072 rows on 12 devices). Fix: use the model config and the engram_jax version that wrote "
      "it, or start a new MODEL_DIR.")


def _gather_positions(position: dict[str, int]) -> list[dict[str, int]]:
  """Every process's data position, in process order (orbax writes JSON items from the primary host only)."""
  if jax.process_count() == 1:
    return [position]
  from jax.experimental import multihost_utils
  keys = sorted(position)
  rows = multihost_utils.process_allgather(np.asarray([position[k] for k in keys], np.int64))  # [processes, keys]
  return [dict(zip(keys, map(int, row))) for row in np.asarray(rows).reshape(jax.process_count(), len(keys))]


def _own_position(data: dict) -> dict[str, int]:
  """This process's position; checkpoints of older versions hold one position (process 0's) for all."""
  if "processes" not in data:
    return {k: int(v) for k, v in data.items()}
  positions = data["processes"]
  if len(positions) != jax.process_count():
    raise ValueError(f"the checkpoint holds data positions of {len(positions)} processes, this job has "
                     f"{jax.process_count()}; resume with the same number of processes (or start a new MODEL_DIR)")
  return {k: int(v) for k, v in positions[jax.process_index()].items()}

