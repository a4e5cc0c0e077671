"""Hyper-connections: G parallel residual branches mixed around each sublayer.

Letters: B batch, S sequence, G branches (expansion rate), D width.

Two variants, both used as  x, ctx = hc.read(h);  y = sublayer(x);  h = hc.write(ctx, y):
- 'hc': dynamic hyper-connections (Zhu et al., arXiv 2409.19606, eqs. 1-4 and the dynamic form, eqs. 10-13):
      alpha = A_static + s_a * tanh(norm(h) W_a)   [G, 1 + G]   (column 0 = A_m: read weights, 1: = A_r)
      beta  = B_static + s_b * tanh(norm(h) w_b)   [G]
      x = sum_g alpha[g, 0] h_g;   h'_i = sum_g alpha[g, 1 + i] h_g + beta_i y
  Initialisation (paper): A_m = one-hot of (layer index mod G), A_r = I, B = 1, dynamic weights 0.
- 'mhc': manifold-constrained hyper-connections (DeepSeek mHC, arXiv 2512.24880): from the flattened, RMS-normed
  stream, H_pre = sigmoid(.), H_post = 2 sigmoid(.), H_res = Sinkhorn(.) (a doubly-stochastic matrix after a few
  alternating row/column normalisations of exp(logits)); x = sum_g H_pre[g] h_g; h'_i = sum_j H_res[i, j] h_j + H_post[i] y.

G = 1 has no parameters and is the plain residual stream exactly: x = h[:, :, 0], h' = h + y.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from engram_jax import sharding
from engram_jax.layers.norms import rms_norm

VARIANTS = ("hc", "mhc")


def sinkhorn(logits: jax.Array, iters: int) -> jax.Array:
  """Doubly-stochastic projection of exp(logits) [..., G, G] by `iters` row-then-column normalisations."""
  m = jnp.exp(logits - jnp.max(logits, axis=(-2, -1), keepdims=True))
  for _ in range(iters):
    m = m / jnp.sum(m, axis=-1, keepdims=True)  # rows sum to one
    m = m / jnp.sum(m, axis=-2, keepdims=True)  # columns sum to one
  return m


class HyperConnection(nnx.Module):
  """Residual mixing around one sublayer: read(h [B,S,G,D]) -> (x [B,S,D], ctx); write(ctx, y [B,S,D]) -> h'."""

  def __init__(self, d_model: int, expansion: int, layer_index: int, *, variant: str = "hc",
               sinkhorn_iters: int = 20, norm_eps: float = 1e-6, rngs: nnx.Rngs | None = None):
    del rngs  # Deterministic init (dynamic weights start at zero).
    if expansion < 1:
      raise ValueError(f"HyperConnection: expansion={expansion} must be >= 1 (1 = plain residual)")
    if variant not in VARIANTS:
      raise ValueError(f"HyperConnection: variant={variant!r}; use one of {VARIANTS}")
    if sinkhorn_iters < 1:
      raise ValueError(f"HyperConnection: sinkhorn_iters={sinkhorn_iters} must be >= 1")
    g = expansion
    self.expansion, self.variant, self.sinkhorn_iters, self.norm_eps = g, variant, sinkhorn_iters, norm_eps
    if g == 1:
      return
    if variant == "hc":
      static_alpha = np.zeros((g, g + 1), np.float32)
      static_alpha[layer_index % g, 0] = 1.0
      static_alpha[:, 1:] = np.eye(g)
      self.norm_scale = sharding.param(jnp.ones((d_model,)), "embed")
      self.static_alpha = sharding.param(jnp.asarray(static_alpha), "branches", None)  # [G, 1 + G]
      self.static_beta = sharding.param(jnp.ones((g,)), "branches")  # [G]
      self.dyn_alpha = sharding.param(jnp.zeros((d_model, g + 1)), "embed", None)  # [D, 1 + G]
      self.dyn_beta = sharding.param(jnp.zeros((d_model,)), "embed")  # [D]
      self.alpha_scale = sharding.param(jnp.full((), 0.01))
      self.beta_scale = sharding.param(jnp.full((), 0.01))
    else:
      # Biases chosen so that at init: reads average the branches, writes add y to every branch, and the residual
      # mix is close to the identity (diagonal weight 0.9 of a symmetric doubly-stochastic matrix).
      diag = np.log(0.9 * (g - 1) / 0.1)
      self.norm_scale = sharding.param(jnp.ones((g * d_model,)), None)
      self.phi_pre = sharding.param(jnp.zeros((g * d_model, g)), None, "branches")  # [G*D, G]
      self.phi_post = sharding.param(jnp.zeros((g * d_model, g)), None, "branches")
      self.phi_res = sharding.param(jnp.zeros((g * d_model, g * g)), None, None)  # [G*D, G*G]
      self.b_pre = sharding.param(jnp.full((g,), -np.log(g - 1.0)), "branches")  # sigmoid -> 1/G
      self.b_post = sharding.param(jnp.zeros((g,)), "branches")  # 2 sigmoid -> 1
      self.b_res = sharding.param(jnp.asarray(diag * np.eye(g), jnp.float32), "branches", None)
      self.a_pre = sharding.param(jnp.full((), 0.01))
      self.a_post = sharding.param(jnp.full((), 0.01))
      self.a_res = sharding.param(jnp.full((), 0.01))

  def read(self, h: jax.Array):
    """h [B, S, G, D] -> (x [B, S, D], ctx for write)."""
    if self.expansion == 1:
      return h[:, :, 0], h
    g = self.expansion
    hf = h.astype(jnp.float32)
    if self.variant == "hc":
      hn = rms_norm(hf, self.norm_scale[...], self.norm_eps)  # [B, S, G, D]
      alpha = self.static_alpha[...] + self.alpha_scale[...] * jnp.tanh(
          jnp.einsum("bsgd,dj->bsgj", hn, self.dyn_alpha[...]))  # [B, S, G, 1 + G]
      beta = self.static_beta[...] + self.beta_scale[...] * jnp.tanh(
          jnp.einsum("bsgd,d->bsg", hn, self.dyn_beta[...]))  # [B, S, G]
      mixed = jnp.einsum("bsgd,bsgj->bsjd", hf, alpha)  # [B, S, 1 + G, D]
      return mixed[:, :, 0].astype(h.dtype), (mixed[:, :, 1:], beta)
    b, s = h.shape[:2]
    flat = rms_norm(hf.reshape(b, s, -1), self.norm_scale[...], self.norm_eps)  # [B, S, G*D]
    pre = jax.nn.sigmoid(self.a_pre[...] * (flat @ self.phi_pre[...]) + self.b_pre[...])  # [B, S, G]
    post = 2.0 * jax.nn.sigmoid(self.a_post[...] * (flat @ self.phi_post[...]) + self.b_post[...])  # [B, S, G]
    res_logits = self.a_res[...] * (flat @ self.phi_res[...]).reshape(b, s, g, g) + self.b_res[...]  # [B, S, G, G]
    res = sinkhorn(res_logits, self.sinkhorn_iters)  # [B, S, G, G], rows and columns sum to one
    x = jnp.einsum("bsgd,bsg->bsd", hf, pre)  # [B, S, D]
    rest = jnp.einsum("bsij,bsjd->bsid", res, hf)  # [B, S, G, D]
    return x.astype(h.dtype), (rest, post)

  def write(self, ctx, y: jax.Array) -> jax.Array:
    """ctx from read, sublayer output y [B, S, D] -> new stream [B, S, G, D]."""
    if self.expansion == 1:
      return ctx + y[:, :, None, :].astype(ctx.dtype)
    rest, weights = ctx  # [B, S, G, D], [B, S, G]
    return rest + weights[..., None] * y[:, :, None, :].astype(jnp.float32)
