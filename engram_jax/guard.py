"""The non-finite guard: a diverging run stops (or skips the step) instead of training on NaNs and saving them.

On device, every step: a flag per gradient leaf (`nonfinite_leaves`) and a step-level `guard/finite` flag (loss,
gradient norm and every gradient finite). The host reads them only where it syncs anyway (log steps, checkpoints,
the end), so the guard adds no host sync per step. Before every save the whole state is checked too
(`state_leaf_flags`), so no non-finite state is ever written and rotation never evicts the last good checkpoint.

Modes (RunConfig.on_nonfinite): 'stop' raises NonFiniteError naming the step, the loss and the parameter group
(and parameters) whose gradient was non-finite; 'skip_step' keeps the previous parameters, optimizer state and
non-trainable variables for that step (the step counter, RNG and data still advance) and counts the skip.
Row-sparse tables (engram_jax.sparse_tables) skip inside the train step at the cost of their touched rows
(`guarded(..., row_guarded=paths)`): the guard's select never reads a whole table or its optimizer state.
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


def step_ok(loss: jax.Array, grad_norm: jax.Array, leaves: jax.Array) -> jax.Array:
  """bool scalar: the step is finite (loss, gradient norm and every gradient leaf's flag `nonfinite_leaves`)."""
  return jnp.isfinite(loss) & jnp.isfinite(grad_norm) & ~jnp.any(leaves)


def guarded(train_step: Callable, mode: str, row_guarded: Sequence[tuple] = ()) -> Callable:
  """Wraps a train step (state, batch) -> (state, metrics) whose metrics carry LEAVES: adds FINITE and, for
  'skip_step', selects the previous params/opt/rest when the step was not finite (all on device).
  row_guarded: params paths of row-sparse tables the step already kept on a non-finite step (the state's 'opt' is
  then {'backbone', 'tables'}): their table leaves and opt['tables'] are taken as the step returned them."""
  if mode not in MODES:
    raise ValueError(f"RunConfig.on_nonfinite={mode!r}: use one of {MODES}")
  from engram_jax import sparse_tables  # noqa: PLC0415 - the tree helpers

  paths = list(row_guarded)
  select = lambda ok, new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)

  @functools.wraps(train_step)
  def step(state, batch):
    new_state, metrics = train_step(state, batch)
    ok = step_ok(metrics["loss"], metrics["grad_norm"], metrics[LEAVES])
    if mode == "skip_step":
      kept = {k: select(ok, new_state[k], state[k]) for k in ("opt", "rest")}
      kept["params"] = select(ok, new_state["params"], state["params"])
      if paths:  # O(touched rows): the tables and their state were kept inside the step
        new_params = new_state["params"]
        kept["params"] = sparse_tables.with_leaves(
            select(ok, sparse_tables.without(new_params, paths), sparse_tables.without(state["params"], paths)),
            paths, [sparse_tables.get_path(new_params, p) for p in paths])
        kept["opt"] = {"backbone": select(ok, new_state["opt"]["backbone"], state["opt"]["backbone"]),
                       "tables": new_state["opt"]["tables"]}
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
