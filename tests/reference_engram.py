"""Independent NumPy / pure-Python reference of Engram (arXiv 2601.07372, section 2) for the tests.

Written from the paper's equations and PAPER_NOTES' description of the official demo; imports nothing from
engram_jax. Loops over positions on purpose: slow, but obviously right.

Letters: B batch, S sequence, N max order, K heads per order, H hash heads, G branches, D width, d head_dim.
"""

from __future__ import annotations

import numpy as np

INT64_MAX = np.iinfo(np.int64).max


def is_prime(n: int) -> bool:
  return n >= 2 and all(n % f for f in range(2, int(n**0.5) + 1))


def demo_primes(layer_ids, max_ngram, heads, base_sizes):
  """Demo prime search: for each layer, order, head: the next prime above `start` not yet used, where start
  begins at base - 1 for each order and moves to the last prime found."""
  seen, out = set(), {}
  for layer in layer_ids:
    per_order = []
    for n in range(2, max_ngram + 1):
      start, sizes = base_sizes[n - 2] - 1, []
      for _ in range(heads):
        cand = start + 1
        while not (is_prime(cand) and cand not in seen):
          cand += 1
        seen.add(cand)
        sizes.append(cand)
        start = cand
      per_order.append(sizes)
    out[layer] = per_order
  return out


def demo_multipliers(seed, layer_id, max_ngram, vocab_size):
  """m_i = 2 r_i + 1 with r_i ~ default_rng(seed + 10007 * layer_id).integers(0, floor(int64max / V)//2)."""
  half_bound = max(1, (INT64_MAX // vocab_size) // 2)
  g = np.random.default_rng(int(seed + 10007 * layer_id))
  r = g.integers(low=0, high=half_bound, size=(max_ngram,), dtype=np.int64)
  return r * 2 + 1


def demo_ngram_hashes(ids, multipliers, primes_of_layer, pad_id):
  """Transcription of the demo's `_get_ngram_hashes` (int64): [B, S] compressed ids -> [B, S, H]."""
  x = np.asarray(ids, dtype=np.int64)
  b, t = x.shape
  max_ngram = len(multipliers)

  def shift(k):
    if k == 0:
      return x
    return np.pad(x, ((0, 0), (k, 0)), mode="constant", constant_values=pad_id)[:, :t]

  shifts = [shift(k) for k in range(max_ngram)]
  hashes = []
  for n in range(2, max_ngram + 1):
    mix = shifts[0] * multipliers[0]
    for k in range(1, n):
      mix = np.bitwise_xor(mix, shifts[k] * multipliers[k])
    for mod in primes_of_layer[n - 2]:
      hashes.append((mix % int(mod)).astype(np.int64))
  return np.stack(hashes, axis=2)


def uint32_multipliers(seed, layer_id, max_ngram):
  """32-bit mode: m_i = 2 r_i + 1, r_i ~ default_rng(seed + 10007 * layer_id).integers(0, 2^31)."""
  g = np.random.default_rng(int(seed + 10007 * layer_id))
  return [int(2 * r + 1) for r in g.integers(low=0, high=2**31, size=(max_ngram,), dtype=np.int64)]


def hash32_python(ids, segment_ids, multipliers, primes_of_layer, pad_id):
  """32-bit mode with Python ints: x'_{t-i} is the pad id before the row or document start; products and XOR
  reduced modulo 2^32; row = mix mod prime. [B, S] -> [B, S, H]."""
  ids = np.asarray(ids)
  b, s = ids.shape
  seg = np.zeros((b, s), int) if segment_ids is None else np.asarray(segment_ids)
  max_ngram = len(multipliers)
  out = np.zeros((b, s, (max_ngram - 1) * len(primes_of_layer[0])), np.int64)
  for bi in range(b):
    for t in range(s):
      def tok(i):
        j = t - i
        return int(ids[bi, j]) if j >= 0 and seg[bi, j] == seg[bi, t] else pad_id
      col = 0
      for n in range(2, max_ngram + 1):
        mix = 0
        for i in range(n):
          mix ^= (tok(i) * multipliers[i]) % 2**32
        for p in primes_of_layer[n - 2]:
          out[bi, t, col] = mix % p
          col += 1
  return out


def rmsnorm(x, scale, eps):
  x = np.asarray(x, np.float64)
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def engram_forward(h, rows, segment_ids, table, w_v, w_k, gate_h, gate_k, conv_norm, conv_w, dilation, eps,
                   b_v=None, b_k=None, gate_eps=None, conv_eps=None):
  """Engram residual update in float64.

  h [B, S, G, D]; rows [B, S, H] flat table rows (offsets added); table [V, d]; w_v [E, D]; w_k [G, E, D];
  gate_h, gate_k, conv_norm [G, D]; conv_w [J, G, D] with conv_w[j] multiplying the input j*dilation back.
  Optional (the demo's layer): biases b_v [D], b_k [G, D]; gate / conv norm epsilons (default eps).
  Ablations: w_k None -> no gate (alpha = 1); conv_w None -> no short conv (y = alpha * v).
  """
  gate_eps = eps if gate_eps is None else gate_eps
  conv_eps = eps if conv_eps is None else conv_eps
  h = np.asarray(h, np.float64)
  b, s, g, d_model = h.shape
  seg = np.zeros((b, s), int) if segment_ids is None else np.asarray(segment_ids)
  e = np.asarray(table, np.float64)[rows].reshape(b, s, -1)  # [B, S, E]  (retrieval, concatenated heads)
  v = e @ w_v + (0 if b_v is None else b_v)  # [B, S, D]
  vt = np.zeros((b, s, g, d_model))
  for gi in range(g):
    if w_k is None:
      vt[:, :, gi] = v
      continue
    k = e @ w_k[gi] + (0 if b_k is None else b_k[gi])  # [B, S, D]
    dot = np.sum(rmsnorm(h[:, :, gi], gate_h[gi], gate_eps) * rmsnorm(k, gate_k[gi], gate_eps), -1) / np.sqrt(d_model)
    dot = np.sign(dot) * np.sqrt(np.maximum(np.abs(dot), 1e-6))
    alpha = 1 / (1 + np.exp(-dot))  # [B, S]
    vt[:, :, gi] = alpha[..., None] * v
  y = vt.copy()
  for gi in range(g if conv_w is not None else 0):
    xn = rmsnorm(vt[:, :, gi], conv_norm[gi], conv_eps)  # [B, S, D]
    for bi in range(b):
      for t in range(s):
        acc = np.zeros(d_model)
        for j in range(conv_w.shape[0]):
          src = t - j * dilation
          if src >= 0 and seg[bi, src] == seg[bi, t]:
            acc += conv_w[j, gi] * xn[bi, src]
        y[bi, t, gi] += acc / (1 + np.exp(-acc))  # SiLU
  return y
