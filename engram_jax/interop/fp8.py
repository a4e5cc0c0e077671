"""FP8 (e4m3fn) with power-of-two block scales (ue8m0), the DeepSeek weight format, in numpy.

A [R, C] matrix is cut into blocks of (br, bc); each block has one scale s = 2^ceil(log2(amax / 448)) (the smallest
power of two that brings the block's largest magnitude within e4m3's range 448), stored as float8_e8m0fnu (an
unsigned exponent byte, 2^(byte - 127)). An all-zero block gets 2^-127. Values are q = e4m3(x / s), rounded to
nearest even; x ~ q * s.

Error: within a block every value lands on e4m3's grid scaled by s, so |x - q s| <= 2^-4 |x| for |x| / s >= 2^-6
(normal e4m3: 3 mantissa bits) and <= 2^-10 s below that (subnormal spacing 2^-9, half of it). `error_bound`
gives the per-element bound.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
E8M0 = np.dtype(ml_dtypes.float8_e8m0fnu)
E4M3_MAX = 448.0
_CHUNK = 1 << 16  # rows of blocks quantised at once (bounds the temporary float32 memory)


def _check(x: np.ndarray, block: tuple[int, int], name: str) -> tuple[int, int]:
  r, c = x.shape
  br, bc = block
  if r % br or c % bc:
    raise ValueError(f"fp8 blocks: {name} of shape {(r, c)} is not a whole number of {br}x{bc} blocks")
  return r // br, c // bc


def block_scales(x: np.ndarray, block: tuple[int, int]) -> np.ndarray:
  """Power-of-two scales float32 [R / br, C / bc] of a float matrix x [R, C]."""
  nr, nc = _check(x, block, "matrix")
  amax = np.abs(x.astype(np.float32).reshape(nr, block[0], nc, block[1])).max(axis=(1, 3))
  with np.errstate(divide="ignore"):
    exp = np.ceil(np.log2(amax / E4M3_MAX))
  exp = np.where(amax > 0, np.clip(exp, -127, 127), -127)
  return np.exp2(exp).astype(np.float32)


def quantize(x: np.ndarray, block: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
  """x float [R, C] -> (q float8_e4m3fn [R, C], scale float8_e8m0fnu [R / br, C / bc]); row-chunked."""
  x = np.asarray(x)
  nr, nc = _check(x, block, "matrix")
  br, bc = block
  q = np.empty(x.shape, E4M3)
  scale = np.empty((nr, nc), E8M0)
  for lo in range(0, nr, _CHUNK):
    hi = min(lo + _CHUNK, nr)
    xs = np.asarray(x[lo * br:hi * br], np.float32)
    s = block_scales(xs, block)  # [n, nc]
    scaled = xs.reshape(hi - lo, br, nc, bc) / s[:, None, :, None]
    q[lo * br:hi * br] = np.clip(scaled, -E4M3_MAX, E4M3_MAX).reshape(xs.shape).astype(E4M3)
    scale[lo:hi] = s.astype(E8M0)
  return q, scale


def dequantize(q: np.ndarray, scale: np.ndarray, block: tuple[int, int]) -> np.ndarray:
  """(q [R, C] e4m3, scale [R / br, C / bc] e8m0) -> float32 [R, C]; row-chunked (q may be memory-mapped)."""
  nr, nc = _check(q, block, "fp8 weight")
  br, bc = block
  if tuple(scale.shape) != (nr, nc):
    raise ValueError(f"fp8 blocks: scale has shape {tuple(scale.shape)}, expected {(nr, nc)} for a weight of shape "
                     f"{tuple(q.shape)} in {br}x{bc} blocks")
  out = np.empty(q.shape, np.float32)
  for lo in range(0, nr, _CHUNK):
    hi = min(lo + _CHUNK, nr)
    qs = np.asarray(q[lo * br:hi * br]).astype(np.float32).reshape(hi - lo, br, nc, bc)
    s = np.asarray(scale[lo:hi]).astype(np.float32)
    out[lo * br:hi * br] = (qs * s[:, None, :, None]).reshape(-1, q.shape[1])
  return out


def error_bound(x: np.ndarray, block: tuple[int, int]) -> np.ndarray:
  """Per-element bound on |x - dequantize(quantize(x))|: max(2^-4 |x|, 2^-10 s) with s the block's scale."""
  nr, nc = _check(x, block, "matrix")
  s = np.repeat(np.repeat(block_scales(x, block), block[0], axis=0), block[1], axis=1)
  return np.maximum(2.0**-4 * np.abs(x.astype(np.float32)), 2.0**-10 * s)
