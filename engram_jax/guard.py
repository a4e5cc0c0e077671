"""The non-finite guard: a diverging run stops (or skips the step) instead of training on NaNs and saving them.

On device, every step: a flag per gradient leaf (`nonfinite_leaves`) and a step-level `guard/finite` flag (loss,
gradient norm and every gradient finite). The host reads them only where it syncs anyway (log steps, checkpoints,
the end), so the guard adds no host sync per step. Before every save the whole state is checked too
(`state_leaf_flags`), so no non-finite state is ever written and rotation never evicts the last good checkpoint.

Modes (RunConfig.on_nonfinite): 'stop' raises NonFiniteError naming the step, the loss and the parameter group
(and parameters) whose gradient was non-finite; 'skip_step' keeps the previous parameters, optimizer state and
non-trainable variables for that step (the step counter, RNG and data still advance) and counts the skip.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

MODES = ("stop", "skip_step")
FINITE = "guard/finite"  # metrics key: bool, the step was finite
LEAVES = "guard/nonfinite_leaves"  # metrics key: bool [leaves of params], the leaf's gradient was non-finite


class NonFiniteError(RuntimeError):
  """A non-finite loss, gradient or state: the run stopped without saving it."""


def nonfinite_leaves(tree) -> jax.Array:
  """bool [L]: leaf i (in jax.tree.leaves order) holds a NaN or inf."""
  return jnp.stack([~jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)])


def guarded(train_step: Callable, mode: str) -> Callable:
  """Wraps a train step (state, batch) -> (state, metrics) whose metrics carry LEAVES: adds FINITE and, for
  'skip_step', selects the previous params/opt/rest when the step was not finite (all on device)."""
  if mode not in MODES:
    raise ValueError(f"RunConfig.on_nonfinite={mode!r}: use one of {MODES}")

  @functools.wraps(train_step)
  def step(state, batch):
    new_state, metrics = train_step(state, batch)
    ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"]) & ~jnp.any(metrics[LEAVES])
    if mode == "skip_step":
      kept = {k: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new_state[k], state[k]) for k in ("params", "opt",
                                                                                                  "rest")}
      new_state = {**new_state, **kept}
    return new_state, {**metrics, FINITE: ok}

  return step


@jax.jit
def state_leaf_flags(state) -> dict[str, jax.Array]:
  """Per top-level entry of a train state: bool [leaves], True where a leaf is non-finite (floating leaves only)."""
  return {k: nonfinite_leaves([x for x in jax.tree.leaves(v) if jnp.issubdtype(x.dtype, jnp.floating)] or
                              [jnp.zeros(())]) for k, v in state.items()}


def leaf_paths(tree) -> list[str]:
  """Dotted path of every leaf of a pure pytree, in jax.tree.leaves order."""
  return [".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
          for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def nonfinite_steps(steps: Sequence[int], metrics: Sequence[dict]) -> list[tuple[int, dict]]:
  """(step, host metrics) of every non-finite step among pending device metrics (one device_get of the flags)."""
  if not metrics:
    return []
  flags = jax.device_get([m[FINITE] for m in metrics])
  return [(step, jax.device_get({k: m[k] for k in ("loss", "grad_norm", LEAVES)}))
          for step, ok, m in zip(steps, flags, metrics) if not ok]


def describe(step: int, host: dict, params: Any, labels: Any) -> str:
  """'step 37: loss nan, gradient norm inf; non-finite gradients in group 'table' (blocks.1.engram.table)'."""
  paths, groups = leaf_paths(params), jax.tree.leaves(labels)
  bad = [i for i, flag in enumerate(np.asarray(host[LEAVES]).reshape(-1)) if flag]
  where = ""
  if bad:
    names = sorted({groups[i] for i in bad})
    shown = ", ".join(paths[i] for i in bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
    where = f"; non-finite gradients in parameter group{'s' if len(names) > 1 else ''} {names} ({shown})"
  return f"step {step}: loss {float(host['loss']):.6g}, gradient norm {float(host['grad_norm']):.6g}{where}"


def bad_state_entries(state, flags: dict) -> list[str]:
  """Dotted paths of the non-finite floating leaves of a state, given `state_leaf_flags(state)`."""
  out = []
  for key, entry_flags in jax.device_get(flags).items():
    floats = [p for p, x in zip(leaf_paths(state[key]), jax.tree.leaves(state[key]))
              if jnp.issubdtype(x.dtype, jnp.floating)]
    out += [f"{key}.{floats[i]}" for i, flag in enumerate(np.asarray(entry_flags)) if flag and i < len(floats)]
  return out
