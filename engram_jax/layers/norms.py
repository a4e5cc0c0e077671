"""RMSNorm as a pure function and an NNX module.

Letters: B batch, S sequence, D width.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from engram_jax import sharding


def rms_norm(x: jax.Array, scale: jax.Array | None = None, eps: float = 1e-6) -> jax.Array:
  """x / sqrt(mean(x^2) + eps) over the last axis, computed in f32, optionally times `scale`."""
  xf = x.astype(jnp.float32)
  y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  if scale is not None:
    y = y * scale.astype(jnp.float32)
  return y.astype(x.dtype)


class RMSNorm(nnx.Module):
  """RMSNorm with a learned per-channel scale (initialised to one) over the last axis [..., D]."""

  def __init__(self, dim: int, *, eps: float = 1e-6, axis_name: str = "embed", rngs: nnx.Rngs | None = None):
    del rngs  # Deterministic init; the argument keeps the NNX constructor convention.
    self.eps = eps
    self.scale = sharding.param(jnp.ones((dim,), jnp.float32), axis_name)  # lazy annotation: no mesh needed

  def __call__(self, x: jax.Array) -> jax.Array:
    return rms_norm(x, self.scale[...], self.eps)
