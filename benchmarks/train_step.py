"""Train-step cost of dense vs MoE vs Engram+MoE at matched activated parameters (issue 3), on CPU.

    .venv/bin/python benchmarks/train_step.py [--quick] [--steps 20] [--batch 16] [--seq 256] [--rhos 0.8]

The variants come from configs/experiments/sparsity_allocation_cpu.gin (the CPU sparsity sweep's backbone):
  moe            the pure-MoE point (rho = 1) of the sweep;
  engram_moe     the sweep's point at each --rhos (same P_tot, P_act, FLOPs/token; engram_jax.budget);
  engram_moe_sgd the same with SGD on the tables (no Adam moments): the difference to engram_moe is the dense
                 Adam pass over the table (ENV_NOTES), which is where Engram's extra step time goes on CPU;
  dense          every layer a dense SwiGLU, its width chosen so P_act matches the MoE's.
Each variant runs in its own subprocess (one CPU device) through the real training step of engram_jax.train
(optimizer groups, clipping, MoE balance update), on random packed token batches. Reported: compile time, median
step time, tokens/s, ratio to the MoE step, peak RSS (resource.getrusage) and XLA's memory analysis of the
compiled step, P_tot / P_act / FLOPs per token. Table printed, JSON written to benchmarks/results/train_step.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
CPU_SWEEP = os.path.join(ROOT, "configs/experiments/sparsity_allocation_cpu.gin")


def _rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def worker(spec: dict) -> dict:
  """Runs in a fresh process: builds the variant, compiles and times its train step."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  from engram_jax import sharding, train  # noqa: PLC0415
  from engram_jax.experiments import sparsity_allocation as sa  # noqa: PLC0415
  from engram_jax.layers.engram_config import EngramConfig  # noqa: PLC0415
  from engram_jax.layers.moe_config import MoEConfig  # noqa: PLC0415
  from engram_jax.models.config import ModelConfig  # noqa: PLC0415
  from engram_jax.optim import OptimizerConfig  # noqa: PLC0415

  rss_start = _rss_mb()
  cfg = spec["config"]
  moe = MoEConfig(**cfg.pop("moe")) if cfg.get("moe") else None
  eng = EngramConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.pop("engram").items()}
                     ) if cfg.get("engram") else None
  cfg.pop("moe", None), cfg.pop("engram", None)
  config = ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}, moe=moe, engram=eng)
  optimizer = OptimizerConfig(table_optimizer=spec["table_optimizer"])
  b, s = spec["batch"], spec["seq"]
  mesh = sharding.make_mesh("data=1")
  setup = train.make_setup(config, optimizer, 1000, mesh)
  state = setup.init(jnp.int32(0))
  rng = np.random.default_rng(0)
  # Packed rows: documents of 32..s tokens, as the data pipeline produces them.
  seg = np.zeros((b, s), np.int32)
  pos = np.zeros((b, s), np.int32)
  for r in range(b):
    i, doc = 0, 1
    while i < s:
      n = min(int(rng.integers(32, s + 1)), s - i)
      seg[r, i:i + n], pos[r, i:i + n] = doc, np.arange(n)
      i, doc = i + n, doc + 1
  batch = {"targets": rng.integers(3, config.vocab_size, (b, s)).astype(np.int32), "segment_ids": seg,
           "positions": pos}
  batch = train.to_global(batch, mesh)
  t0 = time.perf_counter()
  compiled = setup.train_step.lower(state, batch).compile()
  mem = compiled.memory_analysis()
  compile_s = time.perf_counter() - t0
  state, m = setup.train_step(state, batch)  # first call (any residual compile / allocation)
  jax.block_until_ready(m)
  times = []
  for _ in range(spec["steps"]):
    t = time.perf_counter()
    state, m = setup.train_step(state, batch)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
  med = statistics.median(times)
  out = {"compile_s": compile_s, "step_ms_median": 1e3 * med, "step_ms_min": 1e3 * min(times),
         "step_ms_all": [1e3 * t for t in times], "tokens_per_s": b * s / med, "loss_last": float(m["loss"]),
         "rss_start_mb": rss_start, "rss_peak_mb": _rss_mb()}
  if mem is not None:
    for k in ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes"):
      out[k] = int(getattr(mem, k, 0) or 0)
  del sa
  return out


def _run_worker(spec: dict) -> dict:
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # one CPU device: the benchmark times the kernels, not fake-device collectives
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--_worker", json.dumps(spec)],
                        capture_output=True, text=True, env=env, cwd=ROOT)
  for line in proc.stdout.splitlines():
    if line.startswith("RESULT "):
      return json.loads(line[len("RESULT "):])
  raise RuntimeError(f"worker {spec['name']} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")


def variants(rhos, *, seq: int) -> list[tuple[str, object, str]]:
  """(name, ModelConfig, table optimizer) of every variant, from the CPU sweep's gin config."""
  from engram_jax import budget  # noqa: PLC0415
  from engram_jax.experiments import sparsity_allocation as sa  # noqa: PLC0415

  sweep, _, _ = sa.load_gin([CPU_SWEEP])
  sweep = dataclasses.replace(sweep, rhos=(1.0,) + tuple(r for r in rhos if r != 1.0))
  allocs = sa.plan_sweep(sweep, seq)
  moe = allocs[0].config
  target = allocs[0].budget.active
  # Dense: all layers SwiGLU of one width, the smallest whose P_act reaches the MoE's.
  dense = dataclasses.replace(moe, moe=None, num_dense_layers=moe.num_layers)
  per_unit = 3 * moe.d_model * moe.num_layers
  base = budget.compute_budget(dataclasses.replace(dense, dense_hidden=1), seq).active - per_unit
  dense = dataclasses.replace(dense, dense_hidden=max(1, round((target - base) / per_unit)))
  out = [("dense", dense, "adam"), ("moe", moe, "adam")]
  for a in allocs[1:]:
    tag = f"engram_moe_rho{a.rho_target:g}"
    out += [(tag, a.config, "adam"), (tag + "_sgd", a.config, "sgd")]
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--steps", type=int, default=20, help="timed steps per variant (after compile + 1 warm-up)")
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--rhos", type=float, nargs="+", default=[0.8], help="Engram+MoE points of the CPU sweep")
  p.add_argument("--quick", action="store_true", help="5 steps of 4 x 128 tokens (a smoke run)")
  p.add_argument("--json", default=os.path.join(ROOT, "benchmarks/results/train_step.json"))
  p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args._worker:
    print("RESULT " + json.dumps(worker(json.loads(args._worker))), flush=True)
    return None
  if args.quick:
    args.steps, args.batch, args.seq = 5, 4, 128

  from engram_jax import budget  # noqa: PLC0415
  from engram_jax.experiments.sparsity_allocation import _jsonable, software_versions  # noqa: PLC0415

  rows = []
  for name, config, table_opt in variants(args.rhos, seq=args.seq):
    bud = budget.compute_budget(config, args.seq)
    spec = {"name": name, "config": _jsonable(config), "table_optimizer": table_opt, "batch": args.batch,
            "seq": args.seq, "steps": args.steps}
    print(f"running {name} ...", flush=True)
    res = _run_worker(spec)
    rows.append({"name": name, "table_optimizer": table_opt, "p_total": bud.total, "p_active": bud.active,
                 "engram_table": bud.engram_table, "num_experts": bud.num_experts,
                 "flops_per_token": bud.flops_per_token, "model_config": _jsonable(config), **res})
  moe_ms = next(r["step_ms_median"] for r in rows if r["name"] == "moe")
  for r in rows:
    r["step_ratio_vs_moe"] = r["step_ms_median"] / moe_ms

  head = (f"{'variant':<24} {'P_tot':>9} {'P_act':>8} {'FLOPs/tok':>10} {'compile s':>9} {'step ms':>8} "
          f"{'tok/s':>8} {'x MoE':>6} {'RSS MB':>7} {'XLA temp MB':>11}")
  lines = [head, "-" * len(head)]
  for r in rows:
    lines.append(f"{r['name']:<24} {r['p_total'] / 1e6:8.3f}M {r['p_active'] / 1e6:7.3f}M "
                 f"{r['flops_per_token'] / 1e6:9.2f}M {r['compile_s']:9.1f} {r['step_ms_median']:8.1f} "
                 f"{r['tokens_per_s']:8.0f} {r['step_ratio_vs_moe']:6.3f} {r['rss_peak_mb']:7.0f} "
                 f"{r.get('temp_size_in_bytes', 0) / 2**20:11.1f}")
  table = "\n".join(lines)
  print(f"\ntrain step, batch {args.batch} x seq {args.seq}, {args.steps} timed steps, 1 CPU device "
        f"({os.cpu_count()} cores visible)\n{table}")
  os.makedirs(os.path.dirname(args.json), exist_ok=True)
  result = {"command": " ".join([sys.executable] + sys.argv), "versions": software_versions(),
            "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor()},
            "batch": args.batch, "seq": args.seq, "steps": args.steps, "table": table, "variants": rows}
  with open(args.json, "w") as f:
    json.dump(result, f, indent=1)
  print(f"wrote {args.json}")
  return result


if __name__ == "__main__":
  main()
