"""Benchmark metrics from per-request log-likelihoods, with the community's definitions (lm-evaluation-harness,
OLMES arXiv 2406.08446), and standard errors.

Letters: R requests, N documents, C choices.

Per document, with ll_c the summed log-likelihood of choice c's continuation given the context:
  acc            argmax_c ll_c == gold                       (OLMES acc_raw)
  acc_per_char   argmax_c ll_c / chars(continuation_c)       (lm-eval acc_norm; leading space counted)
  acc_per_token  argmax_c ll_c / tokens(continuation_c)
  acc_uncond     argmax_c ll_c - ll_c^uncond                  (PMI against the unconditional "Answer:" context)
  bpb            -ll_gold / bytes(continuation_gold) / ln 2   (bits per UTF-8 byte of the gold continuation)
  acc_greedy     the gold continuation is the model's greedy output, token by token (single-choice tasks, LAMBADA)
Ties go to the first choice (np.argmax). Each metric is a mean over documents; its standard error is the sample
standard deviation (ddof 1) / sqrt(N), as lm-evaluation-harness reports it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

LN2 = math.log(2.0)


def mean_stderr(values: np.ndarray) -> dict[str, float]:
  """{'value': mean, 'stderr': sample std / sqrt(n)} (stderr 0 for fewer than two values)."""
  v = np.asarray(values, np.float64)
  if v.size == 0:
    return {"value": float("nan"), "stderr": float("nan")}
  se = float(np.std(v, ddof=1) / math.sqrt(v.size)) if v.size > 1 else 0.0
  return {"value": float(np.mean(v)), "stderr": se}


def _grid(doc, choice, values, n_docs, n_choices, fill):
  out = np.full((n_docs, n_choices), fill, np.float64)  # [N, C]
  out[doc, choice] = values
  return out


def task_metrics(doc: np.ndarray, choice: np.ndarray, uncond: np.ndarray, continuations: Sequence[str],
                 gold: np.ndarray, loglik: np.ndarray, tokens: np.ndarray, greedy: np.ndarray, *,
                 greedy_metric: bool = False, per_doc: bool = False) -> dict:
  """Metrics of one task. doc, choice, uncond, loglik, tokens, greedy: [R] per request; continuations: [R]
  strings; gold [N]. Returns {metric: {'value', 'stderr'}} plus 'docs' and 'chance' (mean 1 / choices, None for
  single-continuation tasks). acc_greedy is reported for single-continuation tasks, and for others when
  greedy_metric is set (generation-style tasks scored by ranking too). per_doc: also 'per_doc', {metric: [N]
  values} (for paired comparisons of two models or settings on the same documents)."""
  doc, choice, uncond = np.asarray(doc), np.asarray(choice), np.asarray(uncond, bool)
  gold = np.asarray(gold)
  n, c = gold.size, int(choice.max()) + 1
  cond = ~uncond
  chars = np.asarray([len(s) for s in continuations], np.float64)
  nbytes = np.asarray([len(s.encode("utf-8")) for s in continuations], np.float64)
  ll = _grid(doc[cond], choice[cond], loglik[cond], n, c, -np.inf)  # [N, C]
  present = np.isfinite(ll)
  if not present[np.arange(n), gold].all():
    raise ValueError("a document's gold choice has no conditional request")
  per = lambda x: _grid(doc[cond], choice[cond], x[cond], n, c, 1.0)  # noqa: E731  [N, C]
  masked = lambda score: np.where(present, score, -np.inf)  # noqa: E731
  rows = np.arange(n)
  gold_ll, gold_bytes = ll[rows, gold], per(nbytes)[rows, gold]
  n_choices = present.sum(axis=1)
  values = {"bpb": -gold_ll / gold_bytes / LN2}  # metric -> [N] per document
  if n_choices.max() == 1 or greedy_metric:
    values["acc_greedy"] = _grid(doc[cond], choice[cond], greedy[cond], n, c, 0.0)[rows, gold]
  if n_choices.max() > 1:
    values["acc"] = np.argmax(masked(ll), axis=1) == gold
    values["acc_per_char"] = np.argmax(masked(ll / per(chars)), axis=1) == gold
    values["acc_per_token"] = np.argmax(masked(ll / per(tokens.astype(np.float64))), axis=1) == gold
    if uncond.any():
      ll_u = _grid(doc[uncond], choice[uncond], loglik[uncond], n, c, np.nan)  # [N, C]
      if np.isnan(ll_u[present]).any():
        raise ValueError("unconditional requests cover only some choices; every choice needs one for acc_uncond")
      values["acc_uncond"] = np.argmax(masked(ll - np.nan_to_num(ll_u)), axis=1) == gold
  out: dict = {"docs": int(n), "chance": float(np.mean(1.0 / n_choices)) if n_choices.max() > 1 else None}
  out.update({k: mean_stderr(v) for k, v in values.items()})
  if per_doc:
    out["per_doc"] = {k: np.asarray(v, np.float64) for k, v in values.items()}
  return out


def paired_difference(a, b) -> dict[str, float]:
  """Mean and standard error of b - a over the same documents ([N] each): the difference of two settings scored
  on one set of documents, whose standard error is smaller than that of two independent means."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape:
    raise ValueError(f"paired_difference: {a.shape} vs {b.shape} documents; score both on the same documents")
  return mean_stderr(b - a)


def retained(on: float, off: float, chance: float | None = None) -> dict[str, float | None]:
  """Share of a score kept with a component switched off: raw off / on, and above chance
  (off - chance) / (on - chance) (None when on is at or below chance)."""
  raw = off / on if on else None
  above = None
  if chance is not None and on - chance > 0:
    above = (off - chance) / (on - chance)
  return {"raw": raw, "above_chance": above}
