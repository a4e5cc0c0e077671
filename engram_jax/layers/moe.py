"""Feed-forward layers: a dense SwiGLU and a DeepSeek-style mixture of experts.

Letters: B batch, S sequence, D width, F hidden width, E experts, T tokens (B * S), k experts per token,
C slots per expert, ep / mp sizes of the 'expert' / 'model' mesh axes.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from engram_jax import sharding
from engram_jax.layers.moe_config import MoEConfig


def swiglu(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array) -> jax.Array:
  """(silu(x W_gate) * x W_up) W_down for x [..., D], W_gate/W_up [D, F], W_down [F, D] (arXiv 2002.05202)."""
  return (jax.nn.silu(x @ w_gate) * (x @ w_up)) @ w_down


class SwiGLU(nnx.Module):
  """Dense SwiGLU FFN: x [B, S, D] -> [B, S, D]."""

  def __init__(self, d_model: int, hidden: int, *, compute_dtype=jnp.float32, rngs: nnx.Rngs):
    self.compute_dtype = compute_dtype
    init_in = jax.nn.initializers.normal(stddev=d_model ** -0.5)
    init_out = jax.nn.initializers.normal(stddev=hidden ** -0.5)
    self.w_gate = sharding.param(init_in(rngs.params(), (d_model, hidden)), "embed", "mlp")
    self.w_up = sharding.param(init_in(rngs.params(), (d_model, hidden)), "embed", "mlp")
    self.w_down = sharding.param(init_out(rngs.params(), (hidden, d_model)), "mlp", "embed")

  def __call__(self, x: jax.Array) -> jax.Array:
    dt = self.compute_dtype
    return swiglu(x.astype(dt), self.w_gate[...].astype(dt), self.w_up[...].astype(dt), self.w_down[...].astype(dt))


# ====================================================================== mixture of experts
# DeepSeekMoE / DeepSeek-V3 (arXiv 2401.06066, 2412.19437): shared experts always on, fine-grained routed experts,
# top-k of sigmoid (or softmax) affinities s_{i,t}; selection uses s + b (b: a per-expert bias updated outside the
# gradient from the observed load, eq. 16 and section 2.1.2), gate values use s only and are renormalised (eq. 13).
# T below is the number of tokens (B * S), k the experts per token, C the slots per expert (capacity path).

SCORE_FUNCS = ("sigmoid", "softmax")
DISPATCHES = ("dropless", "capacity")


class MoEBias(nnx.Variable):
  """Per-expert selection bias of aux-loss-free balancing: non-trainable, updated by `update_balance_bias`."""


def validate_moe_config(config: MoEConfig, mesh: Mesh | None = None) -> None:
  """Raises ValueError naming the field and the fix."""
  c = config
  for name in ("num_experts", "top_k", "expert_hidden"):
    if getattr(c, name) < 1:
      raise ValueError(f"MoEConfig.{name}={getattr(c, name)} must be >= 1")
  if c.num_shared_experts < 0:
    raise ValueError(f"MoEConfig.num_shared_experts={c.num_shared_experts} must be >= 0")
  if c.top_k > c.num_experts:
    raise ValueError(f"MoEConfig.top_k={c.top_k} must be <= num_experts={c.num_experts}")
  if c.score_func not in SCORE_FUNCS:
    raise ValueError(f"MoEConfig.score_func={c.score_func!r}; use one of {SCORE_FUNCS}")
  if c.dispatch not in DISPATCHES:
    raise ValueError(f"MoEConfig.dispatch={c.dispatch!r}; use one of {DISPATCHES}")
  if c.dropless_impl not in DROPLESS_IMPLS:
    raise ValueError(f"MoEConfig.dropless_impl={c.dropless_impl!r}; use one of {DROPLESS_IMPLS}")
  if c.capacity_impl not in CAPACITY_IMPLS:
    raise ValueError(f"MoEConfig.capacity_impl={c.capacity_impl!r}; use one of {CAPACITY_IMPLS}")
  if c.capacity_factor <= 0:
    raise ValueError(f"MoEConfig.capacity_factor={c.capacity_factor} must be > 0")
  if c.bias_update_rate < 0 or c.seq_aux_loss_coef < 0:
    raise ValueError("MoEConfig.bias_update_rate and seq_aux_loss_coef must be >= 0")
  if mesh is not None:
    ep, mp = mesh.shape.get("expert", 1), mesh.shape.get("model", 1)
    if c.num_experts % ep:
      raise ValueError(f"MoEConfig.num_experts={c.num_experts} must be divisible by the mesh's 'expert' axis ({ep})")
    if c.expert_hidden % mp or (c.num_shared_experts * c.expert_hidden) % mp:
      raise ValueError(f"MoEConfig.expert_hidden={c.expert_hidden} (and times num_shared_experts) must be divisible "
                       f"by the mesh's 'model' axis ({mp})")
    if c.dispatch == "dropless" and ep > 1:
      raise ValueError(f"MoEConfig.dispatch='dropless' has no expert parallelism (ragged_all_to_all does not run on "
                       f"CPU); the mesh has expert={ep}: use dispatch='capacity' or a mesh with expert=1")


def route(x: jax.Array, w_router: jax.Array, bias: jax.Array, *, top_k: int, score_func: str = "sigmoid",
          norm_topk: bool = True):
  """Top-k routing. x [T, D], w_router [D, E], bias [E] (selection only).

  Returns gate weights [T, k] (from the unbiased scores), expert ids [T, k] int32 and all scores [T, E] (float32).
  """
  logits = jnp.einsum("td,de->te", x.astype(jnp.float32), w_router.astype(jnp.float32))  # [T, E]
  scores = jax.nn.sigmoid(logits) if score_func == "sigmoid" else jax.nn.softmax(logits, axis=-1)
  _, experts = jax.lax.top_k(scores + jax.lax.stop_gradient(bias)[None, :], top_k)  # [T, k]
  weights = jnp.take_along_axis(scores, experts, axis=-1)  # [T, k]
  if norm_topk:
    weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
  return weights, experts.astype(jnp.int32), scores


def expert_counts(experts: jax.Array, num_experts: int, mask: jax.Array | None = None) -> jax.Array:
  """Routed assignments per expert [E] (float32) from expert ids [T, k]; masked-out tokens [T] are not counted."""
  onehot = jax.nn.one_hot(experts, num_experts, dtype=jnp.float32)  # [T, k, E]
  if mask is not None:
    onehot = onehot * mask.astype(jnp.float32)[:, None, None]
  return jnp.sum(onehot, axis=(0, 1))


def update_balance_bias(bias: jax.Array, load: jax.Array, rate: float) -> jax.Array:
  """Aux-loss-free balancing step (DeepSeek-V3 section 2.1.2): b_i += rate * sign(mean(load) - load_i).

  bias [E]; load [E] (counts or fractions; only the sign of the deviation from the mean matters)."""
  load = load.astype(jnp.float32)
  return bias + rate * jnp.sign(jnp.mean(load) - load)


def sequence_aux_loss(scores: jax.Array, experts: jax.Array, mask: jax.Array, top_k: int) -> jax.Array:
  """Sequence-wise balance loss summed over sequences (DeepSeek-V3 eqs. 17-20, without the coefficient).

  scores [B, S, E], experts [B, S, k], mask [B, S]. Per sequence: sum_i f_i P_i with
  f_i = E / (k T) * #{t: i in top-k(t)},  P_i = 1/T sum_t s_{i,t} / sum_j s_{j,t}; T = valid tokens.
  """
  e = scores.shape[-1]
  m = mask.astype(jnp.float32)  # [B, S]
  t = jnp.maximum(jnp.sum(m, axis=1), 1.0)  # [B]
  counts = jnp.sum(jax.nn.one_hot(experts, e, dtype=jnp.float32) * m[..., None, None], axis=(1, 2))  # [B, E]
  f = counts * e / (top_k * t[:, None])
  p = jnp.sum(scores / jnp.sum(scores, axis=-1, keepdims=True) * m[..., None], axis=1) / t[:, None]  # [B, E]
  return jnp.sum(f * p)


def _expert_swiglu(x, w_gate, w_up, w_down):
  """Per-expert SwiGLU on an [E, C, D] buffer with weights [E, D, F], [E, F, D] -> [E, C, D]."""
  h = jax.nn.silu(jnp.einsum("ecd,edf->ecf", x, w_gate)) * jnp.einsum("ecd,edf->ecf", x, w_up)  # [E, C, F]
  return jnp.einsum("ecf,efd->ecd", h, w_down)


DROPLESS_IMPLS = ("blocked", "ragged_dot")


def dropless_experts(x: jax.Array, weights: jax.Array, experts: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                     w_down: jax.Array, impl: str = "blocked", block_rows: int = 128) -> jax.Array:
  """Every assignment computed: sort the T*k assignments by expert, grouped matmuls, unsort, weight and sum.
  x [T, D], weights/experts [T, k], w_gate/w_up [E, D, F], w_down [E, F, D] -> [T, D].

  impl 'blocked': each expert's run of sorted rows is padded to a multiple of block_rows, so every block of
  block_rows rows belongs to one expert and the grouped matmul is a batched matmul over blocks with per-block
  gathered weights (FLOPs ~ T*k + E*block_rows rows). 'ragged_dot': jax.lax.ragged_dot, which XLA:CPU computes
  densely for every expert (E times the FLOPs). Same per-row arithmetic: outputs agree within reassociation.
  """
  t, k = experts.shape
  e = w_gate.shape[0]
  flat = experts.reshape(-1)  # [T*k]
  order = jnp.argsort(flat, stable=True)  # assignment index, grouped by expert
  group_sizes = jnp.bincount(flat, length=e).astype(jnp.int32)  # [E]
  xs = x[order // k]  # [T*k, D]
  with jax.named_scope("moe_experts"):
    if impl == "ragged_dot":
      h = jax.nn.silu(jax.lax.ragged_dot(xs, w_gate, group_sizes)) * jax.lax.ragged_dot(xs, w_up, group_sizes)
      ys = jax.lax.ragged_dot(h, w_down, group_sizes)  # [T*k, D]
    elif impl == "blocked":
      ys = _blocked_swiglu(xs, flat[order], group_sizes, w_gate, w_up, w_down, block_rows)
    else:
      raise ValueError(f"dropless_experts: impl={impl!r}; use one of {DROPLESS_IMPLS}")
  with jax.named_scope("moe_combine"):
    y = jnp.zeros_like(ys).at[order].set(ys).reshape(t, k, -1)  # [T, k, D]
    return jnp.einsum("tkd,tk->td", y, weights.astype(y.dtype))


def _blocked_swiglu(xs, sorted_experts, group_sizes, w_gate, w_up, w_down, block_rows: int):
  """SwiGLU of rows xs [M, D] sorted by expert (sorted_experts [M], group_sizes [E]) -> [M, D], computed on
  blocks of block_rows rows that each hold one expert's rows (zero padding between experts' runs)."""
  m, e = xs.shape[0], w_gate.shape[0]
  b = max(1, min(block_rows, m))
  padded = -(-group_sizes // b) * b  # [E] each run rounded up to whole blocks
  padded_end = jnp.cumsum(padded)  # [E]
  start = jnp.cumsum(group_sizes) - group_sizes  # [E] first sorted row of each expert
  dest = (padded_end - padded)[sorted_experts] + jnp.arange(m, dtype=jnp.int32) - start[sorted_experts]  # [M]
  nb = -(-(m + e * (b - 1)) // b)  # static bound on the blocks
  buf = jnp.zeros((nb * b, xs.shape[1]), xs.dtype).at[dest].set(xs, unique_indices=True)  # [R, D]
  block_expert = jnp.minimum(jnp.searchsorted(padded_end, jnp.arange(nb) * b, side="right"), e - 1)  # [nb]
  xb = buf.reshape(nb, b, -1)  # [nb, b, D]
  hb = jax.nn.silu(jnp.einsum("nbd,ndf->nbf", xb, w_gate[block_expert])) * jnp.einsum(
      "nbd,ndf->nbf", xb, w_up[block_expert])  # [nb, b, F]
  yb = jnp.einsum("nbf,nfd->nbd", hb, w_down[block_expert])  # [nb, b, D]
  return yb.reshape(nb * b, -1)[dest]  # [M, D]


CAPACITY_IMPLS = ("sorted", "onehot")


def capacity_slots(experts: jax.Array, num_experts: int, capacity: int, mask: jax.Array | None = None,
                   impl: str = "sorted"):
  """Slot of every assignment in its expert's buffer, first come first served in (token, k) order.

  experts [T, k] -> (slot [T, k] int32, kept [T, k] bool). Masked-out tokens take no slot (slot 0, not kept);
  assignments with slot >= capacity are dropped. impl 'sorted': a stable sort of the T*k assignments by expert,
  rank = position - start of the expert's run (O(T k log(T k)), no [T*k, E] array); 'onehot': a cumulative sum
  over a one-hot [T*k, E] (O(T k E)). Both give identical slots.
  """
  t, k = experts.shape
  valid = jnp.ones((t, k), bool) if mask is None else jnp.broadcast_to(mask[:, None], (t, k))
  if impl == "onehot":
    onehot = jax.nn.one_hot(experts.reshape(-1), num_experts, dtype=jnp.int32)  # [T*k, E]
    onehot = onehot * valid.reshape(-1, 1)
    position = jnp.cumsum(onehot, axis=0) - 1  # [T*k, E] rank within each expert's queue
    slot = jnp.sum(position * onehot, axis=1).reshape(t, k)  # [T, k]
  elif impl == "sorted":
    key = jnp.where(valid, experts, num_experts).reshape(-1)  # [T*k]; masked tokens queue last, apart
    order = jnp.argsort(key, stable=True)  # [T*k] assignments grouped by expert, (token, k) order kept
    counts = jnp.bincount(key, length=num_experts + 1)  # [E+1]
    starts = jnp.cumsum(counts) - counts  # [E+1] first sorted position of each expert
    rank = jnp.arange(t * k, dtype=jnp.int32) - starts[key[order]].astype(jnp.int32)  # [T*k] in sorted order
    slot = jnp.zeros((t * k,), jnp.int32).at[order].set(rank).reshape(t, k)  # [T, k]
    slot = jnp.where(valid, slot, 0)
  else:
    raise ValueError(f"capacity_slots: impl={impl!r}; use one of {CAPACITY_IMPLS}")
  return slot.astype(jnp.int32), valid & (slot < capacity)


def capacity_experts(x: jax.Array, weights: jax.Array, experts: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                     w_down: jax.Array, capacity: int, mask: jax.Array | None = None,
                     expert_axis: str | None = None, model_axis: str | None = None, slots_impl: str = "sorted"):
  """Fixed-capacity dispatch with optional expert parallelism; call inside shard_map when axes are given.

  x [T, D] local tokens; weights/experts [T, k]; local expert weights [E/ep, D, F/mp], [E/ep, F/mp, D];
  buffers [E, C, D] are exchanged with all_to_all over `expert_axis` and expert outputs summed over `model_axis`.
  Returns (y [T, D], dropped assignments (float32 scalar, local)).
  """
  e = w_gate.shape[0] * (jax.lax.axis_size(expert_axis) if expert_axis else 1)  # all experts
  with jax.named_scope("moe_dispatch"):
    slot, kept = capacity_slots(experts, e, capacity, mask, slots_impl)  # [T, k]
    slot = jnp.where(kept, slot, capacity)  # out of bounds: dropped by the scatter, zero from the gather
    src = jnp.broadcast_to(x[:, None, :], experts.shape + x.shape[-1:])  # [T, k, D]
    buf = jnp.zeros((e, capacity, x.shape[-1]), x.dtype).at[experts, slot].set(src, mode="drop")  # [E, C, D]
    if expert_axis:
      buf = jax.lax.all_to_all(buf, expert_axis, split_axis=0, concat_axis=1, tiled=True)  # [E/ep, ep*C, D]
  with jax.named_scope("moe_experts"):
    out = _expert_swiglu(buf, w_gate, w_up, w_down)  # [E/ep, ep*C, D], partial over model_axis
    if model_axis:
      out = jax.lax.psum(out, model_axis)
  with jax.named_scope("moe_combine"):
    if expert_axis:
      out = jax.lax.all_to_all(out, expert_axis, split_axis=1, concat_axis=0, tiled=True)  # [E, C, D]
    y = out.at[experts, slot].get(mode="fill", fill_value=0)  # [T, k, D]
    y = jnp.einsum("tkd,tk->td", y, (weights * kept).astype(y.dtype))
  valid = jnp.ones(experts.shape, bool) if mask is None else jnp.broadcast_to(mask[:, None], experts.shape)
  dropped = jnp.sum((valid & ~kept).astype(jnp.float32))
  return y, dropped


def capacity_per_expert(tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
  """C = ceil(capacity_factor * tokens * k / E) slots per expert (per source shard)."""
  return max(1, math.ceil(capacity_factor * tokens * top_k / num_experts))


class MoE(nnx.Module):
  """Shared + routed experts: (x [B, S, D], token_mask [B, S] | None) -> (y [B, S, D], metrics).

  metrics: aux_loss (weighted sequence-wise loss, scalar), load [E] (fraction of routed assignments), counts [E],
  dropped / assignments (scalars, float32), bias (the balance bias [E]).
  With a mesh, routing and dispatch run in shard_map over all mesh axes: tokens over the batch axes, experts over
  'expert' (all-to-all of fixed-capacity buffers), expert hidden over 'model' (psum).
  """

  def __init__(self, config: MoEConfig, d_model: int, *, mesh: Mesh | None = None, compute_dtype=jnp.float32,
               rngs: nnx.Rngs):
    validate_moe_config(config, mesh)
    c = config
    self.config, self.mesh, self.compute_dtype = c, mesh, compute_dtype
    e, f = c.num_experts, c.expert_hidden
    init_in = jax.nn.initializers.normal(stddev=d_model ** -0.5)
    init_out = jax.nn.initializers.normal(stddev=f ** -0.5)
    self.w_router = sharding.param(init_in(rngs.params(), (d_model, e)), "embed", None)
    self.bias = MoEBias(jnp.zeros((e,), jnp.float32))
    self.w_gate = sharding.param(init_in(rngs.params(), (e, d_model, f)), "experts", "embed", "expert_mlp")
    self.w_up = sharding.param(init_in(rngs.params(), (e, d_model, f)), "experts", "embed", "expert_mlp")
    self.w_down = sharding.param(init_out(rngs.params(), (e, f, d_model)), "experts", "expert_mlp", "embed")
    # Shared experts: one SwiGLU whose hidden width is the concatenation of the shared experts' widths.
    self.shared = (SwiGLU(d_model, c.num_shared_experts * f, compute_dtype=compute_dtype, rngs=rngs)
                   if c.num_shared_experts else None)

  def _routed(self, x, mask, w_router, bias, w_gate, w_up, w_down, *, expert_axis=None, model_axis=None):
    """Routed experts on local tokens x [B, S, D]; returns y and per-shard statistics (leading dim 1)."""
    c = self.config
    b, s, d = x.shape
    xt = x.reshape(b * s, d)  # [T, D]
    mt = mask.reshape(b * s)  # [T]
    with jax.named_scope("moe_route"):
      weights, experts, scores = route(xt, w_router, bias, top_k=c.top_k, score_func=c.score_func,
                                       norm_topk=c.norm_topk)
      weights = weights * mt[:, None]
    if c.dispatch == "dropless":
      y = dropless_experts(xt, weights, experts, w_gate, w_up, w_down, c.dropless_impl)
      if model_axis:
        y = jax.lax.psum(y, model_axis)
      dropped = jnp.zeros((), jnp.float32)
    else:
      cap = capacity_per_expert(b * s, c.top_k, c.num_experts, c.capacity_factor)
      y, dropped = capacity_experts(xt, weights, experts, w_gate, w_up, w_down, cap, mt, expert_axis, model_axis,
                                    c.capacity_impl)
    counts = expert_counts(experts, c.num_experts, mt)  # [E]
    aux = (sequence_aux_loss(scores.reshape(b, s, -1), experts.reshape(b, s, -1), mask, c.top_k)
           if c.seq_aux_loss_coef > 0 else jnp.zeros((), jnp.float32))
    stats = {"counts": counts[None], "dropped": dropped[None], "assignments": (jnp.sum(mt) * c.top_k)[None],
             "aux_sum": aux[None]}
    return y.reshape(b, s, d), stats

  def __call__(self, x: jax.Array, token_mask: jax.Array | None = None):
    c = self.config
    dt = self.compute_dtype
    x = x.astype(dt)
    b = x.shape[0]
    mask = jnp.ones(x.shape[:2], bool) if token_mask is None else token_mask.astype(bool)  # [B, S]
    params = (self.w_router[...], self.bias[...], self.w_gate[...].astype(dt), self.w_up[...].astype(dt),
              self.w_down[...].astype(dt))
    if self.mesh is None:
      y, stats = self._routed(x, mask, *params)
    else:
      mesh = self.mesh
      batch = sharding.logical_to_spec(("batch",), mesh=mesh)[0]  # mesh axes of the batch (None: replicated)
      ax = lambda name: name if mesh.shape[name] > 1 else None
      ep, mp = ax("expert"), ax("model")
      if x.shape[0] % math.prod(mesh.shape[a] for a in ((batch,) if isinstance(batch, str) else batch or ())):
        raise ValueError(f"MoE: batch {b} is not divisible by the mesh's batch axes {batch}")
      fn = functools.partial(self._routed, expert_axis=ep, model_axis=mp)
      stat_spec = P(batch)
      y, stats = jax.shard_map(
          fn, mesh=mesh,
          in_specs=(P(batch, None, None), P(batch, None), P(), P(), P(ep, None, mp), P(ep, None, mp), P(ep, mp, None)),
          out_specs=(P(batch, None, None), {"counts": stat_spec, "dropped": stat_spec, "assignments": stat_spec,
                                            "aux_sum": stat_spec}),
          check_vma=True)(x, mask, *params)
    y = c.route_scale * y
    if self.shared is not None:
      y = y + self.shared(x)
    counts = jnp.sum(stats["counts"], axis=0)  # [E]
    metrics = {
        "aux_loss": c.seq_aux_loss_coef * jnp.sum(stats["aux_sum"]) / b,
        "load": counts / jnp.maximum(jnp.sum(counts), 1.0),
        "counts": counts,
        "dropped": jnp.sum(stats["dropped"]),
        "assignments": jnp.sum(stats["assignments"]),
        "bias": self.bias[...],
    }
    return y, metrics


def apply_balance_updates(model: nnx.Module, aux: dict, rate: float | None = None) -> None:
  """After a train step, outside the gradient: update every MoE layer's bias from aux['expert_load'] [L_moe, E]
  (rows in the order of `model.moe_layers()`). rate None: each layer's config.bias_update_rate."""
  layers = model.moe_layers()
  loads = aux["expert_load"]
  if len(layers) != loads.shape[0]:
    raise ValueError(f"apply_balance_updates: {len(layers)} MoE layers but expert_load has {loads.shape[0]} rows")
  for layer, load in zip(layers, loads):
    r = layer.config.bias_update_rate if rate is None else rate
    layer.bias[...] = update_balance_bias(layer.bias[...], load, r)
