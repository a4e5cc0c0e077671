"""Log-likelihood scoring of (context, continuation) requests, many requests packed per row.

Letters: B batch rows, S sequence length (the model's window), R requests.

Each request becomes one document: the tokens of context + continuation, fed the way training feeds documents
(input = previous token of the same document, 0 acting as BOS at its start). Requests are packed into rows of S
tokens by best-fit decreasing, each its own segment: the model isolates segments (attention, Engram n-grams and
conv never cross a segment boundary; positions restart), so a packed request scores exactly as it would alone.
A request longer than S keeps its last S tokens (left truncation) and is counted.

Tokenisation follows lm-evaluation-harness: trailing spaces of the context move to the continuation, then the
continuation's tokens are those of encode(context + continuation) after the first len(encode(context)) tokens.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from engram_jax.losses import shift_right


@dataclasses.dataclass
class Encoded:
  """Tokenised requests, already cut to the window."""

  tokens: list[np.ndarray]  # per request: the document (context + continuation) ids, at most S
  cont_len: np.ndarray  # [R] continuation tokens scored (the last cont_len of each document)
  context_truncated: np.ndarray  # [R] bool: context tokens were dropped on the left to fit S
  continuation_truncated: np.ndarray  # [R] bool: even the continuation did not fit (its head is not scored)


@dataclasses.dataclass
class Scores:
  """Per-request results of `score_requests`."""

  loglik: np.ndarray  # [R] float64 sum of log p(continuation token | everything before it in the window)
  tokens: np.ndarray  # [R] int continuation tokens scored
  greedy: np.ndarray  # [R] bool: every continuation token is the model's argmax (exact greedy match)
  context_truncated: np.ndarray  # [R] bool
  continuation_truncated: np.ndarray  # [R] bool
  stats: dict  # rows, batches, tokens, seconds, packing efficiency


def encode_pair(encode: Callable[[list[str]], list[list[int]]], contexts: Sequence[str],
                continuations: Sequence[str]) -> tuple[list[list[int]], list[list[int]]]:
  """(context ids, continuation ids) per request, lm-evaluation-harness style (see module doc)."""
  ctx_txt, cont_txt = [], []
  for c, k in zip(contexts, continuations):
    n = len(c) - len(c.rstrip(" "))
    ctx_txt.append(c[:len(c) - n] if n else c)
    cont_txt.append(c[len(c) - n:] + k if n else k)
  unique_ctx = sorted(set(ctx_txt))
  ctx_ids = dict(zip(unique_ctx, encode(unique_ctx)))
  whole = encode([c + k for c, k in zip(ctx_txt, cont_txt)])
  out_ctx, out_cont = [], []
  for i, (c, w) in enumerate(zip(ctx_txt, whole)):
    ci = ctx_ids[c] if c else []
    cont = w[len(ci):]
    if w[:len(ci)] != ci or not cont:  # the boundary merged into one token: encode the two parts apart
      cont = encode([cont_txt[i]])[0]
    out_ctx.append(list(ci))
    out_cont.append(list(cont))
  for i, k in enumerate(out_cont):
    if not k:
      raise ValueError(f"request {i}: continuation {continuations[i]!r} encodes to no tokens; every request "
                       "needs a non-empty continuation")
  return out_ctx, out_cont


def truncate(ctx: list[list[int]], cont: list[list[int]], seq_len: int) -> Encoded:
  """Documents cut to their last `seq_len` tokens, with what was cut recorded."""
  tokens, cont_len, ctx_cut, cont_cut = [], [], [], []
  for c, k in zip(ctx, cont):
    doc = np.asarray(c + k, np.int32)
    ctx_cut.append(doc.size > seq_len)
    cont_cut.append(len(k) > seq_len)
    tokens.append(doc[-seq_len:])
    cont_len.append(min(len(k), seq_len))
  return Encoded(tokens, np.asarray(cont_len, np.int64), np.asarray(ctx_cut, bool), np.asarray(cont_cut, bool))


def pack(lengths: Sequence[int], seq_len: int, *, one_per_row: bool = False) -> list[list[int]]:
  """Request indices per row: best-fit decreasing into rows of `seq_len` tokens (or one request per row)."""
  if one_per_row:
    return [[i] for i in range(len(lengths))]
  order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
  rows: list[list[int]] = []
  free: list[tuple[int, int]] = []  # sorted (free tokens, row id)
  for i in order:
    n = lengths[i]
    if n > seq_len:
      raise ValueError(f"request {i} has {n} tokens > seq_len={seq_len}; truncate first")
    j = bisect.bisect_left(free, (n, -1))
    if j == len(free):
      rows.append([i])
      bisect.insort(free, (seq_len - n, len(rows) - 1))
    else:
      space, r = free.pop(j)
      rows[r].append(i)
      bisect.insort(free, (space - n, r))
  return rows


def build_rows(enc: Encoded, rows: list[list[int]], seq_len: int) -> dict[str, np.ndarray]:
  """Packed arrays for rows of requests: targets, segment_ids, positions [N, S] int32 and request [N, S] int64
  (the request index at its scored continuation positions, -1 elsewhere)."""
  n = len(rows)
  out = {k: np.zeros((n, seq_len), np.int32) for k in ("targets", "segment_ids", "positions")}
  out["request"] = np.full((n, seq_len), -1, np.int64)
  for r, members in enumerate(rows):
    pos = 0
    for seg, i in enumerate(members, start=1):
      doc = enc.tokens[i]
      end = pos + doc.size
      out["targets"][r, pos:end] = doc
      out["segment_ids"][r, pos:end] = seg
      out["positions"][r, pos:end] = np.arange(doc.size)
      out["request"][r, end - enc.cont_len[i]:end] = i
      pos = end
  return out


@functools.lru_cache(maxsize=16)
def _jitted_scorer(graphdef, engram_off: tuple[int, ...]) -> Callable:
  """One jitted scoring function per model structure (so new parameters of the same model never recompile)."""

  @jax.jit
  def fn(state, targets, segment_ids, positions):
    m = nnx.merge(graphdef, state)
    inputs = shift_right(targets, segment_ids)
    logits, _ = m(inputs, segment_ids=segment_ids, positions=positions, engram_off=engram_off)  # [B, S, V]
    logp = jax.nn.log_softmax(logits, axis=-1)
    tgt = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]  # [B, S]
    return tgt, jnp.argmax(logits, axis=-1) == targets

  return fn


def make_token_scorer(model: nnx.Module, engram_off: tuple[int, ...] = ()) -> Callable:
  """Jitted (targets, segment_ids, positions) [B, S] -> (log p(target) [B, S] float32, target is argmax [B, S])."""
  graphdef, state = nnx.split(model)
  fn = _jitted_scorer(graphdef, tuple(int(i) for i in engram_off))
  return lambda targets, segment_ids, positions: fn(state, targets, segment_ids, positions)


def score_requests(scorer: Callable, enc: Encoded, seq_len: int, batch_size: int, *, one_per_row: bool = False,
                   label: str = "", log: Callable[[str], None] | None = print, log_every_s: float = 30.0) -> Scores:
  """Scores encoded requests with a `make_token_scorer` function; rows are padded to full [B, S] batches so one
  compilation serves every batch."""
  r = len(enc.tokens)
  rows = pack([t.size for t in enc.tokens], seq_len, one_per_row=one_per_row)
  arrays = build_rows(enc, rows, seq_len)
  n_batches = -(-len(rows) // batch_size)
  loglik = np.zeros(r, np.float64)
  missed = np.zeros(r, np.int64)
  t0 = t_log = time.time()
  for b in range(n_batches):
    sl = slice(b * batch_size, (b + 1) * batch_size)
    batch = {k: v[sl] for k, v in arrays.items()}
    pad = batch_size - batch["targets"].shape[0]
    if pad:
      batch = {k: np.concatenate([v, np.full((pad, seq_len), -1 if k == "request" else 0, v.dtype)])
               for k, v in batch.items()}
    logp, hit = jax.device_get(scorer(batch["targets"], batch["segment_ids"], batch["positions"]))
    req = batch["request"]
    m = req >= 0
    loglik += np.bincount(req[m], weights=np.asarray(logp, np.float64)[m], minlength=r)
    missed += np.bincount(req[m], weights=(~np.asarray(hit)[m]).astype(np.float64), minlength=r).astype(np.int64)
    now = time.time()
    if log is not None and (now - t_log > log_every_s or b == n_batches - 1) and b > 0:
      done = (b + 1) * batch_size * seq_len
      rate = done / max(now - t0, 1e-9)
      eta = (n_batches - b - 1) * batch_size * seq_len / max(rate, 1e-9)
      log(f"  {label} batch {b + 1}/{n_batches} | {rate:,.0f} tokens/s | ETA {eta:.0f} s")
      t_log = now
  seconds = time.time() - t0
  used = int(sum(t.size for t in enc.tokens))
  stats = {"requests": r, "rows": len(rows), "batches": n_batches, "tokens": used, "seconds": seconds,
           "packing_efficiency": used / max(n_batches * batch_size * seq_len, 1),
           "requests_per_s": r / max(seconds, 1e-9), "tokens_per_s": used / max(seconds, 1e-9)}
  return Scores(loglik, enc.cont_len.copy(), missed == 0, enc.context_truncated, enc.continuation_truncated, stats)
