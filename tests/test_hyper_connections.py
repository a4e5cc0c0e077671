"""Hyper-connections: G = 1 is the plain residual exactly; 'hc' and 'mhc' match NumPy references of their equations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from engram_jax.layers import hyper_connections as hcl
from engram_jax.models.config import ModelConfig
from engram_jax.models.decoder import Block

B, S, D = 2, 3, 8


def _randomize(module, seed):
  """Replace every parameter by random values so the dynamic terms are exercised."""
  rng = np.random.default_rng(seed)
  for _, var in nnx.iter_graph(module):
    if isinstance(var, nnx.Param):
      var[...] = jnp.asarray(rng.normal(size=var[...].shape) * 0.5, jnp.float32)


def _np_rms(x, scale, eps=1e-6):
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * scale


def _np_sinkhorn(logits, iters):
  m = np.exp(logits)
  for _ in range(iters):
    m = m / m.sum(-1, keepdims=True)
    m = m / m.sum(-2, keepdims=True)
  return m


def test_expansion_one_is_the_plain_residual_exactly():
  hc = hcl.HyperConnection(D, 1, layer_index=3)
  assert not jax.tree.leaves(nnx.state(hc, nnx.Param))
  h = jnp.asarray(np.random.default_rng(0).normal(size=(B, S, 1, D)), jnp.float32)
  f = lambda x: jnp.tanh(x) * 3.0
  x, ctx = hc.read(h)
  np.testing.assert_array_equal(np.asarray(x), np.asarray(h[:, :, 0]))
  np.testing.assert_array_equal(np.asarray(hc.write(ctx, f(x))), np.asarray(h + f(h)))


def test_decoder_block_with_expansion_one_is_a_plain_pre_norm_residual_block():
  cfg = ModelConfig(vocab_size=16, d_model=D, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=4, dense_hidden=16)
  block = Block(cfg, 0, None, None, rngs=nnx.Rngs(0))
  h = jnp.asarray(np.random.default_rng(1).normal(size=(B, S, 1, D)), jnp.float32)
  pos = jnp.broadcast_to(jnp.arange(S), (B, S))
  got, _ = block(h, None, pos, None, None, None)
  x = h[:, :, 0]
  x = x + block.attn(block.attn_norm(x), pos, None)
  x = x + block.ffn(block.ffn_norm(x))
  np.testing.assert_array_equal(np.asarray(got[:, :, 0]), np.asarray(x))


def test_hc_at_init_reads_one_branch_and_adds_the_output_to_every_branch():
  g = 3
  hc = hcl.HyperConnection(D, g, layer_index=4)
  h = jnp.asarray(np.random.default_rng(2).normal(size=(B, S, g, D)), jnp.float32)
  x, ctx = hc.read(h)
  np.testing.assert_allclose(np.asarray(x), np.asarray(h[:, :, 4 % g]), atol=1e-6)
  y = jnp.ones((B, S, D))
  np.testing.assert_allclose(np.asarray(hc.write(ctx, y)), np.asarray(h + 1.0), atol=1e-6)


def _read_write_random(hc, param_seed, data_seed):
  """Randomised params (float64 copies), random h [B, S, G, D] and y [B, S, D], and hc's read x and write output."""
  _randomize(hc, param_seed)
  p = {k: np.asarray(v[...], np.float64) for k, v in nnx.state(hc, nnx.Param).items()}
  rng = np.random.default_rng(data_seed)
  h = rng.normal(size=(B, S, hc.expansion, D))
  y = rng.normal(size=(B, S, D))
  x, ctx = hc.read(jnp.asarray(h, jnp.float32))
  return p, h, y, x, hc.write(ctx, jnp.asarray(y, jnp.float32))


def test_hc_matches_numpy_reference_of_the_dynamic_equations():
  p, h, y, x, out = _read_write_random(hcl.HyperConnection(D, 2, layer_index=0), 3, 4)

  hn = _np_rms(h, p["norm_scale"])
  alpha = p["static_alpha"] + p["alpha_scale"] * np.tanh(hn @ p["dyn_alpha"])  # [B, S, G, 1 + G]
  beta = p["static_beta"] + p["beta_scale"] * np.tanh(hn @ p["dyn_beta"])  # [B, S, G]
  want_x = np.einsum("bsg,bsgd->bsd", alpha[..., 0], h)
  want_out = np.einsum("bsgi,bsgd->bsid", alpha[..., 1:], h) + beta[..., None] * y[:, :, None]
  np.testing.assert_allclose(np.asarray(x), want_x, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(out), want_out, rtol=1e-4, atol=1e-5)


def test_mhc_matches_numpy_reference_and_mixing_is_doubly_stochastic():
  g = 3
  hc = hcl.HyperConnection(D, g, layer_index=0, variant="mhc", sinkhorn_iters=30)
  p, h, y, x, out = _read_write_random(hc, 5, 6)

  flat = _np_rms(h.reshape(B, S, g * D), p["norm_scale"])
  sig = lambda z: 1 / (1 + np.exp(-z))
  pre = sig(p["a_pre"] * flat @ p["phi_pre"] + p["b_pre"])
  post = 2 * sig(p["a_post"] * flat @ p["phi_post"] + p["b_post"])
  res = _np_sinkhorn(p["a_res"] * (flat @ p["phi_res"]).reshape(B, S, g, g) + p["b_res"], 30)
  np.testing.assert_allclose(res.sum(-1), 1.0, atol=1e-3)
  np.testing.assert_allclose(res.sum(-2), 1.0, atol=1e-6)
  np.testing.assert_allclose(np.asarray(x), np.einsum("bsg,bsgd->bsd", pre, h), rtol=1e-4, atol=1e-5)
  want = np.einsum("bsij,bsjd->bsid", res, h) + post[..., None] * y[:, :, None]
  np.testing.assert_allclose(np.asarray(out), want, rtol=1e-4, atol=1e-4)


def test_sinkhorn_is_doubly_stochastic():
  logits = jnp.asarray(np.random.default_rng(7).normal(size=(5, 4, 4)) * 2, jnp.float32)
  m = np.asarray(hcl.sinkhorn(logits, 50))
  np.testing.assert_allclose(m.sum(-1), 1.0, atol=1e-4)
  np.testing.assert_allclose(m.sum(-2), 1.0, atol=1e-5)
  np.testing.assert_allclose(m, _np_sinkhorn(np.asarray(logits, np.float64), 50), rtol=1e-4)


def test_mhc_at_init_averages_reads_and_keeps_the_residual_near_identity():
  g = 4
  hc = hcl.HyperConnection(D, g, layer_index=0, variant="mhc")
  h = jnp.asarray(np.random.default_rng(8).normal(size=(B, S, g, D)), jnp.float32)
  x, (rest, post) = hc.read(h)
  np.testing.assert_allclose(np.asarray(x), np.asarray(h.mean(axis=2)), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(post), 1.0, atol=0.02)
  # 0.9 on the diagonal, 0.1 / (G - 1) elsewhere (plus 1% dynamic perturbation).
  want = 0.9 * h + (0.1 / (g - 1)) * (h.sum(axis=2, keepdims=True) - h)
  np.testing.assert_allclose(np.asarray(rest), np.asarray(want), atol=0.05)


def test_gradients_reach_the_dynamic_weights():
  hc = hcl.HyperConnection(D, 2, layer_index=0)
  h = jnp.asarray(np.random.default_rng(9).normal(size=(B, S, 2, D)), jnp.float32)

  def loss(m):
    x, ctx = m.read(h)
    return jnp.sum(m.write(ctx, jnp.sin(x)) ** 2)

  grads = nnx.grad(loss)(hc)
  assert np.abs(np.asarray(grads["dyn_alpha"][...])).max() > 0
  assert np.abs(np.asarray(grads["dyn_beta"][...])).max() > 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(expansion=0), "expansion=0"), (dict(variant="dhc"), "variant='dhc'"), (dict(sinkhorn_iters=0), "sinkhorn"),
])
def test_bad_arguments_fail(kwargs, match):
  kw = dict(expansion=2) | kwargs
  with pytest.raises(ValueError, match=match):
    hcl.HyperConnection(D, layer_index=0, **kw)
