"""The Engram conditional-memory layer (arXiv 2601.07372, section 2) as Flax NNX modules and pure functions.

Per token t (paper section 2: retrieval, context-aware gating, short convolution, multi-branch integration):
  e_t      = concat_{n,k} E[offset_{n,k} + hash_{n,k}(x'_{t-n+1..t})]           retrieval (hashing.py)
  k_t^g    = W_K^g e_t,  v_t = W_V e_t                                          one W_K and gate per branch g
  alpha^g  = sigmoid(ssqrt(RMSNorm(h_t^g) . RMSNorm(k_t^g) / sqrt(D)))          ssqrt(s) = sign(s) sqrt(max(|s|, 1e-6))
  v~^g     = alpha^g v_t
  Y^g      = SiLU(DepthwiseCausalConv(RMSNorm(v~^g))) + v~^g                     kernel 4, dilation N, zero init
The caller adds Y to its residual stream (h <- h + Y). Packed rows: neither the n-grams nor the conv reach across
a document boundary (segment ids). Decoding carries the last N-1 compressed ids and the conv's last inputs.

Table lookup strategies (same outputs and gradients; see `lookup_rows`):
  'take'       GSPMD jnp.take, the table (and so its gradient) pinned to its row sharding;
  'shard_map'  inside shard_map every row shard gathers the rows it owns (others masked to zero) for the ids of
               all batch shards, then partial sums are reduce-scattered back to the batch shards; the gradient is a
               local scatter-add on the owning shard;
  'all_to_all' ids are sent to their owners (fixed capacity per owner; ids over capacity are dropped -> zero rows,
               counted), rows come back by the reverse all_to_all.
No collective scales with the table's size V.

Letters: B batch, S sequence, G branches, D model width, H hash heads ((N - 1) * K), d head_dim, E = H * d memory
width, V table rows, C all_to_all capacity, J conv taps, P conv state length ((J - 1) * dilation).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from engram_jax import hashing, sharding
from engram_jax.layers.engram_config import EngramConfig
from engram_jax.layers.norms import rms_norm


class EngramTable(nnx.Param):
  """A flat Engram embedding table [V, d]; its own type so optimizers can give it its own param group."""


class EngramCompression(nnx.Variable):
  """Raw id -> compressed id map, int32 [V_raw]. Not trainable; saved with checkpoints."""


class EngramDecodeCache(NamedTuple):
  """Decode state of one Engram layer."""

  ids: jax.Array  # [B, N-1] last compressed ids (pad id before the sequence start)
  conv: jax.Array  # [B, P, G, D] last normalised conv inputs (zero before the start)


# ----------------------------------------------------------------------------------------------------------------
# Table lookup strategies
# ----------------------------------------------------------------------------------------------------------------


def _mesh_axes(mesh: Mesh, logical: str, rules: sharding.Rules) -> tuple[str, ...]:
  return tuple(a for a in sharding.mesh_axes(logical, rules) if mesh.shape[a] > 1)


def _size(mesh: Mesh, axes: Sequence[str]) -> int:
  return math.prod(mesh.shape[a] for a in axes)


def _spec(axes: tuple[str, ...]):
  return None if not axes else axes[0] if len(axes) == 1 else axes


def table_row_shards(mesh: Mesh | None, rules: sharding.Rules = sharding.DEFAULT_RULES) -> int:
  """How many row shards a table gets on `mesh` under `rules` (1 without a mesh)."""
  return 1 if mesh is None else _size(mesh, _mesh_axes(mesh, "table_rows", rules))


def table_num_rows(total_rows: int, multiple: int) -> int:
  """Rows of a flat table: its hashed rows padded to EngramConfig.table_row_multiple. Independent of the mesh, so
  a checkpoint moves between meshes; check_table_rows tells whether a mesh can split it."""
  return -(-total_rows // multiple) * multiple


def check_table_rows(num_rows: int, total_rows: int, multiple: int, mesh: Mesh | None, layer_id: int,
                     rules: sharding.Rules = sharding.DEFAULT_RULES) -> None:
  """Raises ValueError (before anything compiles) when the mesh's table-row shards do not divide the table."""
  shards = table_row_shards(mesh, rules)
  if num_rows % shards == 0:
    return
  axes = _mesh_axes(mesh, "table_rows", rules)
  works = [d for d in range(1, 129) if num_rows % d == 0]
  raise ValueError(
      f"the Engram table of layer {layer_id} has {num_rows} rows ({total_rows} hashed rows padded to "
      f"EngramConfig.table_row_multiple={multiple}), which the mesh {dict(mesh.shape)} cannot split: its table-row "
      f"axes {axes} make {shards} shards. Table shapes do not depend on the mesh (a checkpoint moves between "
      f"meshes), so the shard count must divide the rows: meshes whose table-row axes hold "
      f"{', '.join(map(str, works))}{', ...' if num_rows > 128 else ''} devices work. Fix: use such a mesh, or train "
      f"with EngramConfig.table_row_multiple a multiple of {shards} (e.g. {math.lcm(multiple, shards)}).")


def lookup_take(table: jax.Array, rows: jax.Array, mesh: Mesh | None = None,
                rules: sharding.Rules = sharding.DEFAULT_RULES) -> jax.Array:
  """GSPMD baseline: jnp.take with the table pinned to its row sharding, which also pins its gradient's
  sharding (the transpose of a sharding constraint is the same constraint). rows [...] -> [..., d]."""
  if mesh is not None:
    spec = PartitionSpec(_spec(_mesh_axes(mesh, "table_rows", rules)), None)
    table = jax.lax.with_sharding_constraint(table, NamedSharding(mesh, spec))
  return jnp.take(table, rows, axis=0, mode="clip")


def _batch_axes(mesh: Mesh, rows: jax.Array, rules: sharding.Rules, table_axes: tuple[str, ...] | None):
  """Mesh axes the ids' batch dim is split over inside shard_map; () (replicated ids) when B does not divide
  or (for table_axes given) when those axes are not all row axes."""
  axes = _mesh_axes(mesh, "batch", rules)
  if rows.shape[0] % _size(mesh, axes) or (table_axes is not None and not set(axes) <= set(table_axes)):
    return ()
  return axes


def lookup_shard_map(table: jax.Array, rows: jax.Array, mesh: Mesh,
                     rules: sharding.Rules = sharding.DEFAULT_RULES) -> jax.Array:
  """Masked local gather + reduce-scatter inside shard_map. table [V, d] (rows sharded), rows [B, ...] -> [B, ..., d]."""
  table_axes = _mesh_axes(mesh, "table_rows", rules)
  batch_axes = _batch_axes(mesh, rows, rules, table_axes)
  rest_axes = tuple(a for a in table_axes if a not in batch_axes)
  rows_local = table.shape[0] // _size(mesh, table_axes)

  def local(tab, ids):  # tab [V/n, d]; ids [B/b, ...]
    if batch_axes:
      ids = jax.lax.all_gather(ids, batch_axes, axis=0, tiled=True)  # [B, ...]
    lo = jax.lax.axis_index(table_axes) * rows_local if table_axes else 0
    loc = ids - lo
    own = (loc >= 0) & (loc < rows_local)
    # Ids owned elsewhere point past the shard: the gather fills zeros, its transpose (scatter-add) drops them.
    part = jnp.take(tab, jnp.where(own, loc, rows_local), axis=0, mode="fill", fill_value=0)  # [B, ..., d]
    if rest_axes and part.shape[0] % _size(mesh, table_axes) == 0:
      # Reduce-scatter over every row shard, then all-gather the rest: 1/|rest| of the bytes of a psum over rest.
      part = jax.lax.psum_scatter(part, batch_axes + rest_axes, scatter_dimension=0, tiled=True)  # [B/n, ..., d]
      return jax.lax.all_gather(part, rest_axes, axis=0, tiled=True, to="invarying")  # [B/b, ..., d]
    if rest_axes:
      part = jax.lax.psum(part, rest_axes)
    if batch_axes:
      part = jax.lax.psum_scatter(part, batch_axes, scatter_dimension=0, tiled=True)  # [B/b, ..., d]
    return part

  out_spec = PartitionSpec(_spec(batch_axes))
  return jax.shard_map(local, mesh=mesh, in_specs=(PartitionSpec(_spec(table_axes), None), out_spec),
                       out_specs=out_spec, check_vma=True)(table, rows)


def lookup_all_to_all(table: jax.Array, rows: jax.Array, mesh: Mesh, capacity_factor: float = 2.0,
                      rules: sharding.Rules = sharding.DEFAULT_RULES) -> tuple[jax.Array, jax.Array]:
  """Id exchange: each batch shard sends its ids to their owning row shard (C slots per owner), owners gather,
  rows return by the reverse all_to_all. Ids beyond capacity read zeros. rows [B, ...] -> ([B, ..., d], dropped),
  dropped = number of ids (over the whole batch) that did not fit."""
  table_axes = _mesh_axes(mesh, "table_rows", rules)
  batch_axes = _batch_axes(mesh, rows, rules, None)
  n = _size(mesh, table_axes)
  rows_local = table.shape[0] // n

  def local(tab, ids):  # tab [V/n, d]; ids [B/b, ...]
    flat = ids.reshape(-1)  # [M]
    m = flat.shape[0]
    cap = max(1, math.ceil(capacity_factor * m / n))
    dest = jnp.clip(flat // rows_local, 0, n - 1)  # [M] owning shard
    # slot = how many earlier ids go to the same owner (first come, first served), via a stable sort: O(M) memory.
    order = jnp.argsort(dest, stable=True)  # [M]
    counts = jnp.bincount(dest, length=n)  # [n]
    starts = jnp.cumsum(counts) - counts  # [n]
    slot = jnp.zeros((m,), jnp.int32).at[order].set(jnp.arange(m, dtype=jnp.int32) - starts[dest[order]])  # [M]
    keep = slot < cap
    send = jnp.zeros((n, cap), jnp.int32).at[dest, jnp.where(keep, slot, cap)].set(
        flat - dest * rows_local, mode="drop")  # [n, C] local row ids per owner
    if table_axes:
      send = jax.lax.all_to_all(send, table_axes, 0, 0, tiled=True)  # [n, C] ids requested by each source
    got = jnp.take(tab, send, axis=0, mode="clip")  # [n, C, d]
    if table_axes:
      got = jax.lax.all_to_all(got, table_axes, 0, 0, tiled=True)  # [n, C, d] answers from each owner
    out = got[dest, jnp.minimum(slot, cap - 1)]  # [M, d]
    out = jnp.where(keep[:, None], out, jnp.zeros((), out.dtype))
    dropped = jnp.sum(~keep).astype(jnp.int32)
    if batch_axes:
      dropped = jax.lax.psum(dropped, batch_axes)
    return out.reshape(ids.shape + (tab.shape[-1],)), dropped

  # check_vma=False: the output is equal across the non-batch axes by construction (not provable by the type
  # system). The table's spec names its size-1 axes too, so the backward has no psum over them (with check_vma off
  # an unnamed axis would all-reduce a whole table shard, even over a group of one device).
  spec = PartitionSpec(_spec(batch_axes))
  table_spec = PartitionSpec(_spec(tuple(sharding.mesh_axes("table_rows", rules))), None)
  return jax.shard_map(local, mesh=mesh, in_specs=(table_spec, spec),
                       out_specs=(spec, PartitionSpec()), check_vma=False)(table, rows)


def lookup_rows(table: jax.Array, rows: jax.Array, strategy: str, mesh: Mesh | None = None, *,
                capacity_factor: float = 2.0, rules: sharding.Rules = sharding.DEFAULT_RULES
                ) -> tuple[jax.Array, jax.Array]:
  """Dispatch to a lookup strategy: rows [B, ...] -> ([B, ..., d], dropped ids). Without a mesh: a local take."""
  if mesh is None or strategy == "take":
    return lookup_take(table, rows, mesh, rules), jnp.zeros((), jnp.int32)
  if strategy == "shard_map":
    return lookup_shard_map(table, rows, mesh, rules), jnp.zeros((), jnp.int32)
  if strategy == "all_to_all":
    return lookup_all_to_all(table, rows, mesh, capacity_factor, rules)
  raise ValueError(f"lookup strategy must be one of 'take', 'shard_map', 'all_to_all'; got {strategy!r}")


# ----------------------------------------------------------------------------------------------------------------
# Gate and short convolution (pure functions)
# ----------------------------------------------------------------------------------------------------------------


def signed_sqrt(s: jax.Array, floor: float = 1e-6) -> jax.Array:
  """sign(s) * sqrt(max(|s|, floor)) (the demo's stabiliser before the gate's sigmoid)."""
  return jnp.sign(s) * jnp.sqrt(jnp.maximum(jnp.abs(s), floor))


def context_gate(h: jax.Array, k: jax.Array, h_scale: jax.Array, k_scale: jax.Array, eps: float = 1e-6
                 ) -> jax.Array:
  """alpha = sigmoid(ssqrt(RMSNorm(h) . RMSNorm(k) / sqrt(D))) per branch. h, k [B, S, G, D] -> [B, S, G] (f32)."""
  hn = rms_norm(h.astype(jnp.float32), h_scale, eps)
  kn = rms_norm(k.astype(jnp.float32), k_scale, eps)
  s = jnp.einsum("bsgd,bsgd->bsg", hn, kn) / math.sqrt(h.shape[-1])
  return jax.nn.sigmoid(signed_sqrt(s))


def short_conv(x: jax.Array, weight: jax.Array, norm_scale: jax.Array, dilation: int,
               segment_ids: jax.Array | None = None, state: jax.Array | None = None, eps: float = 1e-6
               ) -> tuple[jax.Array, jax.Array]:
  """SiLU(causal depthwise conv(RMSNorm(x))): out_t = SiLU(sum_j w_j * xn_{t - j*dilation}), taps that fall
  before the row start, the conv state or the token's document contribute zero.

  x [B, S, G, D]; weight [J, G, D] (w_0 multiplies the current token); norm_scale [G, D];
  segment_ids [B, S] or None; state [B, P, G, D] (decode: the last P normalised inputs) or None.
  Returns (out [B, S, G, D], new state [B, P, G, D]).
  """
  taps = weight.shape[0]
  p = (taps - 1) * dilation
  b, s = x.shape[:2]
  xn = rms_norm(x, norm_scale, eps)  # [B, S, G, D]
  if state is None:
    state = jnp.zeros((b, p) + x.shape[2:], xn.dtype)
  elif segment_ids is not None:
    raise ValueError("short_conv: pass either state (decode) or segment_ids (packed rows), not both")
  xc = jnp.concatenate([state.astype(xn.dtype), xn], axis=1)  # [B, P+S, G, D]
  seg = None
  if segment_ids is not None:
    seg = jnp.concatenate([jnp.full((b, p), -1, jnp.int32), segment_ids.astype(jnp.int32)], axis=1)  # [B, P+S]
  out = jnp.zeros(x.shape, jnp.float32)
  for j in range(taps):
    lo = p - j * dilation
    tap = xc[:, lo:lo + s]  # [B, S, G, D] = xn_{t - j*dilation}
    if seg is not None:
      tap = jnp.where((seg[:, lo:lo + s] == segment_ids)[:, :, None, None], tap, jnp.zeros((), tap.dtype))
    out = out + tap.astype(jnp.float32) * weight[j].astype(jnp.float32)
  return jax.nn.silu(out).astype(x.dtype), xc[:, xc.shape[1] - p:]


# ----------------------------------------------------------------------------------------------------------------
# The functional core: one place for the equations, called by the NNX module and the Linen module
# ----------------------------------------------------------------------------------------------------------------

# Parameter names of one layer (the NNX attributes, the Linen params and the converters' JAX side use these).
# The core below reads all but the table (retrieval happens before it); biases exist with EngramConfig.projection_bias.
PARAM_NAMES = ("table", "value_proj", "key_proj", "gate_norm_h", "gate_norm_k", "conv_norm", "conv_weight")
BIAS_NAMES = ("value_bias", "key_bias")
GATE_NAMES = ("key_proj", "gate_norm_h", "gate_norm_k", "key_bias")  # absent with EngramConfig.gate=False
CONV_NAMES = ("conv_norm", "conv_weight")  # absent with EngramConfig.short_conv=False


def param_names(config: EngramConfig) -> tuple[str, ...]:
  """Every parameter of a layer with this config."""
  names = PARAM_NAMES + (BIAS_NAMES if config.projection_bias else ())
  drop = (() if config.gate else GATE_NAMES) + (() if config.short_conv else CONV_NAMES)
  return tuple(n for n in names if n not in drop)


def ablated_spec(spec: hashing.HashSpec, config: EngramConfig) -> hashing.HashSpec:
  """The hash spec a layer uses: with EngramConfig.single_row_table every head's modulus is 1 (all ids -> row 0)."""
  if not config.single_row_table:
    return spec
  return dataclasses.replace(spec, primes=tuple((1,) * len(order) for order in spec.primes))


def gate_and_value(params: Mapping[str, jax.Array], h: jax.Array, e: jax.Array, eps: float
                   ) -> tuple[jax.Array, jax.Array]:
  """k^g = W_K^g e (+ b_K^g), v = W_V e (+ b_V), alpha^g = context gate (norm epsilon `eps`); without key_proj
  (EngramConfig.gate=False) alpha = 1. h [B, S, G, D], e [B, S, E] -> (alpha [B, S, G] f32, v [B, S, D])."""
  dt = h.dtype
  e = e.astype(dt)  # [B, S, E]
  v = jnp.einsum("bse,ed->bsd", e, params["value_proj"].astype(dt))  # [B, S, D]
  if params.get("value_bias") is not None:
    v = v + params["value_bias"].astype(dt)  # [D]
  if params.get("key_proj") is None:
    return jnp.ones(h.shape[:3], jnp.float32), v
  k = jnp.einsum("bse,ged->bsgd", e, params["key_proj"].astype(dt))  # [B, S, G, D]
  if params.get("key_bias") is not None:
    k = k + params["key_bias"].astype(dt)  # [G, D]
  alpha = context_gate(h, k, params["gate_norm_h"], params["gate_norm_k"], eps)  # [B, S, G]
  return alpha, v


def engram_update(params: Mapping[str, jax.Array], h: jax.Array, e: jax.Array, *, dilation: int, gate_eps: float,
                  conv_eps: float, segment_ids: jax.Array | None = None, conv_state: jax.Array | None = None,
                  token_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The residual update from retrieved memory: gate, value, short conv.

  h [B, S, G, D]; e [B, S, E] (retrieved rows, concatenated); segment_ids [B, S] or None; conv_state [B, P, G, D]
  (decode) or None; token_mask [B, S] bool or None (False: padding, which feeds the conv zeros as before a sequence
  start, since RMSNorm(0) = 0) -> (Y [B, S, G, D] in h.dtype, alpha [B, S, G] f32, new conv state [B, P, G, D]).
  """
  dt = h.dtype
  alpha, v = gate_and_value(params, h, e, gate_eps)  # [B, S, G], [B, S, D]
  vt = alpha.astype(dt)[..., None] * v[:, :, None, :]  # [B, S, G, D]
  if token_mask is not None:
    vt = jnp.where(token_mask[:, :, None, None], vt, jnp.zeros((), dt))
  if params.get("conv_weight") is None:  # EngramConfig.short_conv=False: Y = v~, no conv state
    return vt, alpha, jnp.zeros(vt.shape[:1] + (0,) + vt.shape[2:], dt)
  conv, new_state = short_conv(vt, params["conv_weight"], params["conv_norm"], dilation, segment_ids, conv_state,
                               conv_eps)
  return (vt + conv).astype(dt), alpha, new_state


def mean_gate(alpha: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
  """Mean gate per branch over the real tokens (segment id > 0 when given): alpha [B, S, G] -> [G] f32."""
  if segment_ids is None:
    return jnp.mean(alpha, axis=(0, 1))
  valid = (segment_ids > 0).astype(jnp.float32)[..., None]  # [B, S, 1]
  return jnp.sum(alpha * valid, axis=(0, 1)) / jnp.maximum(jnp.sum(valid), 1.0)


# ----------------------------------------------------------------------------------------------------------------
# The module
# ----------------------------------------------------------------------------------------------------------------


def _concrete(x) -> bool:
  """True for a value known now (numpy or a committed jax array), False under tracing."""
  return not isinstance(x, jax.core.Tracer)


class Engram(nnx.Module):
  """One Engram layer: hash -> table lookup -> per-branch context gate -> short conv. Returns the residual update.

  Build several with `build_engram_layers` (primes unique across layers); a lone layer builds its own hash spec.
  Without a mesh the lookup is a local take whatever `config.lookup` says.
  """

  def __init__(self, config: EngramConfig, d_model: int, compression: np.ndarray, *, layer_id: int = 0,
               hash_spec: hashing.HashSpec | None = None, mesh: Mesh | None = None,
               rules: sharding.Rules = sharding.DEFAULT_RULES, rngs: nnx.Rngs):
    if d_model < 1:
      raise ValueError(f"d_model must be >= 1, got {d_model}")
    compression = hashing.check_compression(compression)
    if not 0 <= config.pad_id < compression.size:
      raise ValueError(f"EngramConfig.pad_id={config.pad_id} is outside the raw vocabulary [0, {compression.size}) "
                       "of the compression map; set pad_id to the tokenizer's pad id")
    vocab = hashing.compressed_vocab_size(compression)
    if hash_spec is None:
      hash_spec = hashing.make_hash_specs(
          max_ngram=config.max_ngram, heads_per_order=config.heads_per_order,
          table_base_sizes=config.table_base_sizes, seed=config.seed, hash_bits=config.hash_bits,
          layer_ids=[layer_id], vocab_size=vocab, pad_id=int(compression[config.pad_id]))[layer_id]
      hash_spec = ablated_spec(hash_spec, config)
    if (hash_spec.max_ngram, hash_spec.heads_per_order, hash_spec.vocab_size) != (
        config.max_ngram, config.heads_per_order, vocab):
      raise ValueError("hash_spec does not match the config / compression (max_ngram, heads_per_order, vocab size); "
                       "build layers with build_engram_layers")
    if mesh is not None and config.lookup != "take":
      table_axes = _mesh_axes(mesh, "table_rows", rules)
      if config.lookup == "shard_map" and not set(_mesh_axes(mesh, "batch", rules)) <= set(table_axes):
        raise ValueError(f"EngramConfig.lookup='shard_map' needs the batch mesh axes inside the table_rows axes "
                         f"{table_axes}; change the sharding rules or use lookup='take'")
    self.config = config
    self.d_model = d_model
    self.spec = hash_spec
    self.mesh = mesh
    self.rules = tuple(rules)
    self.layer_id = hash_spec.layer_id
    self.offsets = tuple(int(o) for o in hash_spec.offsets)  # [H] static
    g, e = config.num_branches, config.memory_width
    self.num_rows = table_num_rows(hash_spec.total_rows, config.table_row_multiple)  # rows past total_rows: unread
    check_table_rows(self.num_rows, hash_spec.total_rows, config.table_row_multiple, mesh, layer_id, rules)

    # Initialisation, all in one place: table ~ N(0, std^2) (padding rows past total_rows, never read, 0);
    # projections ~ N(0, 1/E) (lecun normal), biases 0; norm scales 1; conv weights 0 (the conv branch starts as
    # identity: Y = v~).
    k_table, k_val, k_key = rngs.params(), rngs.params(), rngs.params()
    f32 = jnp.float32  # params stay float32 even with jax x64 on (hash_bits=64)
    self.compression = EngramCompression(jnp.asarray(compression))
    rows = config.table_init_std * jax.random.normal(k_table, (self.num_rows, config.head_dim), f32)
    rows = jnp.where(jnp.arange(self.num_rows)[:, None] < hash_spec.total_rows, rows, 0.0)  # [V, d]
    table = sharding.param(rows, "table_rows", "table_dim")
    self.table = EngramTable(table.get_value(), **table.get_metadata())
    self.value_proj = sharding.param(jax.random.normal(k_val, (e, d_model), f32) / math.sqrt(e), None, "embed")
    if config.gate:  # (k_key is drawn either way: the ablation leaves every other parameter's init unchanged)
      self.key_proj = sharding.param(jax.random.normal(k_key, (g, e, d_model), f32) / math.sqrt(e),
                                     "branches", None, "embed")
      self.gate_norm_h = sharding.param(jnp.ones((g, d_model), f32), "branches", "embed")
      self.gate_norm_k = sharding.param(jnp.ones((g, d_model), f32), "branches", "embed")
    if config.short_conv:
      self.conv_norm = sharding.param(jnp.ones((g, d_model), f32), "branches", "embed")
      self.conv_weight = sharding.param(jnp.zeros((config.kernel_size, g, d_model), f32), None, "branches", "embed")
    if config.projection_bias:
      self.value_bias = sharding.param(jnp.zeros((d_model,), f32), "embed")
      if config.gate:
        self.key_bias = sharding.param(jnp.zeros((g, d_model), f32), "branches", "embed")
    self.last_gate = nnx.Intermediate(jnp.zeros((g,), jnp.float32))  # mean gate per branch of the last call
    self.last_dropped = nnx.Intermediate(jnp.zeros((), jnp.int32))  # ids dropped by the all_to_all lookup

  # -- pieces --------------------------------------------------------------------------------------------------

  @property
  def dilation(self) -> int:
    return self.config.max_ngram

  @property
  def conv_state_len(self) -> int:
    return (self.config.kernel_size - 1) * self.dilation if self.config.short_conv else 0

  def compress(self, token_ids: jax.Array) -> jax.Array:
    """Raw ids [B, S] -> compressed ids [B, S] (out-of-range ids are clipped; check them on the host)."""
    return jnp.take(self.compression[...], token_ids, mode="clip")

  def hash(self, token_ids: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    """Raw ids [B, S] -> per-head local row ids [B, S, H] (same as hashing.hash_ngrams_np on the host)."""
    return hashing.hash_ngrams_jnp(self.compress(token_ids), segment_ids, self.spec)

  def flat_rows(self, hash_ids: jax.Array) -> jax.Array:
    """Per-head local rows [B, S, H] -> rows of the flat table [B, S, H] int32 (head offsets added)."""
    return hash_ids.astype(jnp.int32) + jnp.asarray(self.offsets, jnp.int32)

  def retrieve(self, hash_ids: jax.Array) -> jax.Array:
    """Per-head local rows [B, S, H] -> e [B, S, E] (table dtype)."""
    rows = self.flat_rows(hash_ids)  # [B, S, H]
    e, dropped = lookup_rows(self.table[...], rows, self.config.lookup, self.mesh,
                             capacity_factor=self.config.all_to_all_capacity_factor, rules=self.rules)
    self.last_dropped.set_value(dropped)
    return e.reshape(rows.shape[:2] + (-1,))  # [B, S, E]

  def _check_h(self, h: jax.Array, token_ids: jax.Array) -> None:
    if h.ndim != 4 or h.shape[2:] != (self.config.num_branches, self.d_model):
      raise ValueError(f"Engram expects h [B, S, G={self.config.num_branches}, D={self.d_model}], got {h.shape}; "
                       "EngramConfig.num_branches must equal the hyper-connection expansion")
    if token_ids.shape != h.shape[:2]:
      raise ValueError(f"token_ids {token_ids.shape} must be [B, S] = {h.shape[:2]}")
    if _concrete(token_ids) and token_ids.size and not 0 <= int(jnp.min(token_ids)) <= int(jnp.max(token_ids)) < (
        self.compression[...].shape[0]):
      raise ValueError(f"token_ids must lie in the raw vocabulary [0, {self.compression[...].shape[0]}) of the "
                       "compression map")

  def _check_hash_ids(self, hash_ids: jax.Array, token_ids: jax.Array) -> None:
    if hash_ids.shape != token_ids.shape + (self.spec.num_heads,):
      raise ValueError(f"hash_ids {hash_ids.shape} must be [B, S, H={self.spec.num_heads}]")
    if _concrete(hash_ids) and hash_ids.size and (
        (np.asarray(hash_ids) < 0) | (np.asarray(hash_ids) >= self.spec.head_sizes)).any():
      raise ValueError("hash_ids must be per-head local rows in [0, prime of the head) (hashing.hash_ngrams_np), "
                       "not rows of the flat table")

  def _check_rows(self, rows: jax.Array, token_ids: jax.Array) -> None:
    want = token_ids.shape + (self.spec.num_heads, self.config.head_dim)
    if rows.shape != want:
      raise ValueError(f"rows {rows.shape} must be the gathered table rows [B, S, H, d] = {want} "
                       "(table[flat_rows(hash_ids)])")

  def _embeddings(self, h: jax.Array, token_ids: jax.Array, segment_ids: jax.Array | None,
                  hash_ids: jax.Array | None, rows: jax.Array | None) -> jax.Array:
    """e [B, S, E]: the given rows, else rows looked up for the given (or in-graph) hash ids."""
    self._check_h(h, token_ids)
    if rows is not None:
      self._check_rows(rows, token_ids)
      return rows.reshape(rows.shape[:2] + (-1,))  # [B, S, E]
    if hash_ids is None:
      hash_ids = self.hash(token_ids, segment_ids)
    else:
      self._check_hash_ids(hash_ids, token_ids)
    return self.retrieve(hash_ids)

  def core_weights(self) -> dict[str, jax.Array]:
    """The parameters the functional core reads (all but the table), as plain arrays keyed by name."""
    return {name: getattr(self, name)[...] for name in param_names(self.config) if name != "table"}

  def _gate_and_value(self, h: jax.Array, e: jax.Array) -> tuple[jax.Array, jax.Array]:
    return gate_and_value(self.core_weights(), h, e, self.config.gate_eps)

  def _apply(self, h: jax.Array, e: jax.Array, segment_ids: jax.Array | None,
             conv_state: jax.Array | None, token_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    y, alpha, new_state = engram_update(self.core_weights(), h, e, dilation=self.dilation,
                                        gate_eps=self.config.gate_eps, conv_eps=self.config.conv_eps,
                                        segment_ids=segment_ids, conv_state=conv_state, token_mask=token_mask)
    self.last_gate.set_value(mean_gate(alpha, segment_ids))
    return y, new_state

  # -- public API ------------------------------------------------------------------------------------------------

  def __call__(self, h: jax.Array, token_ids: jax.Array, segment_ids: jax.Array | None = None,
               hash_ids: jax.Array | None = None, rows: jax.Array | None = None) -> jax.Array:
    """h [B, S, G, D], token_ids [B, S] raw ids, segment_ids [B, S] (0 = pad) or None, hash_ids [B, S, H]
    (per-head local rows from hashing.hash_ngrams_np, optional), rows [B, S, H, d] (optional: the table rows
    already gathered, e.g. from a host-resident table or as the leaves of a row-sparse gradient; the table is
    then not read) -> residual update Y [B, S, G, D] in h.dtype."""
    e = self._embeddings(h, token_ids, segment_ids, hash_ids, rows)
    y, _ = self._apply(h, e, segment_ids, None)
    return y

  def gates(self, h: jax.Array, token_ids: jax.Array, segment_ids: jax.Array | None = None,
            hash_ids: jax.Array | None = None, rows: jax.Array | None = None) -> jax.Array:
    """Per-token gate values alpha [B, S, G] (float32) of the same inputs as __call__ (for gate pictures)."""
    return self._gate_and_value(h, self._embeddings(h, token_ids, segment_ids, hash_ids, rows))[0]

  def init_decode_cache(self, batch_size: int, dtype=jnp.float32) -> EngramDecodeCache:
    """Empty decode state: pad ids and zero conv inputs (as before a sequence start)."""
    n, g = self.config.max_ngram, self.config.num_branches
    return EngramDecodeCache(ids=jnp.full((batch_size, n - 1), self.spec.pad_id, jnp.int32),
                             conv=jnp.zeros((batch_size, self.conv_state_len, g, self.d_model), dtype))

  def decode_step(self, h: jax.Array, token_ids: jax.Array, cache: EngramDecodeCache, *,
                  hash_ids: jax.Array | None = None, rows: jax.Array | None = None,
                  token_mask: jax.Array | None = None) -> tuple[jax.Array, EngramDecodeCache]:
    """h [B, T, G, D], token_ids [B, T] (T = 1 per step; T > 1 prefills a chunk) -> (Y [B, T, G, D], new cache).
    Feeding a sequence chunk by chunk gives the full pass's output. hash_ids [B, T, H] (optional): rows hashed on
    the host (e.g. to prefetch them) with the same history; rows [B, T, H, d] (optional): those rows gathered.
    token_mask [B, T] (optional, bool): False marks padding (e.g. left padding of a ragged batch); a padding token
    counts as the pad id in the n-gram history and feeds the conv zeros, so padding before a sequence leaves the
    state of a fresh cache and the padded row decodes exactly like the unpadded one."""
    self._check_h(h, token_ids)
    cids = self.compress(token_ids)  # [B, T]
    if token_mask is not None:
      cids = jnp.where(token_mask, cids, jnp.asarray(self.spec.pad_id, cids.dtype))
    if rows is None and hash_ids is None:
      hash_ids = hashing.hash_ngrams_jnp(cids, None, self.spec, history=cache.ids)  # [B, T, H]
    e = self._embeddings(h, token_ids, None, hash_ids, rows)  # [B, T, E]
    y, conv = self._apply(h, e, None, cache.conv, token_mask)
    ids = jnp.concatenate([cache.ids, cids], axis=1)[:, -(self.config.max_ngram - 1):]  # [B, N-1]
    return y, EngramDecodeCache(ids=ids, conv=conv.astype(cache.conv.dtype))


def build_engram_layers(config: EngramConfig, layer_ids: Sequence[int], d_model: int, compression: np.ndarray,
                        mesh: Mesh | None = None, *, rngs: nnx.Rngs,
                        rules: sharding.Rules = sharding.DEFAULT_RULES) -> dict[int, Engram]:
  """One Engram per layer id, with primes allocated jointly (unique across all layers). The modules are not
  placed on the mesh; call sharding.shard_module on the model that holds them."""
  compression = hashing.check_compression(compression)
  if not 0 <= config.pad_id < compression.size:
    raise ValueError(f"EngramConfig.pad_id={config.pad_id} is outside the raw vocabulary [0, {compression.size}); "
                     "set pad_id to the tokenizer's pad id")
  layer_ids = [int(l) for l in layer_ids]
  specs = hashing.make_hash_specs(
      max_ngram=config.max_ngram, heads_per_order=config.heads_per_order, table_base_sizes=config.table_base_sizes,
      seed=config.seed, hash_bits=config.hash_bits, layer_ids=layer_ids,
      vocab_size=hashing.compressed_vocab_size(compression), pad_id=int(compression[config.pad_id]))
  return {l: Engram(config, d_model, compression, layer_id=l, hash_spec=ablated_spec(specs[l], config), mesh=mesh,
                    rules=rules, rngs=rngs) for l in layer_ids}
