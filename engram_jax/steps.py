"""The compiled pieces of training: model construction, sharded state, the jitted train and eval steps.

The state is a dict of pure pytrees {'params', 'opt', 'rest', 'step', 'rng'} ('rest' holds the model's
non-trainable variables, e.g. MoE balance biases); one jitted, donated `train_step` maps it to the next state.
'opt' is optax's state over every parameter, or, with a row-sparse table optimizer (adam_lazy, adagrad_rowwise, sgd),
{'backbone': optax's state over the non-table parameters, 'tables': per-table state at the tables' params paths}.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from engram_jax import guard, optim, sharding, sparse_tables
from engram_jax.losses import lm_terms, shift_right
from engram_jax.models.config import ModelConfig

State = dict[str, Any]
Batch = dict[str, np.ndarray]


def build_model(model_config: ModelConfig, mesh, seed: int, compression: np.ndarray | None = None) -> nnx.Module:
  from engram_jax.models.decoder import Decoder  # lazy: the decoder imports layers that may import more
  return Decoder(model_config, mesh, compression=compression, rngs=nnx.Rngs(jax.random.key(seed)))  # seed may be traced


@dataclasses.dataclass(frozen=True, eq=False)
class FrozenMap:
  """An Engram compression map as a cache key: equal (and hashed) by content, so every run directory whose map has
  the same ids shares one compiled setup."""
  array: np.ndarray
  digest: str

  @classmethod
  def of(cls, compression: np.ndarray | None) -> FrozenMap | None:
    if compression is None:
      return None
    array = np.asarray(compression, np.int32)
    return cls(array, hashlib.sha256(array.tobytes()).hexdigest())

  def __eq__(self, other):
    return isinstance(other, FrozenMap) and other.digest == self.digest

  def __hash__(self):
    return hash(self.digest)



def _balance_update_fn(model_config: ModelConfig) -> Callable[[nnx.Module, dict], None] | None:
  """The MoE helper that moves balance biases from the observed expert load (None for dense models)."""
  if model_config.moe is None:
    return None
  from engram_jax.layers import moe
  rate = model_config.moe.bias_update_rate
  return lambda model, aux: moe.apply_balance_updates(model, aux, rate)


@dataclasses.dataclass
class Setup:
  """Everything compiled for one (model, optimizer, schedule length, mesh): reused across runs in a process."""
  graphdef: Any
  tx: optax.GradientTransformation
  labels: dict
  shardings: State  # NamedSharding per leaf of the state
  abstract: State  # ShapeDtypeStructs (with shardings) of the state: the restore target
  init: Callable[[jax.Array], State]  # jitted seed -> fresh state, created directly sharded
  train_step: Callable[[State, Batch], tuple[State, dict]]
  eval_step: Callable[[dict, dict, Batch], tuple[jax.Array, jax.Array]]


def make_setup(model_config: ModelConfig, optimizer: optim.OptimizerConfig, total_steps: int, mesh,
               compression: np.ndarray | None = None, on_nonfinite: str = "stop") -> Setup:
  """Abstract model -> shardings, optimizer, sharded initializer and jitted steps (compiled on first call).
  Cached per (model, optimizer, schedule length, mesh, compression map contents, non-finite mode)."""
  return _make_setup(model_config, optimizer, total_steps, mesh, FrozenMap.of(compression), on_nonfinite)


@functools.lru_cache(maxsize=4)
def _make_setup(model_config: ModelConfig, optimizer: optim.OptimizerConfig, total_steps: int, mesh,
                frozen_map: FrozenMap | None, on_nonfinite: str) -> Setup:
  compression = None if frozen_map is None else frozen_map.array
  abstract_model = nnx.eval_shape(lambda: build_model(model_config, mesh, 0, compression))
  graphdef, params, rest = nnx.split(abstract_model, nnx.Param, ...)
  labels = optim.param_labels(params)
  plan = _sparse_plan(model_config, optimizer, abstract_model, mesh)
  tx = optim.make_optimizer(optimizer, total_steps, labels) if plan is None else optim.backbone_optimizer(
      optimizer, total_steps)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  param_sh = nnx.to_pure_dict(sharding.state_shardings(params, mesh))
  shardings = {"params": param_sh, "opt": _opt_shardings(tx, plan, nnx.to_pure_dict(params), param_sh, replicated),
               "rest": nnx.to_pure_dict(sharding.state_shardings(rest, mesh)), "step": replicated, "rng": replicated}

  def init(seed: jax.Array) -> State:
    model = build_model(model_config, mesh, seed, compression)
    _, p, r = nnx.split(model, nnx.Param, ...)
    p = nnx.to_pure_dict(p)
    return {"params": p, "opt": _opt_init(tx, plan, p), "rest": nnx.to_pure_dict(r), "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.PRNGKey(seed)}

  init = jax.jit(init, out_shardings=shardings)
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          jax.eval_shape(init, jnp.int32(0)), shardings)
  schedule = optim.learning_rate_schedule(optimizer, total_steps)
  skip = on_nonfinite == "skip_step"
  train_step = guard.guarded(make_train_step(graphdef, tx, _balance_update_fn(model_config), schedule, plan,
                                             optimizer, total_steps, keep_rows_if_nonfinite=skip), on_nonfinite,
                             row_guarded=plan.paths if plan is not None and skip else ())
  return Setup(graphdef, tx, labels, shardings, abstract, init,
               jax.jit(train_step, donate_argnums=0, out_shardings=(shardings, None)),
               jax.jit(make_eval_step(graphdef)))


def _sparse_plan(model_config: ModelConfig, optimizer: optim.OptimizerConfig, abstract_model, mesh
                 ) -> sparse_tables.Plan | None:
  """The row-sparse table plan (None for the dense table optimizers or a model without Engram)."""
  if optimizer.table_optimizer not in optim.SPARSE_TABLE_OPTIMIZERS or not model_config.engram_layers:
    return None
  if model_config.engram.lookup == "all_to_all":
    if optimizer.table_optimizer == "sgd":  # dense SGD: the same update (untouched rows get a zero gradient)
      return None
    raise ValueError(f"OptimizerConfig.table_optimizer={optimizer.table_optimizer!r} needs every gathered row to "
                     "reach the model; EngramConfig.lookup='all_to_all' drops ids over capacity: use lookup="
                     "'shard_map' or 'take', or table_optimizer='adam_dense'")
  return sparse_tables.Plan.of(abstract_model, optimizer.table_optimizer, optimizer.b1, optimizer.b2, optimizer.eps,
                               mesh)


def _opt_init(tx, plan: sparse_tables.Plan | None, params: dict):
  """Optimizer state: optax's over every param, or {'backbone': optax's over the rest, 'tables': per-table state}."""
  if plan is None:
    return tx.init(params)
  tables = [sparse_tables.init_state(plan.kind, sparse_tables.get_path(params, p)) for p in plan.paths]
  return {"backbone": tx.init(sparse_tables.without(params, list(plan.paths))),
          "tables": sparse_tables.with_leaves({}, list(plan.paths), tables)}


def _opt_shardings(tx, plan: sparse_tables.Plan | None, params: dict, param_sh: dict, replicated):
  if plan is None:
    return optim.opt_state_shardings(tx, params, param_sh, replicated)
  paths = list(plan.paths)
  tables = [sparse_tables.state_shardings(plan.kind, sparse_tables.get_path(param_sh, p)) for p in paths]
  return {"backbone": optim.opt_state_shardings(tx, sparse_tables.without(params, paths),
                                                sparse_tables.without(param_sh, paths), replicated),
          "tables": sparse_tables.with_leaves({}, paths, tables)}


# ------------------------------------------------------------------------------------------------ steps


def intermediates(model: nnx.Module) -> dict[str, jax.Array]:
  """Values the model recorded during the call as nnx.Intermediate, by dotted path (for logging)."""
  flat = nnx.to_flat_state(nnx.state(model, nnx.Intermediate))
  return {".".join(map(str, path)): var.get_value() for path, var in flat}


def make_train_step(graphdef, tx: optax.GradientTransformation, update_biases: Callable | None,
                    schedule: Callable, plan: sparse_tables.Plan | None = None,
                    optimizer: optim.OptimizerConfig | None = None, total_steps: int = 1,
                    host_tables: Callable | None = None, keep_rows_if_nonfinite: bool = False
                    ) -> Callable[[State, Batch], tuple[State, dict]]:
  """The update: loss -> grads -> clipped optax groups -> MoE bias update (outside the gradient).
  With a sparse `plan`, tables get row gradients and their own update (`sparse_step`); keep_rows_if_nonfinite:
  a non-finite step leaves the tables and their state as they were, touching only its rows (for 'skip_step').
  With `host_tables` (tables in host memory, engram_jax.host_training): the batch carries each table's hashed ids
  and gathered rows, the params hold [V, 0] stand-ins, and host_tables(row grads, batch, lr_fn) -> metrics entries
  that hand the clipped row gradients to the host's update instead of updating the tables here."""

  def train_step(state: State, batch: Batch) -> tuple[State, dict]:
    def loss_fn(params, rows=None):
      model = nnx.merge(graphdef, params, state["rest"])
      nll, count, aux = lm_terms(model, batch, engram_rows=rows)
      ce = nll / jnp.maximum(count, 1.0)
      aux = {**aux, **intermediates(model)}  # what layers record, e.g. Engram ids dropped for capacity
      return ce + aux.get("moe_aux_loss", 0.0), (ce, count, aux)

    aux_out = {}  # host tables: what the host's table update needs
    if plan is None:
      (loss, (ce, count, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
      updates, opt = tx.update(grads, state["opt"], state["params"])
      params = optax.apply_updates(state["params"], updates)
    else:
      (loss, (ce, count, aux)), grads, params, opt, sent = sparse_step(state, batch, loss_fn)
      aux_out.update(sent)
    rest = state["rest"]
    if update_biases is not None:  # aux-loss-free balancing: no gradient flows here
      model = nnx.merge(graphdef, params, rest)
      update_biases(model, jax.lax.stop_gradient(aux))
      rest = nnx.to_pure_dict(nnx.split(model, nnx.Param, ...)[2])
    metrics = {"loss": ce, "total_loss": loss, "tokens": count, "grad_norm": optax.global_norm(grads),
               "lr": schedule(state["step"]), **{f"aux/{k}": v for k, v in aux.items()},
               guard.LEAVES: guard.nonfinite_leaves(grads), **aux_out}  # LEAVES: read by guard.guarded
    new_state = {"params": params, "opt": opt, "rest": rest, "step": state["step"] + 1,
                 "rng": jax.random.split(state["rng"])[0]}  # the key advances every step (reserved for noise)
    return new_state, metrics

  def sparse_step(state: State, batch: Batch, loss_fn: Callable):
    """Row-sparse tables: differentiate w.r.t. the gathered rows, clip over all groups, update touched rows only.
    Returns (loss terms, grads in the params' structure with each table's leaf its summed row gradients
    [n, U, d], new params, new opt state, metrics entries for a host table update)."""
    paths, params = list(plan.paths), state["params"]
    backbone = sparse_tables.without(params, paths)
    tables = [sparse_tables.get_path(params, p) for p in paths]
    if host_tables is not None:  # hashed and gathered by the input pipeline on the host
      ids, rows = batch["engram_ids"], batch["engram_rows"]
    else:
      model = nnx.merge(graphdef, params, state["rest"])
      ids, rows = plan.gather(model, shift_right(batch["targets"], batch["segment_ids"]), batch["segment_ids"])
    with_tables = lambda b: sparse_tables.with_leaves(b, paths, tables)
    out, (g_backbone, g_rows) = jax.value_and_grad(lambda b, r: loss_fn(with_tables(b), r), argnums=(0, 1),
                                                   has_aux=True)(backbone, rows)
    row_grads = plan.row_grads(ids, g_rows, batch["segment_ids"] > 0, tables)
    grads = sparse_tables.with_leaves(g_backbone, paths, [g.grads for g in row_grads])  # params' structure
    clipped = grads
    if optimizer.grad_clip_norm:  # over both groups, as the dense path's optax chain
      clipped = optax.clip_by_global_norm(optimizer.grad_clip_norm).update(grads, optax.EmptyState())[0]
    updates, opt_backbone = tx.update(sparse_tables.without(clipped, paths), state["opt"]["backbone"], backbone)
    row_grads = [g._replace(grads=sparse_tables.get_path(clipped, p)) for g, p in zip(row_grads, paths)]
    lr_fn = optim.table_learning_rate(optimizer, total_steps)
    if host_tables is not None:  # the host updates the tables; the stand-ins pass through
      params = sparse_tables.with_leaves(optax.apply_updates(backbone, updates), paths, tables)
      return out, grads, params, {"backbone": opt_backbone}, host_tables(row_grads, batch, lr_fn)
    states = [sparse_tables.get_path(state["opt"]["tables"], p) for p in paths]
    keep = None
    if keep_rows_if_nonfinite:  # the guard's test, on the same values (guard.guarded skips the rest of the state)
      keep = guard.step_ok(out[1][0], optax.global_norm(grads), guard.nonfinite_leaves(grads))
    tables, states = plan.apply(tables, states, row_grads, lr_fn, keep)
    params = sparse_tables.with_leaves(optax.apply_updates(backbone, updates), paths, tables)
    return out, grads, params, {"backbone": opt_backbone, "tables": sparse_tables.with_leaves({}, paths, states)}, {}

  return train_step


def make_eval_step(graphdef) -> Callable[[dict, dict, Batch], tuple[jax.Array, jax.Array]]:
  """(params, rest, batch) -> (NLL sum, token count)."""

  def eval_step(params, rest, batch):
    nll, count, _ = lm_terms(nnx.merge(graphdef, params, rest), batch, engram_rows=batch.get("engram_rows"))
    return nll, count  # engram_rows: host tables' rows, gathered by the host

  return eval_step


def validation_loss(eval_step, state: State, batches: Sequence[dict]) -> float:
  """Token-weighted mean NLL over device batches."""
  sums = [eval_step(state["params"], state["rest"], b) for b in batches]
  nll, count = (float(sum(jax.device_get(s[i]) for s in sums)) for i in (0, 1))
  return nll / max(count, 1.0)

