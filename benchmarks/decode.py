"""Decode throughput with Engram tables on the device vs in host memory (vs host + hot-row cache).

    python benchmarks/decode.py [--quick] [--batches 1,8,32] [--scales 1,16] [--new 32] [--rounds 5]

Model: the quickstart model (configs/models/engram_moe_tiny.gin: 2 layers, Engram before block 1, 8 tables of ~2,003
rows), random weights, and the same model with 16x larger tables. For each table size and batch size, three engines
(engram_jax.decode.Engine) run the same prompts (32 tokens, `--new` new tokens, greedy, no EOS):
  device      tables are parameters, hashed and read in-graph; step t+1 is dispatched before step t's tokens are read
  host        tables in numpy; per step the new tokens are hashed on the host (with each row's history), rows gathered
              and sent while the device runs block 0 (the step is split before the Engram layer)
  host_cache  host, plus the most frequent 10% of rows on the device (frequencies from a Zipfian token stream hashed
              with the model's spec); only the distinct misses are gathered and sent
Rounds interleave the variants (one generate of each in turn), so load from other processes falls on all alike; we
report medians over rounds and ratios to `device`. Per step (host variants, one extra round with synchronous
transfers): host hash, host gather, transfer, and device compute (the device variant's step time); hidden fraction =
1 - (host step - device step) / (hash + gather + transfer), the share of host work that overlapped with device work;
host critical = per step, from reading the previous draw to dispatching the step's last part (hash, gather, send,
dispatch: the window in which the device may idle).
On CPU the "device" is the same memory and cores as the host, so this measures the pipeline's own overhead.
Table printed; JSON written to benchmarks/results/decode.json (with the machine's load average).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
MODEL_GIN = "configs/models/engram_moe_tiny.gin"
VARIANTS = ("device", "host", "host_cache")


def model_config(scale: int):
  from engram_jax import configurables  # noqa: PLC0415
  config, _, _ = configurables.resolve("train", [MODEL_GIN, "configs/runs/pretrain.gin"],
                                       ["MODEL_DIR='/tmp/unused'", "TRAIN_STEPS=1"])
  e = config.engram
  return dataclasses.replace(config, engram=dataclasses.replace(
      e, table_base_sizes=tuple(b * scale for b in e.table_base_sizes)))


def zipf_tokens(vocab: int, n: int, seed: int):
  import numpy as np  # noqa: PLC0415
  rng = np.random.default_rng(seed)
  return (rng.zipf(1.2, size=n) - 1) % vocab


def build_engines(config, batch: int, new: int, prompt_len: int):
  import numpy as np  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  from engram_jax import host_table  # noqa: PLC0415
  from engram_jax.decode import DecodeConfig, Engine  # noqa: PLC0415
  from engram_jax.models.decoder import Decoder  # noqa: PLC0415

  model = Decoder(config, rngs=nnx.Rngs(0))
  layers = [i for i, b in enumerate(model.blocks) if b.engram is not None]
  docs = np.array_split(zipf_tokens(config.vocab_size, 400_000, seed=1), 2000)  # offline "corpus"
  hashers = {l: host_table.HostHasher.from_engram(model.blocks[l].engram) for l in layers}
  counts = host_table.count_rows(docs, hashers, {l: model.blocks[l].engram.num_rows for l in layers})
  hot = max(1, model.blocks[layers[0]].engram.num_rows // 10)
  base = DecodeConfig(batch_size=batch, max_len=prompt_len + new, prefill_chunk=prompt_len, eos_id=None)
  engines = {
      "device": Engine(model, dataclasses.replace(base, table_placement="device")),
      "host": Engine(model, dataclasses.replace(base, table_placement="host")),
      "host_cache": Engine(model, dataclasses.replace(base, table_placement="host", hot_rows=hot), row_counts=counts),
  }
  rows = sum(model.blocks[l].engram.num_rows for l in layers)
  return engines, {"table_rows": rows, "table_mb": rows * config.engram.head_dim * 4 / 2**20, "hot_rows": hot}


def run_round(engine, requests):
  engine.stats.update(decode_s=0.0, generated_tokens=0, decode_steps=0, prefill_s=0.0, host_wait_s=0.0,
                      host_critical_s=0.0)
  if engine.host_rows is not None:
    engine.host_rows.times = type(engine.host_rows.times)()
  engine.generate(requests)
  s = engine.stats
  steps = max(s["decode_steps"], 1)
  return s["generated_tokens"] / s["decode_s"], s["decode_s"] / steps, s["host_critical_s"] / steps


def bench(config, batch: int, new: int, rounds: int, prompt_len: int = 32) -> dict:
  from engram_jax.decode import Request  # noqa: PLC0415

  t0 = time.perf_counter()
  engines, info = build_engines(config, batch, new, prompt_len)
  prompts = zipf_tokens(config.vocab_size, batch * prompt_len, seed=2).reshape(batch, prompt_len)
  requests = [Request(p.tolist(), new) for p in prompts]
  for e in engines.values():  # compile
    e.generate(requests[:1])
  compile_s = time.perf_counter() - t0
  tps, step, critical = ({v: [] for v in VARIANTS} for _ in range(3))
  for _ in range(rounds):
    for v in VARIANTS:
      a, b, c = run_round(engines[v], requests)
      tps[v].append(a)
      step[v].append(b)
      critical[v].append(c)
  out = {"batch": batch, **info, "compile_s": compile_s, "rounds": rounds}
  dev_step = statistics.median(step["device"])
  for v in VARIANTS:
    out[v] = {"tokens_per_s": statistics.median(tps[v]), "step_ms": 1e3 * statistics.median(step[v]),
              "host_critical_ms": 1e3 * statistics.median(critical[v]), "tokens_per_s_rounds": tps[v]}
    out[v]["ratio_to_device"] = out[v]["tokens_per_s"] / out["device"]["tokens_per_s"]
  for v in ("host", "host_cache"):  # one more round with synchronous transfers, for the time split
    eng = engines[v]
    eng.host_rows.sync_timing = True
    run_round(eng, requests)
    eng.host_rows.sync_timing = False
    t = eng.host_rows.times
    calls = max(t.calls, 1)
    split = {"hash_ms": 1e3 * t.hash_s / calls, "gather_ms": 1e3 * t.gather_s / calls,
             "transfer_ms": 1e3 * t.transfer_s / calls, "bytes_per_step": t.bytes_sent / calls,
             "device_step_ms": 1e3 * dev_step}
    host_work = split["hash_ms"] + split["gather_ms"] + split["transfer_ms"]
    overhead = out[v]["step_ms"] - 1e3 * dev_step
    split["hidden_fraction"] = min(1.0, max(0.0, 1 - overhead / host_work)) if host_work > 0 else 1.0
    out[v]["split"] = split
    if eng.host_rows.hit_rates():
      out[v]["hit_rate"] = statistics.mean(eng.host_rows.hit_rates().values())
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--batches", default="1,8,32")
  p.add_argument("--scales", default="1,16")
  p.add_argument("--new", type=int, default=32)
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--quick", action="store_true", help="batch 1 and 8, table 1x, 2 rounds, 8 new tokens")
  p.add_argument("--out", default=os.path.join(ROOT, "benchmarks/results/decode.json"))
  args = p.parse_args(argv)
  if args.quick:
    args.batches, args.scales, args.rounds, args.new = "1,8", "1", 2, 8
  import jax  # noqa: PLC0415

  load_before = os.getloadavg()
  results = []
  for scale in (int(s) for s in args.scales.split(",")):
    config = model_config(scale)
    for batch in (int(b) for b in args.batches.split(",")):
      r = bench(config, batch, args.new, args.rounds)
      r["table_scale"] = scale
      results.append(r)
      print(f"table {scale:>2}x batch {batch:>2}: " + "  ".join(
          f"{v} {r[v]['tokens_per_s']:7.1f} tok/s ({r[v]['ratio_to_device']:.3f}x)" for v in VARIANTS), flush=True)
  record = {"benchmark": "decode", "backend": jax.default_backend(), "devices": str(jax.devices()[0]),
            "cpu_count": os.cpu_count(), "platform": platform.platform(), "load_avg_before": load_before,
            "load_avg_after": os.getloadavg(), "new_tokens": args.new, "prompt_tokens": 32, "model": MODEL_GIN,
            "results": results}
  print("\n| table | batch | rows | device tok/s | host tok/s (x) | host+cache tok/s (x) | hit rate | hash ms | "
        "gather ms | transfer ms | device step ms | host step ms | host critical ms | hidden |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
  for r in results:
    s = r["host"]["split"]
    print(f"| {r['table_scale']}x | {r['batch']} | {r['table_rows']:,} | {r['device']['tokens_per_s']:.1f} | "
          f"{r['host']['tokens_per_s']:.1f} ({r['host']['ratio_to_device']:.3f}) | "
          f"{r['host_cache']['tokens_per_s']:.1f} ({r['host_cache']['ratio_to_device']:.3f}) | "
          f"{r['host_cache'].get('hit_rate', float('nan')):.2f} | {s['hash_ms']:.3f} | {s['gather_ms']:.3f} | "
          f"{s['transfer_ms']:.3f} | {s['device_step_ms']:.2f} | {r['host']['step_ms']:.2f} | "
          f"{r['host']['host_critical_ms']:.2f} | {s['hidden_fraction']:.2f} |")
  print(f"load average before {load_before}, after {record['load_avg_after']} ({os.cpu_count()} cores)")
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  tmp = args.out + ".tmp"
  with open(tmp, "w") as f:
    json.dump(record, f, indent=1)
  os.replace(tmp, args.out)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
