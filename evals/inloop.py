"""In-loop evaluation: a few benchmark tasks scored inside the training loop, their numbers logged beside the
validation loss (metrics.jsonl, TensorBoard).

Requests are loaded, tokenized and left-truncated once; every call scores them with the current parameters
through one jitted function per model structure (compiled on the first call). Bits per byte of the gold
continuation is smooth even at small scale, which is why OLMo tracks it in-loop; the primary accuracy is logged too.
"""

from __future__ import annotations

import time

from flax import nnx

from evals import benchmarks, metrics, scoring
from evals.suite import Tokenizer


class InLoopEval:
  """`InLoopEval(tasks, tokenizer_path, seq_len)(model)` -> {'eval/<task>/<metric>': value, 'eval/seconds': s}."""

  def __init__(self, tasks: tuple[str, ...], tokenizer_path: str, seq_len: int, *, limit: int | None = 200,
               batch_size: int = 16):
    tok = Tokenizer(tokenizer_path)
    self.seq_len, self.batch_size = seq_len, batch_size
    self.tasks = []
    for name in tasks:
      data = benchmarks.load_task(name, limit)
      ctx, cont = scoring.encode_pair(tok.encode, data.contexts, data.continuations)
      self.tasks.append((data, scoring.truncate(ctx, cont, seq_len)))

  def __call__(self, model: nnx.Module) -> dict[str, float]:
    t0 = time.time()
    scorer = scoring.make_token_scorer(model)
    out = {}
    for data, enc in self.tasks:
      s = scoring.score_requests(scorer, enc, self.seq_len, self.batch_size, log=None)
      m = metrics.task_metrics(data.doc, data.choice, data.uncond, data.continuations, data.gold, s.loglik, s.tokens,
                               s.greedy)
      for key in dict.fromkeys(("bpb", data.spec.primary)):
        out[f"eval/{data.spec.name}/{key}"] = m[key]["value"]
    out["eval/seconds"] = time.time() - t0
    return out
