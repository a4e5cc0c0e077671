"""Decoder-only language model: embed -> blocks [Engram? -> attention -> FFN/MoE] (through hyper-connections)
-> sum of branches -> RMSNorm -> LM head.

Letters: B batch, S sequence, G hyper-connection branches, D width, V vocabulary, L layers, E experts.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from engram_jax import sharding
from engram_jax.layers import hyper_connections
from engram_jax.layers.attention import Attention, KVCache
from engram_jax.layers.moe import MoE, SwiGLU, validate_moe_config
from engram_jax.layers.norms import RMSNorm
from engram_jax.models.config import ModelConfig

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def validate_config(config: ModelConfig, mesh: Mesh | None = None) -> None:
  """Raises ValueError naming the field and the fix for any configuration that cannot be built."""
  c = config
  for name in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "dense_hidden"):
    if getattr(c, name) < 1:
      raise ValueError(f"ModelConfig.{name}={getattr(c, name)} must be >= 1")
  if c.num_heads % c.num_kv_heads:
    raise ValueError(f"ModelConfig.num_heads={c.num_heads} must be a multiple of num_kv_heads={c.num_kv_heads}")
  if c.head_dim % 2:
    raise ValueError(f"ModelConfig.head_dim={c.head_dim} must be even (rotary embeddings rotate pairs)")
  if not 0 <= c.num_dense_layers <= c.num_layers:
    raise ValueError(f"ModelConfig.num_dense_layers={c.num_dense_layers} must lie in [0, num_layers={c.num_layers}]")
  if c.compute_dtype not in COMPUTE_DTYPES:
    raise ValueError(f"ModelConfig.compute_dtype={c.compute_dtype!r}; use one of {sorted(COMPUTE_DTYPES)}")
  if c.hc_expansion < 1:
    raise ValueError(f"ModelConfig.hc_expansion={c.hc_expansion} must be >= 1 (1 = plain residual stream)")
  if c.hc_variant not in hyper_connections.VARIANTS:
    raise ValueError(f"ModelConfig.hc_variant={c.hc_variant!r}; use one of {hyper_connections.VARIANTS}")
  if c.hc_sinkhorn_iters < 1:
    raise ValueError(f"ModelConfig.hc_sinkhorn_iters={c.hc_sinkhorn_iters} must be >= 1")
  bad = [l for l in c.engram_layers if not 0 <= l < c.num_layers]
  if bad:
    raise ValueError(f"ModelConfig.engram_layers={c.engram_layers}: {bad} outside [0, num_layers={c.num_layers})")
  if len(set(c.engram_layers)) != len(c.engram_layers):
    raise ValueError(f"ModelConfig.engram_layers={c.engram_layers} has duplicates; list each layer once")
  if c.engram_layers:
    if c.engram is None:
      raise ValueError("ModelConfig.engram is None but engram_layers is non-empty; set engram=EngramConfig(...)")
    if c.engram.num_branches != c.hc_expansion:
      raise ValueError(f"ModelConfig.engram.num_branches={c.engram.num_branches} must equal "
                       f"hc_expansion={c.hc_expansion} (one Engram gate per residual branch)")
  if c.moe is not None and c.num_dense_layers < c.num_layers:
    validate_moe_config(c.moe, mesh)
  if c.engram_layers and mesh is not None:  # table shapes are mesh-independent: the mesh must split them
    from engram_jax import hashing  # Lazy, as in the model: only Engram models need these.
    from engram_jax.layers.engram import check_table_rows, table_num_rows
    primes = hashing.allocate_primes(c.engram.table_base_sizes, c.engram.heads_per_order, c.engram_layers)
    for layer_id, per_order in primes.items():
      total = sum(p for order in per_order for p in order)
      check_table_rows(table_num_rows(total, c.engram.table_row_multiple), total, c.engram.table_row_multiple, mesh,
                       layer_id)
  if mesh is not None:
    model = mesh.shape.get("model", 1)
    for name in ("num_heads", "num_kv_heads", "dense_hidden", "vocab_size"):
      if getattr(c, name) % model:
        raise ValueError(f"ModelConfig.{name}={getattr(c, name)} must be divisible by the mesh's 'model' axis "
                         f"({model}); change it or the mesh")


def segment_positions(segment_ids: jax.Array) -> jax.Array:
  """Positions that restart at 0 wherever the segment id changes along a row: [B, S] -> [B, S] int32."""
  s = segment_ids.shape[1]
  idx = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), segment_ids.shape)
  starts = jnp.concatenate(
      [jnp.ones_like(segment_ids[:, :1], dtype=bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  return idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)


class Block(nnx.Module):
  """One decoder block on the branch stream h [B, S, G, D]; returns (h', moe metrics or None)."""

  def __init__(self, config: ModelConfig, layer_index: int, mesh: Mesh | None, engram: nnx.Module | None, *,
               rngs: nnx.Rngs):
    c = config
    dt = COMPUTE_DTYPES[c.compute_dtype]
    hc_kw = dict(variant=c.hc_variant, sinkhorn_iters=c.hc_sinkhorn_iters, norm_eps=c.norm_eps)
    self.engram = engram
    self.attn_hc = hyper_connections.HyperConnection(c.d_model, c.hc_expansion, 2 * layer_index, **hc_kw)
    self.attn_norm = RMSNorm(c.d_model, eps=c.norm_eps)
    self.attn = Attention(c.d_model, c.num_heads, c.num_kv_heads, c.head_dim, rope_theta=c.rope_theta,
                          compute_dtype=dt, rngs=rngs)
    self.ffn_hc = hyper_connections.HyperConnection(c.d_model, c.hc_expansion, 2 * layer_index + 1, **hc_kw)
    self.ffn_norm = RMSNorm(c.d_model, eps=c.norm_eps)
    self.is_moe = c.moe is not None and layer_index >= c.num_dense_layers
    if self.is_moe:
      self.ffn = MoE(c.moe, c.d_model, mesh=mesh, compute_dtype=dt, rngs=rngs)
    else:
      self.ffn = SwiGLU(c.d_model, c.dense_hidden, compute_dtype=dt, rngs=rngs)

  def __call__(self, h, tokens, positions, segment_ids, token_mask, hash_ids=None, rows=None, engram_on=True):
    if self.engram is not None:
      y = self.engram(h, tokens, segment_ids=segment_ids, hash_ids=hash_ids, rows=rows)
      if engram_on:  # off: Engram still runs (its gate statistics stay real) but adds nothing to the stream
        h = h + y.astype(h.dtype)
    x, ctx = self.attn_hc.read(h)  # [B, S, D]
    h = self.attn_hc.write(ctx, self.attn(self.attn_norm(x), positions, segment_ids))  # [B, S, G, D]
    return self._ffn(h, token_mask)

  def _ffn(self, h, token_mask):
    x, ctx = self.ffn_hc.read(h)  # [B, S, D]
    metrics = None
    if self.is_moe:
      y, metrics = self.ffn(self.ffn_norm(x), token_mask)
    else:
      y = self.ffn(self.ffn_norm(x))
    return self.ffn_hc.write(ctx, y), metrics  # [B, S, G, D]

  def decode(self, h, tokens, positions, kv_cache: KVCache, engram_cache, hash_ids=None, rows=None,
             segment_ids=None):
    """Incremental form of __call__ (one document per row; segment_ids 0 = padding): (h', kv cache', engram cache')."""
    mask = None if segment_ids is None else segment_ids != 0  # [B, T]
    if self.engram is not None:
      y, engram_cache = self.engram.decode_step(h, tokens, engram_cache, hash_ids=hash_ids, rows=rows,
                                                token_mask=mask)
      h = h + y.astype(h.dtype)  # [B, T, G, D]
    x, ctx = self.attn_hc.read(h)
    y, kv_cache = self.attn.decode(self.attn_norm(x), kv_cache, positions, segment_ids)
    h, _ = self._ffn(self.attn_hc.write(ctx, y), mask)  # padding takes no MoE capacity
    return h, kv_cache, engram_cache


def _block_apply(block, h, tokens, positions, segment_ids, token_mask, hash_ids, rows):
  return block(h, tokens, positions, segment_ids, token_mask, hash_ids, rows)


def _block_apply_engram_off(block, h, tokens, positions, segment_ids, token_mask, hash_ids, rows):
  return block(h, tokens, positions, segment_ids, token_mask, hash_ids, rows, engram_on=False)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeCache:
  """Decoding state: one KV cache per block and one Engram cache (last N-1 ids, conv inputs) per Engram layer."""

  kv: list[KVCache]
  engram: dict[int, Any]

  @property
  def length(self) -> jax.Array:
    """Tokens fed so far (int32 scalar)."""
    return self.kv[0].length


class Decoder(nnx.Module):
  """Decoder LM: (tokens [B, S] int32, ...) -> (logits [B, S, V] float32, aux dict)."""

  def __init__(self, config: ModelConfig, mesh: Mesh | None = None, *, compression: np.ndarray | None = None,
               rngs: nnx.Rngs):
    """compression: Engram's tokenizer-compression map raw id -> compressed id, np.int32 [V] (data, not config:
    one model shape compiles once whatever run directory the map came from); None: the identity map."""
    validate_config(config, mesh)
    c = config
    self.config, self.mesh = c, mesh
    self.compute_dtype = COMPUTE_DTYPES[c.compute_dtype]
    # Initialisation: embeddings N(0, 1); every projection N(0, 1 / fan_in) (in the layer constructors).
    self.embed = sharding.param(jax.random.normal(rngs.params(), (c.vocab_size, c.d_model)), "vocab", "embed")
    engrams = self._build_engram(compression, rngs) if c.engram_layers else {}
    self.blocks = nnx.List([Block(c, i, mesh, engrams.get(i), rngs=rngs) for i in range(c.num_layers)])
    self.final_norm = RMSNorm(c.d_model, eps=c.norm_eps)
    if not c.tie_embeddings:
      self.lm_head = sharding.param(
          jax.random.normal(rngs.params(), (c.d_model, c.vocab_size)) * c.d_model ** -0.5, "embed", "vocab")

  def _build_engram(self, compression, rngs):
    from engram_jax import hashing  # Lazy: only Engram models need it.
    from engram_jax.layers.engram import build_engram_layers
    c = self.config
    if compression is None:
      compression = hashing.identity_compression(c.vocab_size)
    elif np.shape(compression) != (c.vocab_size,):
      raise ValueError(f"Decoder(compression=...): the map has shape {np.shape(compression)}, expected "
                       f"[ModelConfig.vocab_size={c.vocab_size}] (one compressed id per raw id)")
    return build_engram_layers(c.engram, tuple(c.engram_layers), c.d_model, compression, self.mesh, rngs=rngs)

  def _constrain(self, x, *logical):
    if self.mesh is None:
      return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, sharding.logical_to_spec(logical,
                                                                                                  mesh=self.mesh)))

  def __call__(self, tokens: jax.Array, segment_ids: jax.Array | None = None, positions: jax.Array | None = None,
               engram_hash_ids: dict[int, jax.Array] | None = None, engram_rows: dict[int, jax.Array] | None = None,
               *, engram_off: tuple[int, ...] = (), return_hidden: bool = False):
    """tokens [B, S] int32; segment_ids [B, S] (0 = padding, excluded from MoE load statistics; positions
    default to restarting at each segment); engram_hash_ids: per Engram layer, precomputed per-head row ids (else
    hashed in-graph); engram_rows: per Engram layer, the table rows already gathered [B, S, H, d] (the table is
    then not read). engram_off: Engram layers whose output is zeroed (the model then equals one whose value
    projection W_V is zero in those layers). return_hidden: aux also gets 'hidden' [L+1, B, S, D] (the residual
    stream summed over branches: after the embedding, then after each block) and 'engram_gates' {layer: [B, S, G]}
    (per-token gates). Returns logits [B, S, V] float32 and aux (see `_aux`)."""
    c = self.config
    bad = sorted(set(engram_off) - set(c.engram_layers))
    if bad:
      raise ValueError(f"engram_off={tuple(engram_off)}: {bad} are not Engram layers; choose from "
                       f"ModelConfig.engram_layers={tuple(c.engram_layers)}")
    tokens = tokens.astype(jnp.int32)
    if positions is None:
      positions = (jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
                   if segment_ids is None else segment_positions(segment_ids))
    token_mask = None if segment_ids is None else segment_ids != 0
    h = self._embed(tokens)  # [B, S, G, D]
    moe_metrics, gates, hidden, gate_maps = [], [], [jnp.sum(h, axis=2)], {}
    for i, block in enumerate(self.blocks):
      hash_ids = None if engram_hash_ids is None else engram_hash_ids.get(i)
      rows = None if engram_rows is None else engram_rows.get(i)
      if return_hidden and block.engram is not None:
        gate_maps[i] = block.engram.gates(h, tokens, segment_ids, hash_ids, rows)  # [B, S, G]
      fn = _block_apply_engram_off if i in engram_off else _block_apply
      h, metrics = (nnx.remat(fn) if c.remat else fn)(block, h, tokens, positions, segment_ids, token_mask,
                                                       hash_ids, rows)
      h = self._constrain(h, "batch", "sequence", "branches", "embed")
      if return_hidden:
        hidden.append(jnp.sum(h, axis=2))  # [B, S, D]
      if metrics is not None:
        moe_metrics.append(metrics)
      if block.engram is not None:
        gates.append(block.engram.last_gate[...])  # [G] mean gate over the valid tokens of this call
    logits = self._logits(h)
    aux = self._aux(moe_metrics)
    if gates:
      aux["engram_gate_mean"] = jnp.stack(gates)  # [L_engram, G], layers in config.engram_layers' sorted order
    if return_hidden:
      aux["hidden"] = jnp.stack(hidden)  # [L+1, B, S, D]
      aux["engram_gates"] = gate_maps
    return logits, aux

  def _embed(self, tokens):
    c = self.config
    x = self.embed[...][tokens.astype(jnp.int32)]  # [B, S, D]
    h = jnp.broadcast_to(x[:, :, None, :], x.shape[:2] + (c.hc_expansion, c.d_model))  # [B, S, G, D]
    return self._constrain(h.astype(jnp.float32), "batch", "sequence", "branches", "embed")

  def _logits(self, h):
    """Stream h [B, S, G, D] -> sum of branches -> RMSNorm -> LM head -> logits [B, S, V] float32."""
    return self.head(jnp.sum(h, axis=2))

  def head(self, x: jax.Array) -> jax.Array:
    """Final RMSNorm and LM head on a stream summed over branches: x [B, S, D] -> logits [B, S, V] float32
    (applied to an intermediate layer's stream, this is the LogitLens early exit)."""
    c = self.config
    x = self.final_norm(x)  # [B, S, D]
    head = self.embed[...].T * c.d_model ** -0.5 if c.tie_embeddings else self.lm_head[...]  # [D, V]
    dt = self.compute_dtype
    logits = jnp.einsum("bsd,dv->bsv", x.astype(dt), head.astype(dt), preferred_element_type=jnp.float32)
    return self._constrain(logits, "batch", "sequence", "vocab")

  def _aux(self, moe_metrics):
    """Flat dict: moe_aux_loss (weighted, summed over layers), expert_load [L_moe, E] (fractions of routed
    assignments), dropped_fraction (dropped / routed assignments over all MoE layers), balance_bias_norm
    (L2 norm of all balance biases). A dense model reports zeros and an empty [0, 0] load. Engram models add
    engram_gate_mean [L_engram, G] (mean context gate per layer and branch over non-padding tokens)."""
    if not moe_metrics:
      zero = jnp.zeros((), jnp.float32)
      return {"moe_aux_loss": zero, "expert_load": jnp.zeros((0, 0), jnp.float32), "dropped_fraction": zero,
              "balance_bias_norm": zero}
    stack = lambda key: jnp.stack([m[key] for m in moe_metrics])
    return {
        "moe_aux_loss": jnp.sum(stack("aux_loss")),
        "expert_load": stack("load"),
        "dropped_fraction": jnp.sum(stack("dropped")) / jnp.maximum(jnp.sum(stack("assignments")), 1.0),
        "balance_bias_norm": jnp.sqrt(jnp.sum(stack("bias") ** 2)),
    }

  def moe_layers(self) -> list:
    """The MoE modules in layer order (the order of aux['expert_load'] rows)."""
    return [b.ffn for b in self.blocks if b.is_moe]

  # ------------------------------------------------------------------ incremental decoding
  def init_cache(self, batch: int, max_len: int) -> DecodeCache:
    """Empty decoding state for `batch` rows of at most `max_len` tokens."""
    kv = [b.attn.init_cache(batch, max_len) for b in self.blocks]
    engram = {i: b.engram.init_decode_cache(batch, jnp.float32) for i, b in enumerate(self.blocks)
              if b.engram is not None}
    return DecodeCache(kv, engram)

  def decode_step(self, tokens: jax.Array, cache: DecodeCache, positions: jax.Array | None = None,
                  engram_hash_ids: dict[int, jax.Array] | None = None,
                  engram_rows: dict[int, jax.Array] | None = None,
                  segment_ids: jax.Array | None = None) -> tuple[jax.Array, DecodeCache]:
    """Feeds tokens [B, T] (a prompt chunk or T = 1) after the cached ones; returns (logits [B, T, V], cache').

    One document per row. positions default to cache.length + 0..T-1. segment_ids [B, T] (optional): 0 marks
    padding (e.g. the left padding of a ragged batch; give the real tokens positions from 0 and segment id 1):
    no real token attends to a padding slot, and Engram treats padding as the space before a sequence start, so
    a left-padded row decodes like the unpadded one. Feeding a sequence chunk by chunk gives the logits of the
    full pass (exactly so with dropless MoE; the capacity path may drop different assignments).
    """
    return self.decode_part(tokens, cache, 0, len(self.blocks), positions=positions, segment_ids=segment_ids,
                            engram_hash_ids=engram_hash_ids, engram_rows=engram_rows)

  def decode_part(self, tokens: jax.Array, cache: DecodeCache, start: int, stop: int, h: jax.Array | None = None,
                  positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
                  engram_hash_ids: dict[int, jax.Array] | None = None,
                  engram_rows: dict[int, jax.Array] | None = None) -> tuple[jax.Array, DecodeCache]:
    """Blocks [start, stop) of `decode_step` (same arguments): a step split at block boundaries, so table rows
    for a later Engram layer (e.g. gathered from a host-resident table) can arrive while earlier blocks run.

    start == 0 embeds `tokens`; otherwise h [B, T, G, D] is the stream returned by the part before. Returns
    (logits [B, T, V] if stop == num_layers else the stream h [B, T, G, D], cache with blocks [start, stop)
    advanced). cache.length counts a token once every block has been fed it.
    """
    b, t = tokens.shape
    if not 0 <= start < stop <= len(self.blocks):
      raise ValueError(f"decode_part: need 0 <= start < stop <= {len(self.blocks)}, got [{start}, {stop})")
    if (h is None) != (start == 0):
      raise ValueError("decode_part: pass h (the previous part's stream) exactly when start > 0")
    if positions is None:
      positions = jnp.broadcast_to(cache.kv[start].length + jnp.arange(t, dtype=jnp.int32), (b, t))
    if segment_ids is not None:
      segment_ids = segment_ids.astype(jnp.int32)
    if start == 0:
      h = self._embed(tokens)
    kv, engram = list(cache.kv), dict(cache.engram)
    for i in range(start, stop):
      hash_ids = None if engram_hash_ids is None else engram_hash_ids.get(i)
      rows = None if engram_rows is None else engram_rows.get(i)
      h, kv[i], engram_i = self.blocks[i].decode(h, tokens.astype(jnp.int32), positions, kv[i], engram.get(i),
                                                 hash_ids, rows, segment_ids)
      if engram_i is not None:
        engram[i] = engram_i
    return (self._logits(h) if stop == len(self.blocks) else h), DecodeCache(kv, engram)
