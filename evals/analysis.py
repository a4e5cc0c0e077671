"""Mechanistic analyses on validation text: LogitLens, linear CKA between two models' layers, Engram gate maps.

Letters: B batch rows, S sequence, L layers (L+1 residual streams: after the embedding and after each block),
D width, V vocabulary, G branches, N tokens, X/Y layer counts of two models.

LogitLens (nostalgebraist 2020; the Engram paper, arXiv 2601.07372 section 6): each stream h_l, summed over
branches, goes through the model's own final RMSNorm and LM head; per layer we report the mean over valid tokens
of KL(p_l || p_L) (early-exit distribution against the final one) and the top-1 agreement argmax p_l == argmax p_L.
The last stream gives the model's logits, so its KL is 0 and its agreement 1.
Linear CKA (Kornblith et al. 2019, arXiv 1905.00414): for centred X [N, D1], Y [N, D2],
CKA = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F); 1 for identical representations, invariant to orthogonal maps
and isotropic scaling.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from engram_jax.losses import shift_right


def make_stream_fn(model: nnx.Module, engram_off: tuple[int, ...] = ()) -> Callable:
  """Jitted (targets, segment_ids) [B, S] -> dict: 'kl' [L+1] and 'agree' [L+1] (sums over valid tokens),
  'count' (valid tokens), 'hidden' [L+1, B, S, D] float32, 'gates' {layer: [B, S, G]}."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def fn(state, targets, segment_ids):
    m = nnx.merge(graphdef, state)
    inputs = shift_right(targets, segment_ids)
    logits, aux = m(inputs, segment_ids=segment_ids, return_hidden=True, engram_off=tuple(engram_off))
    valid = (segment_ids > 0).astype(jnp.float32)  # [B, S]
    logp_final = jax.nn.log_softmax(logits, axis=-1)  # [B, S, V]
    top_final = jnp.argmax(logits, axis=-1)  # [B, S]

    def per_layer(h):  # h [B, S, D]
      lg = m.head(h)  # [B, S, V]
      logp = jax.nn.log_softmax(lg, axis=-1)
      kl = jnp.sum(jnp.exp(logp) * (logp - logp_final), axis=-1)  # [B, S] KL(p_l || p_L)
      agree = (jnp.argmax(lg, axis=-1) == top_final).astype(jnp.float32)
      return jnp.sum(kl * valid), jnp.sum(agree * valid)

    kl, agree = jax.lax.map(per_layer, aux["hidden"])  # [L+1] each
    return {"kl": kl, "agree": agree, "count": jnp.sum(valid), "hidden": aux["hidden"], "gates": aux["engram_gates"]}

  return lambda targets, segment_ids: fn(state, targets, segment_ids)


def run_streams(fn: Callable, rows: dict[str, np.ndarray], batch_size: int) -> dict:
  """Applies a `make_stream_fn` function to validation rows. Returns LogitLens means per layer ('kl',
  'agreement' [L+1]), and at the valid positions: the hidden streams [L+1, N, D], the gates {layer: [N, G]},
  the model's input ids [N] (the gate at a position belongs to the n-gram ending at its input token) and
  piece starts [N] (where the input is the BOS 0 of a document piece)."""
  kl = agree = count = 0.0
  hidden, gates, inputs, starts = [], defaultdict(list), [], []
  n = rows["targets"].shape[0]
  for b in range(0, n, batch_size):
    t, s = rows["targets"][b:b + batch_size], rows["segment_ids"][b:b + batch_size]
    out = jax.device_get(fn(t, s))
    kl, agree, count = kl + out["kl"], agree + out["agree"], count + float(out["count"])
    valid = s > 0
    hidden.append(np.asarray(out["hidden"])[:, valid])  # [L+1, n, D]
    for layer, g in out["gates"].items():
      gates[layer].append(np.asarray(g)[valid])  # [n, G]
    first = np.concatenate([np.ones_like(s[:, :1], bool), s[:, 1:] != s[:, :-1]], axis=1)  # [b, S]
    inputs.append(np.where(first, 0, np.pad(t, ((0, 0), (1, 0)))[:, :-1])[valid])
    starts.append(first[valid])
  return {"kl": np.asarray(kl) / max(count, 1.0), "agreement": np.asarray(agree) / max(count, 1.0),
          "tokens": int(count), "hidden": np.concatenate(hidden, axis=1),
          "gates": {k: np.concatenate(v) for k, v in gates.items()}, "inputs": np.concatenate(inputs),
          "starts": np.concatenate(starts)}


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
  """Linear CKA of representations x [N, D1] and y [N, D2] of the same N examples (float64)."""
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  x = x - x.mean(axis=0)
  y = y - y.mean(axis=0)
  hsic = np.linalg.norm(y.T @ x) ** 2
  denom = np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)
  return float(hsic / denom) if denom > 0 else 0.0


def cka_matrix(hx: np.ndarray, hy: np.ndarray) -> np.ndarray:
  """Linear CKA between every layer pair: hx [X, N, D1], hy [Y, N, D2] -> [X, Y]."""
  if hx.shape[1] != hy.shape[1]:
    raise ValueError(f"CKA needs the same tokens in both models: {hx.shape[1]} vs {hy.shape[1]} rows")
  return np.array([[linear_cka(a, b) for b in hy] for a in hx])


def best_matches(cka: np.ndarray) -> list[int]:
  """For each layer of the first model (rows), the layer of the second (columns) with the highest CKA."""
  return [int(j) for j in np.argmax(cka, axis=1)]


def gated_ngrams(ids: np.ndarray, starts: np.ndarray, gate: np.ndarray, n: int, decode: Callable,
                 *, min_count: int = 5, top: int = 15) -> dict[str, list]:
  """Most and least gated n-grams: ids [N] input ids in order, starts [N] bool (a document piece starts here
  with the BOS 0), gate [N] (per-token gate, e.g. the mean over branches). The n-gram of position t is the input
  ids t-n+1..t, all after the piece's BOS; n-grams seen fewer than `min_count` times are left out. Returns
  {'most': [...], 'least': [...]}, each entry (text, mean gate, count)."""
  piece = np.cumsum(starts)  # [N] piece number
  sums, counts = defaultdict(float), defaultdict(int)
  for t in range(n - 1, ids.size):
    if piece[t - n + 1] != piece[t] or starts[t - n + 1]:
      continue
    key = tuple(int(i) for i in ids[t - n + 1:t + 1])
    sums[key] += float(gate[t])
    counts[key] += 1
  stats = [(k, sums[k] / counts[k], counts[k]) for k in counts if counts[k] >= min_count]
  stats.sort(key=lambda s: -s[1])
  show = lambda rows: [(decode(list(k)), round(g, 4), c) for k, g, c in rows]  # noqa: E731
  return {"most": show(stats[:top]), "least": show(stats[::-1][:top]), "ngrams": len(stats), "order": n}


def gate_map(model: nnx.Module, ids: Sequence[int]) -> dict[int, np.ndarray]:
  """Per Engram layer, the gate [S, G] at each token of one text (ids [S]) read as a document: the model's inputs
  are BOS (0) + ids, and the gate at token t is the one computed where t is the input (its n-gram ends at t)."""
  inputs = jnp.asarray(np.concatenate([[0], np.asarray(ids, np.int32)])[None], jnp.int32)  # [1, S+1]
  _, aux = model(inputs, segment_ids=jnp.ones_like(inputs), return_hidden=True)
  return {layer: np.asarray(g[0, 1:]) for layer, g in aux["engram_gates"].items()}
