"""Causal grouped-query attention with rotary embeddings, packed-row masking and a KV cache.

Letters: B batch, S query length, T key length (cache slots), D width, H query heads, K kv heads,
R query heads per kv head (H = K * R), Dh head width.

Rotary embeddings follow RoFormer (arXiv 2104.09864) in the "rotate half" layout; grouped-query attention
follows arXiv 2305.13245. Causality is by slot index (a key is visible when it was written at or before the
query's slot) and packing by segment ids (a key is visible only from a query of the same segment), so a packed
row equals its documents run separately whenever positions restart at each document.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from engram_jax import sharding

_NEG = -1e30  # Masked logits; finite so a fully masked row yields a uniform (ignored) softmax, never NaN.


def rope_frequencies(head_dim: int, theta: float) -> jax.Array:
  """Inverse frequencies theta^(-2i/Dh) for i < Dh/2.  # [Dh/2]"""
  return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotates x [B, S, H, Dh] by angle positions [B, S] * freq (rotate-half pairing: i with i + Dh/2)."""
  head_dim = x.shape[-1]
  angles = positions.astype(jnp.float32)[..., None] * rope_frequencies(head_dim, theta)  # [B, S, Dh/2]
  sin = jnp.sin(angles)[:, :, None, :]  # [B, S, 1, Dh/2]
  cos = jnp.cos(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)  # [B, S, H, Dh/2] each
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)  # [B, S, H, Dh]
  return out.astype(x.dtype)


def attention_mask(q_slots: jax.Array, k_slots: jax.Array, q_segments: jax.Array, k_segments: jax.Array,
                   k_valid: jax.Array | None = None) -> jax.Array:
  """Boolean [B, S, T]: key slot <= query slot, same segment, and (optionally) the key slot is filled."""
  mask = k_slots[:, None, :] <= q_slots[:, :, None]  # [B, S, T]
  mask &= k_segments[:, None, :] == q_segments[:, :, None]
  if k_valid is not None:
    mask &= k_valid[:, None, :]
  return mask


def gqa_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """softmax(q k^T / sqrt(Dh) + mask) v with q [B, S, H, Dh], k/v [B, T, K, Dh], mask [B, S, T] -> [B, S, H, Dh].

  Logits and softmax run in float32; the weighted sum runs in v's dtype.
  """
  b, s, h, dh = q.shape
  kv = k.shape[2]
  if h % kv:
    raise ValueError(f"gqa_attention: {h} query heads are not a multiple of {kv} kv heads")
  q = q.reshape(b, s, kv, h // kv, dh)  # [B, S, K, R, Dh]
  logits = jnp.einsum("bskrd,btkd->bkrst", q, k, preferred_element_type=jnp.float32) / np.sqrt(dh)
  logits = jnp.where(mask[:, None, None, :, :], logits, _NEG)  # [B, K, R, S, T]
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkrst,btkd->bskrd", probs, v)  # [B, S, K, R, Dh]
  return out.reshape(b, s, h, dh)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
  """Keys and values of the slots decoded so far; slot i holds the i-th token fed since init.

  k, v: [B, T, K, Dh]; segment_ids: [B, T] (0 in unfilled slots); length: int32 scalar, slots filled.
  """

  k: jax.Array
  v: jax.Array
  segment_ids: jax.Array
  length: jax.Array

  @classmethod
  def init(cls, batch: int, max_len: int, num_kv_heads: int, head_dim: int, dtype=jnp.float32) -> "KVCache":
    zeros = jnp.zeros((batch, max_len, num_kv_heads, head_dim), dtype)
    return cls(zeros, zeros, jnp.zeros((batch, max_len), jnp.int32), jnp.zeros((), jnp.int32))


class Attention(nnx.Module):
  """Causal GQA self-attention: x [B, S, D] -> [B, S, D]; RoPE on q and k; packed-row and cache aware."""

  def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, head_dim: int, *, rope_theta: float = 10_000.0,
               compute_dtype=jnp.float32, rngs: nnx.Rngs):
    if num_heads % num_kv_heads:
      raise ValueError(f"Attention: num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
    if head_dim % 2:
      raise ValueError(f"Attention: head_dim={head_dim} must be even for rotary embeddings")
    self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
    self.rope_theta = rope_theta
    self.compute_dtype = compute_dtype
    init = jax.nn.initializers.normal(stddev=d_model ** -0.5)
    out_init = jax.nn.initializers.normal(stddev=(num_heads * head_dim) ** -0.5)
    self.wq = sharding.param(init(rngs.params(), (d_model, num_heads, head_dim)), "embed", "heads", "head_dim")
    self.wk = sharding.param(init(rngs.params(), (d_model, num_kv_heads, head_dim)), "embed", "kv_heads", "head_dim")
    self.wv = sharding.param(init(rngs.params(), (d_model, num_kv_heads, head_dim)), "embed", "kv_heads", "head_dim")
    self.wo = sharding.param(out_init(rngs.params(), (num_heads, head_dim, d_model)), "heads", "head_dim", "embed")

  def _qkv(self, x: jax.Array, positions: jax.Array):
    dt = self.compute_dtype
    x = x.astype(dt)
    q = jnp.einsum("bsd,dhe->bshe", x, self.wq[...].astype(dt))  # [B, S, H, Dh]
    k = jnp.einsum("bsd,dke->bske", x, self.wk[...].astype(dt))  # [B, S, K, Dh]
    v = jnp.einsum("bsd,dke->bske", x, self.wv[...].astype(dt))  # [B, S, K, Dh]
    return apply_rope(q, positions, self.rope_theta), apply_rope(k, positions, self.rope_theta), v

  def _out(self, o: jax.Array) -> jax.Array:
    return jnp.einsum("bshe,hed->bsd", o, self.wo[...].astype(self.compute_dtype))  # [B, S, D]

  def __call__(self, x: jax.Array, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None) -> jax.Array:
    """Full-sequence pass. positions default to 0..S-1; segment_ids default to one segment per row."""
    b, s, _ = x.shape
    slots = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))  # [B, S]
    positions = slots if positions is None else positions
    segment_ids = jnp.ones((b, s), jnp.int32) if segment_ids is None else segment_ids
    q, k, v = self._qkv(x, positions)
    mask = attention_mask(slots, slots, segment_ids, segment_ids)  # [B, S, S]
    return self._out(gqa_attention(q, k, v, mask))

  def init_cache(self, batch: int, max_len: int) -> KVCache:
    return KVCache.init(batch, max_len, self.num_kv_heads, self.head_dim, self.compute_dtype)

  def decode(self, x: jax.Array, cache: KVCache, positions: jax.Array,
             segment_ids: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
    """Feeds x [B, S, D] (S >= 1: prefill or one step) into the cache's next S slots; returns (y, new cache).

    positions [B, S] are the tokens' RoPE positions; segment_ids default to 1. The caller keeps
    cache.length + S <= max_len (writes past the end are clamped by dynamic_update_slice).
    """
    b, s, _ = x.shape
    segment_ids = jnp.ones((b, s), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    q, k, v = self._qkv(x, positions)
    start = cache.length
    new_k = jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), (0, start, 0, 0))  # [B, T, K, Dh]
    new_v = jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), (0, start, 0, 0))
    new_seg = jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids, (0, start))  # [B, T]
    t = cache.k.shape[1]
    k_slots = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))  # [B, T]
    q_slots = jnp.broadcast_to(start + jnp.arange(s, dtype=jnp.int32), (b, s))  # [B, S]
    mask = attention_mask(q_slots, k_slots, segment_ids, new_seg, k_valid=k_slots < start + s)  # [B, S, T]
    y = self._out(gqa_attention(q, new_k.astype(q.dtype), new_v.astype(q.dtype), mask))
    return y, KVCache(new_k, new_v, new_seg, start + s)
