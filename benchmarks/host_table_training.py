"""Training step time with Engram tables on the device vs in host memory (EngramConfig.table_placement).

    .venv/bin/python benchmarks/host_table_training.py [--rows 2400000 9600000] [--reps 6] [--block 3]

Model: the quickstart model (configs/models/engram_moe_tiny.gin) with its 8 Engram tables scaled so the flat table
has about --rows rows; table optimizer adam_lazy in both variants (host placement refuses adam_dense):
  device  the row-sparse train step of engram_jax.steps with the table and its Adam moments on the device;
  host    engram_jax.host_training: table and moments in host memory (numpy), batches hashed and gathered on the
          host one step ahead, row gradients back, sparse update on the host (the rows the next batch reads at
          once, the rest on a worker thread while the device runs the next step).
Both run the same random packed batches (Zipf tokens). Blocks of --block steps alternate between the variants
(--reps blocks each), so machine load falls on both alike; reported: median step time per variant and their ratio,
and the host's work per step: hash, gather, update (on the step's path / on the worker), re-gather of the next
batch's updated rows, send, and how much of it the worker hid behind the device step. On a CPU-only machine the
"device" is the same CPU cores, so the worker's work competes with the step instead of running beside it.
Writes benchmarks/results/host_table_training.json.
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

from packed_rows import packed_layout  # noqa: E402  (benchmarks/ is the script's directory)


def model_config(rows: int, placement: str):
  from engram_jax import configurables  # noqa: PLC0415
  config, _, _ = configurables.resolve("train", [MODEL_GIN, "configs/runs/pretrain.gin"],
                                       ["MODEL_DIR='/tmp/unused'", "TRAIN_STEPS=1"])
  e = config.engram
  base = max(2, rows // e.num_heads)  # one table per head: H tables of ~rows / H rows
  return dataclasses.replace(config, engram=dataclasses.replace(
      e, table_base_sizes=(base,) * len(e.table_base_sizes), table_placement=placement))


def batches(n: int, batch: int, seq: int, vocab: int, seed: int = 0) -> list[dict]:
  """Packed rows: documents of 32..seq Zipf-distributed tokens."""
  import numpy as np  # noqa: PLC0415
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    seg, pos = packed_layout(rng, batch, seq)
    targets = ((rng.zipf(1.2, size=(batch, seq)) - 1) % (vocab - 1) + 1).astype(np.int32)
    out.append({"targets": targets, "segment_ids": seg, "positions": pos})
  return out


def run_size(rows: int, args) -> dict:
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from engram_jax import host_training, sharding, steps  # noqa: PLC0415
  from engram_jax.data.feed import to_global  # noqa: PLC0415
  from engram_jax.optim import OptimizerConfig  # noqa: PLC0415

  mesh = sharding.make_mesh("data=1", jax.devices()[:1])
  opt = OptimizerConfig(table_optimizer="adam_lazy", warmup_steps=10)
  total = 1 + args.reps * args.block
  data = batches(total + 1, args.batch, args.seq, 8192)

  t0 = time.perf_counter()
  dcfg = model_config(rows, "device")
  dev = steps.make_setup(dcfg, opt, 1000, mesh)
  dstate = dev.init(jnp.int32(0))
  dstate, m = dev.train_step(dstate, to_global(data[0], mesh))
  jax.block_until_ready(m)
  compile_device = time.perf_counter() - t0
  table_rows = dev.abstract["params"]["blocks"][1]["engram"]["table"].shape[0]

  t0 = time.perf_counter()
  host = host_training.make_host_setup(model_config(rows, "host"), opt, 1000, mesh)
  hstate = host.init(jnp.int32(0))
  feed = host.feed(iter(data))
  hstate, m = host.train_step(hstate, next(feed))
  jax.block_until_ready(m)
  compile_host = time.perf_counter() - t0

  times = {"device": [], "host": []}
  parts = []
  di = 1
  for _ in range(args.reps):
    t0 = time.perf_counter()
    for _ in range(args.block):
      dstate, m = dev.train_step(dstate, to_global(data[di], mesh))
      di += 1
    jax.block_until_ready(m)
    times["device"].append((time.perf_counter() - t0) / args.block)
    before = host.times.as_dict()
    t0 = time.perf_counter()
    for _ in range(args.block):
      hstate, m = host.train_step(hstate, next(feed))
    jax.block_until_ready(m)
    host.sync()  # the block's last worker update is inside the block's time
    times["host"].append((time.perf_counter() - t0) / args.block)
    after = host.times.as_dict()
    parts.append({k: (after[k] - before[k]) / args.block for k in after if k != "steps"})
  host.close()
  med = {k: statistics.median(v) for k, v in times.items()}
  ms = lambda k: 1e3 * statistics.median(p[k] for p in parts)
  worker = ms("worker_hash_s") + ms("worker_gather_s") + ms("worker_update_s")
  exposed = ms("main_wait_worker_s") + ms("main_update_s") + ms("main_patch_s") + ms("main_send_s")
  return {
      "rows": int(table_rows), "table_mib": table_rows * dcfg.engram.head_dim * 4 / 2**20,
      "compile_s": {"device": compile_device, "host": compile_host},
      "step_s_median": med, "host_over_device": med["host"] / med["device"], "step_s_all": times,
      "host_ms_per_step": {
          "hash": ms("worker_hash_s"), "gather": ms("worker_gather_s"), "update_worker": ms("worker_update_s"),
          "update_main": ms("main_update_s"), "regather_next": ms("main_patch_s"), "send": ms("main_send_s"),
          "wait_worker": ms("main_wait_worker_s"), "worker_total": worker, "exposed_total": exposed,
          "hidden_fraction": max(0.0, 1 - ms("main_wait_worker_s") / worker) if worker else None,
          "rows_updated": statistics.median(p["rows_updated"] for p in parts),
          "rows_updated_main": statistics.median(p["rows_updated_main"] for p in parts)},
  }


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--rows", type=int, nargs="+", default=[2_400_000, 9_600_000])
  ap.add_argument("--reps", type=int, default=6)
  ap.add_argument("--block", type=int, default=3)
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--seq", type=int, default=256)
  ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks/results/host_table_training.json"))
  args = ap.parse_args(argv)
  import jax  # noqa: PLC0415
  results = [run_size(r, args) for r in args.rows]
  print(f"\nquickstart model, batch {args.batch} x {args.seq}, adam_lazy tables, {args.reps} blocks of {args.block} "
        f"steps per variant (interleaved), backend {jax.default_backend()}")
  print(f"{'rows':>10} {'MiB':>6} | {'device s':>8} {'host s':>8} {'ratio':>6} | {'hash':>6} {'gather':>6} "
        f"{'upd wkr':>7} {'upd main':>8} {'regath':>6} {'send':>6} {'wait':>6} | {'hidden':>6}")
  for r in results:
    h = r["host_ms_per_step"]
    print(f"{r['rows']:>10,} {r['table_mib']:>6.0f} | {r['step_s_median']['device']:>8.3f} "
          f"{r['step_s_median']['host']:>8.3f} {r['host_over_device']:>6.3f} | {h['hash']:>6.1f} {h['gather']:>6.1f} "
          f"{h['update_worker']:>7.1f} {h['update_main']:>8.1f} {h['regather_next']:>6.1f} {h['send']:>6.1f} "
          f"{h['wait_worker']:>6.1f} | {100 * (h['hidden_fraction'] or 0):>5.0f}%")
  print("host columns: ms per step; 'hidden': share of the worker's hash+gather+update not waited for")
  out = {"args": vars(args), "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()[:1]],
         "jax": jax.__version__, "machine": platform.platform(), "cpus": os.cpu_count(),
         "load_avg_at_end": os.getloadavg(), "results": results}
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(out, f, indent=1)
  print(f"wrote {args.out}")
  return out


if __name__ == "__main__":
  main()
