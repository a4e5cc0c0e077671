"""Row-sparse Engram table optimizers in host memory (numpy, in place): the host half of training with
EngramConfig.table_placement='host'.

The semantics are those of the device update (engram_jax.sparse_tables, OptimizerConfig.table_optimizer):
  'sgd'              row -= lr * g                                                    (touched rows; optax.sgd)
  'adam_lazy'        m = b1 m + (1 - b1) g,  v = b2 v + (1 - b2) g^2,
                     row -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)     (touched rows only)
  'adagrad_rowwise'  a = a + mean_j(g_j^2),  row -= lr * g / (sqrt(a) + eps)           (one accumulator per row)
with the same float32 operations in the same order. The step's scalars (step size -lr at the table's update
count, Adam's bias corrections 1 - b^t) and Adagrad's per-row mean square are computed on the device by the train
step (`StepScalars`), so the host does only elementwise operations, each rounded once. The device update equals it
up to float rounding (~1 ulp), not bit for bit: XLA:CPU contracts a * b + c into a fused multiply-add and divides
by a broadcast scalar through its reciprocal.

Rows are updated independently, so an update may be applied in parts (`apply` on any subset of its rows, in any
order): training applies the rows the next batch reads first and the rest while the device runs the next step.

Letters: V table rows, d row width, U rows updated (unique ids).
"""

from __future__ import annotations

import dataclasses

import numpy as np

HOST_OPTIMIZERS = ("sgd", "adam_lazy", "adagrad_rowwise")


@dataclasses.dataclass(frozen=True)
class StepScalars:
  """One step's scalars for one table, as the device computed them (float32)."""

  step_size: np.float32  # -lr: the table group's learning rate at the table's update count, negated
  bc1: np.float32 = np.float32(1)  # adam_lazy: 1 - b1^t (t = updates including this one)
  bc2: np.float32 = np.float32(1)  # adam_lazy: 1 - b2^t


def check_kind(kind: str) -> None:
  if kind not in HOST_OPTIMIZERS:
    raise ValueError(f"OptimizerConfig.table_optimizer={kind!r} with EngramConfig.table_placement='host': use one "
                     f"of {HOST_OPTIMIZERS} (a row-sparse update the host can apply), or table_placement='device'")


def init_state(kind: str, table: np.ndarray) -> dict[str, np.ndarray]:
  """Fresh state of a table [V, d] (the device layout of sparse_tables.init_state; 'sgd' keeps only the count)."""
  check_kind(kind)
  state = {"count": np.zeros((), np.int32)}
  if kind == "adam_lazy":
    state["moments"] = np.zeros((table.shape[0], 2) + table.shape[1:], table.dtype)  # [V, 2, d] first, second
  elif kind == "adagrad_rowwise":
    state["acc"] = np.zeros(table.shape[:1], table.dtype)
  return state


def apply(kind: str, table: np.ndarray, state: dict[str, np.ndarray], ids: np.ndarray, grads: np.ndarray,
          scalars: StepScalars, *, b1: float, b2: float, eps: float, mean_sq: np.ndarray | None = None) -> None:
  """Updates rows `ids` [U] (distinct, in [0, V)) of `table` [V, d] and of `state` in place from their summed
  gradients `grads` [U, d]. adagrad_rowwise: `mean_sq` [U] = mean_j(g_j^2) as the device computed it (None:
  computed here, equal up to the order of the d-term sum). Does not advance state['count'] (`finish_step` does,
  once per step, so a step may be applied in parts)."""
  if not ids.size:
    return
  f32 = table.dtype.type
  if kind == "sgd":
    upd = f32(scalars.step_size) * grads  # [U, d] as optax.sgd: (-lr) * g
  elif kind == "adam_lazy":
    old = state["moments"][ids]  # [U, 2, d]
    mu = f32(1 - b1) * grads + f32(b1) * old[:, 0]  # [U, d]
    nu = f32(1 - b2) * np.square(grads) + f32(b2) * old[:, 1]  # [U, d]
    upd = mu / f32(scalars.bc1) / (np.sqrt(nu / f32(scalars.bc2)) + f32(eps)) * f32(scalars.step_size)
    state["moments"][ids] = np.stack([mu, nu], axis=1)
  elif kind == "adagrad_rowwise":
    if mean_sq is None:
      mean_sq = np.mean(np.square(grads), axis=-1)
    acc = state["acc"][ids] + mean_sq  # [U]
    upd = grads / (np.sqrt(acc)[:, None] + f32(eps)) * f32(scalars.step_size)
    state["acc"][ids] = acc
  else:
    check_kind(kind)
  table[ids] = table[ids] + upd


def finish_step(state: dict[str, np.ndarray]) -> None:
  """Counts one applied update (the count the next step's learning rate and bias corrections read)."""
  state["count"] = np.asarray(state["count"] + 1, np.int32)
