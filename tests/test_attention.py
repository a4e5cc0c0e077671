"""Attention: NumPy reference, RoPE relativity, packed rows, KV-cache decode equals the full pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from engram_jax.layers import attention

D, H, KV, DH = 16, 4, 2, 8


def _np_rope(x, pos, theta):
  """x [B, S, H, Dh], pos [B, S]: rotate pairs (i, i + Dh/2) by pos * theta^(-2i/Dh)."""
  half = x.shape[-1] // 2
  freq = theta ** (-np.arange(half) * 2.0 / x.shape[-1])
  ang = pos[..., None, None] * freq  # [B, S, 1, half]
  a, b = x[..., :half], x[..., half:]
  return np.concatenate([a * np.cos(ang) - b * np.sin(ang), b * np.cos(ang) + a * np.sin(ang)], -1)


def _np_attention(x, wq, wk, wv, wo, pos, seg, theta=10_000.0):
  """Plain loops over batch, heads and queries."""
  q = _np_rope(np.einsum("bsd,dhe->bshe", x, wq), pos, theta)
  k = _np_rope(np.einsum("bsd,dhe->bshe", x, wk), pos, theta)
  v = np.einsum("bsd,dhe->bshe", x, wv)
  b_, s_, h_, dh = q.shape
  group = h_ // k.shape[2]
  out = np.zeros_like(q)
  for b in range(b_):
    for h in range(h_):
      for i in range(s_):
        visible = [j for j in range(i + 1) if seg[b, j] == seg[b, i]]
        logits = np.array([q[b, i, h] @ k[b, j, h // group] / np.sqrt(dh) for j in visible])
        p = np.exp(logits - logits.max())
        p /= p.sum()
        out[b, i, h] = sum(pj * v[b, j, h // group] for pj, j in zip(p, visible))
  return np.einsum("bshe,hed->bsd", out, wo)


@pytest.fixture(scope="module")
def attn():
  return attention.Attention(D, H, KV, DH, rngs=nnx.Rngs(0))


def _weights(a):
  return [np.asarray(w[...], np.float64) for w in (a.wq, a.wk, a.wv, a.wo)]


def test_matches_numpy_reference_with_segments_and_positions(attn):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 7, D)).astype(np.float32)
  seg = np.array([[1, 1, 1, 2, 2, 2, 2], [3, 3, 3, 3, 3, 0, 0]], np.int32)
  pos = np.array([[0, 1, 2, 0, 1, 2, 3], [0, 1, 2, 3, 4, 0, 1]], np.int32)
  got = attn(jnp.asarray(x), jnp.asarray(pos), jnp.asarray(seg))
  want = _np_attention(x.astype(np.float64), *_weights(attn), pos, seg)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
  rng = np.random.default_rng(1)
  q = jnp.asarray(rng.normal(size=(1, 1, 1, DH)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(1, 1, 1, DH)), jnp.float32)
  score = lambda m, n: float(jnp.sum(attention.apply_rope(q, jnp.array([[m]]), 1e4) *
                                     attention.apply_rope(k, jnp.array([[n]]), 1e4)))
  assert score(5, 2) == pytest.approx(score(105, 102), rel=1e-4)
  assert score(5, 2) != pytest.approx(score(5, 3), rel=1e-3)
  # Position 0 is the identity rotation.
  np.testing.assert_array_equal(np.asarray(attention.apply_rope(q, jnp.array([[0]]), 1e4)), np.asarray(q))


def test_packed_row_equals_documents_run_separately(attn):
  rng = np.random.default_rng(2)
  doc_a = rng.normal(size=(1, 3, D)).astype(np.float32)
  doc_b = rng.normal(size=(1, 5, D)).astype(np.float32)
  packed = jnp.asarray(np.concatenate([doc_a, doc_b], axis=1))
  seg = jnp.array([[1, 1, 1, 2, 2, 2, 2, 2]])
  pos = jnp.array([[0, 1, 2, 0, 1, 2, 3, 4]])
  got = attn(packed, pos, seg)
  np.testing.assert_allclose(np.asarray(got[:, :3]), np.asarray(attn(jnp.asarray(doc_a))), atol=1e-5)
  np.testing.assert_allclose(np.asarray(got[:, 3:]), np.asarray(attn(jnp.asarray(doc_b))), atol=1e-5)


def test_kv_cache_prefill_then_steps_equals_full_pass(attn):
  rng = np.random.default_rng(3)
  s = 9
  x = jnp.asarray(rng.normal(size=(2, s, D)), jnp.float32)
  seg = jnp.array([[1] * 4 + [2] * 5, [1] * 9])
  pos = jnp.array([[0, 1, 2, 3, 0, 1, 2, 3, 4], list(range(9))])
  full = attn(x, pos, seg)
  step = jax.jit(lambda c, xs, p, sg: attn.decode(xs, c, p, sg))
  cache = attn.init_cache(2, 12)
  y0, cache = step(cache, x[:, :3], pos[:, :3], seg[:, :3])  # prefill 3 tokens
  outs = [y0]
  for t in range(3, s):
    y, cache = step(cache, x[:, t:t + 1], pos[:, t:t + 1], seg[:, t:t + 1])
    outs.append(y)
  assert int(cache.length) == s
  np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, axis=1)), np.asarray(full), atol=1e-5)


def test_gqa_equals_repeated_kv_heads():
  """Grouped-query attention equals full multi-head attention with each kv head repeated for its query group."""
  rng = np.random.default_rng(4)
  q = jnp.asarray(rng.normal(size=(1, 5, 4, DH)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(1, 5, 2, DH)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(1, 5, 2, DH)), jnp.float32)
  slots = jnp.arange(5)[None]
  mask = attention.attention_mask(slots, slots, jnp.ones((1, 5)), jnp.ones((1, 5)))
  got = attention.gqa_attention(q, k, v, mask)
  want = attention.gqa_attention(q, jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2), mask)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_heads=3, num_kv_heads=2, head_dim=8), "num_heads=3 must be a multiple of num_kv_heads=2"),
    (dict(num_heads=4, num_kv_heads=2, head_dim=7), "head_dim=7 must be even"),
])
def test_bad_shapes_fail_at_construction(kwargs, match):
  with pytest.raises(ValueError, match=match):
    attention.Attention(D, rngs=nnx.Rngs(0), **kwargs)
