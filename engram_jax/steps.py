"""The compiled pieces of training: model construction, sharded state, the jitted train and eval steps.

The state is a dict of pure pytrees {'params', 'opt', 'rest', 'step', 'rng'} ('rest' holds the model's
non-trainable variables, e.g. MoE balance biases); one jitted, donated `train_step` maps it to the next state.
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

from engram_jax import optim, sharding
from engram_jax.losses import lm_terms
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
               compression: np.ndarray | None = None) -> Setup:
  """Abstract model -> shardings, optimizer, sharded initializer and jitted steps (compiled on first call).
  Cached per (model, optimizer, schedule length, mesh, compression map contents)."""
  return _make_setup(model_config, optimizer, total_steps, mesh, FrozenMap.of(compression))


@functools.lru_cache(maxsize=4)
def _make_setup(model_config: ModelConfig, optimizer: optim.OptimizerConfig, total_steps: int, mesh,
                frozen_map: FrozenMap | None) -> Setup:
  compression = None if frozen_map is None else frozen_map.array
  abstract_model = nnx.eval_shape(lambda: build_model(model_config, mesh, 0, compression))
  graphdef, params, rest = nnx.split(abstract_model, nnx.Param, ...)
  labels = optim.param_labels(params)
  tx = optim.make_optimizer(optimizer, total_steps, labels)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  param_sh = nnx.to_pure_dict(sharding.state_shardings(params, mesh))
  shardings = {"params": param_sh, "opt": optim.opt_state_shardings(tx, nnx.to_pure_dict(params), param_sh, replicated),
               "rest": nnx.to_pure_dict(sharding.state_shardings(rest, mesh)), "step": replicated, "rng": replicated}

  def init(seed: jax.Array) -> State:
    model = build_model(model_config, mesh, seed, compression)
    _, p, r = nnx.split(model, nnx.Param, ...)
    p = nnx.to_pure_dict(p)
    return {"params": p, "opt": tx.init(p), "rest": nnx.to_pure_dict(r), "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.PRNGKey(seed)}

  init = jax.jit(init, out_shardings=shardings)
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          jax.eval_shape(init, jnp.int32(0)), shardings)
  schedule = optim.learning_rate_schedule(optimizer, total_steps)
  train_step = make_train_step(graphdef, tx, _balance_update_fn(model_config), schedule)
  return Setup(graphdef, tx, labels, shardings, abstract, init,
               jax.jit(train_step, donate_argnums=0, out_shardings=(shardings, None)),
               jax.jit(make_eval_step(graphdef)))


# ------------------------------------------------------------------------------------------------ steps


def intermediates(model: nnx.Module) -> dict[str, jax.Array]:
  """Values the model recorded during the call as nnx.Intermediate, by dotted path (for logging)."""
  flat = nnx.to_flat_state(nnx.state(model, nnx.Intermediate))
  return {".".join(map(str, path)): var.get_value() for path, var in flat}


def make_train_step(graphdef, tx: optax.GradientTransformation, update_biases: Callable | None,
                    schedule: Callable) -> Callable[[State, Batch], tuple[State, dict]]:
  """The update: loss -> grads -> clipped optax groups -> MoE bias update (outside the gradient)."""

  def train_step(state: State, batch: Batch) -> tuple[State, dict]:
    def loss_fn(params):
      model = nnx.merge(graphdef, params, state["rest"])
      nll, count, aux = lm_terms(model, batch)
      ce = nll / jnp.maximum(count, 1.0)
      aux = {**aux, **intermediates(model)}  # what layers record, e.g. Engram ids dropped for capacity
      return ce + aux.get("moe_aux_loss", 0.0), (ce, count, aux)

    (loss, (ce, count, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt = tx.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    rest = state["rest"]
    if update_biases is not None:  # aux-loss-free balancing: no gradient flows here
      model = nnx.merge(graphdef, params, rest)
      update_biases(model, jax.lax.stop_gradient(aux))
      rest = nnx.to_pure_dict(nnx.split(model, nnx.Param, ...)[2])
    metrics = {"loss": ce, "total_loss": loss, "tokens": count, "grad_norm": optax.global_norm(grads),
               "lr": schedule(state["step"]), **{f"aux/{k}": v for k, v in aux.items()}}
    new_state = {"params": params, "opt": opt, "rest": rest, "step": state["step"] + 1,
                 "rng": jax.random.split(state["rng"])[0]}  # the key advances every step (reserved for noise)
    return new_state, metrics

  return train_step


def make_eval_step(graphdef) -> Callable[[dict, dict, Batch], tuple[jax.Array, jax.Array]]:
  """(params, rest, batch) -> (NLL sum, token count)."""

  def eval_step(params, rest, batch):
    nll, count, _ = lm_terms(nnx.merge(graphdef, params, rest), batch)
    return nll, count

  return eval_step


def validation_loss(eval_step, state: State, batches: Sequence[dict]) -> float:
  """Token-weighted mean NLL over device batches."""
  sums = [eval_step(state["params"], state["rest"], b) for b in batches]
  nll, count = (float(sum(jax.device_get(s[i]) for s in sums)) for i in (0, 1))
  return nll / max(count, 1.0)

