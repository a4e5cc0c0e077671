"""Train-step cost of dense vs MoE vs Engram+MoE at matched activated parameters (issue 3), on CPU.

    .venv/bin/python benchmarks/train_step.py [--quick] [--steps 20] [--batch 16] [--seq 256] [--rhos 0.8]

The variants come from configs/experiments/sparsity_allocation_cpu.gin (the CPU sparsity sweep's backbone):
  moe            the pure-MoE point (rho = 1) of the sweep;
  engram_moe     the sweep's point at each --rhos (same P_tot, P_act, FLOPs/token; engram_jax.budget);
  engram_moe_sgd the same with SGD on the tables (no Adam moments): the difference to engram_moe is the dense
                 Adam pass over the table (ENV_NOTES), which is where Engram's extra step time goes on CPU;
  dense          every layer a dense SwiGLU, its width chosen so P_act matches the MoE's.
Every variant runs the real training step of engram_jax.train (optimizer groups, clipping, MoE balance update)
on one CPU device and a random packed token batch; steps are timed round-robin across variants (one step of each
in turn) so load from other processes on a shared machine falls on all alike. Reported: compile time, median
step time, tokens/s, ratio to the MoE step, process CPU seconds per step (robust to load), the step split into
forward+backward alone and optimizer update alone, XLA's memory analysis of each compiled step (arguments = params +
optimizer state + batch; temp = scratch), the process's peak RSS, and P_tot / P_act / FLOPs per token. Table printed, JSON written to benchmarks/results/train_step.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
CPU_SWEEP = os.path.join(ROOT, "configs/experiments/sparsity_allocation_cpu.gin")

from packed_rows import packed_layout  # noqa: E402  (benchmarks/ is the script's directory)


def _rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def build(config, table_optimizer: str, batch: int, seq: int) -> dict:
  """Compiles one variant's real train step (engram_jax.steps.make_setup) on a random packed batch."""
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  from engram_jax import losses, sharding, steps  # noqa: PLC0415
  from engram_jax.data.feed import to_global  # noqa: PLC0415
  from engram_jax.optim import OptimizerConfig  # noqa: PLC0415

  mesh = sharding.make_mesh("data=1")
  setup = steps.make_setup(config, OptimizerConfig(table_optimizer=table_optimizer), 1000, mesh)
  state = setup.init(jnp.int32(0))
  rng = np.random.default_rng(0)
  seg, pos = packed_layout(rng, batch, seq)  # documents of 32..seq tokens, as the data pipeline packs them
  data = {"targets": rng.integers(3, config.vocab_size, (batch, seq)).astype(np.int32), "segment_ids": seg,
          "positions": pos}
  data = to_global(data, mesh)
  t0 = time.perf_counter()
  compiled = setup.train_step.lower(state, data).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  info = {"compile_s": compile_s}
  for k in ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes"):
    info[k] = int(getattr(mem, k, 0) or 0) if mem is not None else None
  # Where the time goes: forward + backward alone, and the optimizer update alone (on stand-in gradients).
  import jax  # noqa: PLC0415
  import optax  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  def loss(params, rest, batch):
    nll, count, aux = losses.lm_terms(nnx.merge(setup.graphdef, params, rest), batch)
    return nll / jnp.maximum(count, 1.0) + aux["moe_aux_loss"]

  grad_only = jax.jit(lambda p, r, b: optax.global_norm(jax.grad(loss)(p, r, b)))
  update_only = jax.jit(lambda p, o, g: optax.apply_updates(p, setup.tx.update(g, o, p)[0]))
  ones = jax.tree.map(jnp.ones_like, state["params"])
  parts = {"fwd_bwd": lambda st: grad_only(st["params"], st["rest"], data),  # st: the live (not donated) state
           "update": lambda st: update_only(st["params"], st["opt"], ones)}
  return {"step": compiled, "state": state, "batch": data, "info": info, "parts": parts}


def time_round_robin(built: dict[str, dict], steps: int) -> dict[str, dict[str, list[float]]]:
  """One warm-up call each, then `steps` rounds timing one call of every (variant, part) in turn, so that load from
  other processes on a shared machine falls on all alike. Wall and process CPU seconds (XLA's CPU time over all
  threads: robust to load, about 2x the unloaded wall time on 2 cores)."""
  import jax  # noqa: PLC0415

  times = {name: {k: [] for k in ("step", "step_cpu", "fwd_bwd", "update")} for name in built}
  for rnd in range(steps + 1):
    for name, b in built.items():
      t, c = time.perf_counter(), time.process_time()
      b["state"], m = b["step"](b["state"], b["batch"])
      jax.block_until_ready(m)
      if rnd:
        times[name]["step"].append(time.perf_counter() - t)
        times[name]["step_cpu"].append(time.process_time() - c)
      b["loss"] = float(m["loss"])
      for part, fn in b["parts"].items():
        t = time.perf_counter()
        jax.block_until_ready(fn(b["state"]))
        if rnd:
          times[name][part].append(time.perf_counter() - t)
  return times


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
  p.add_argument("--steps", type=int, default=20, help="timed round-robin steps per variant (after 1 warm-up)")
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--rhos", type=float, nargs="+", default=[0.8], help="Engram+MoE points of the CPU sweep")
  p.add_argument("--quick", action="store_true", help="5 steps of 4 x 128 tokens (a smoke run)")
  p.add_argument("--json", default=os.path.join(ROOT, "benchmarks/results/train_step.json"))
  args = p.parse_args(argv)
  if args.quick:
    args.steps, args.batch, args.seq = 5, 4, 128

  from engram_jax import budget  # noqa: PLC0415
  from engram_jax.experiments.sparsity_allocation import _jsonable, software_versions  # noqa: PLC0415

  rows, built = [], {}
  for name, config, table_opt in variants(args.rhos, seq=args.seq):
    bud = budget.compute_budget(config, args.seq)
    print(f"compiling {name} ...", flush=True)
    built[name] = build(config, table_opt, args.batch, args.seq)
    rows.append({"name": name, "table_optimizer": table_opt, "p_total": bud.total, "p_active": bud.active,
                 "engram_table": bud.engram_table, "num_experts": bud.num_experts,
                 "flops_per_token": bud.flops_per_token, "model_config": _jsonable(config), **built[name]["info"]})
  times = time_round_robin(built, args.steps)
  for r in rows:
    t = times[r["name"]]
    med = statistics.median(t["step"])
    r.update(step_ms_median=1e3 * med, step_ms_min=1e3 * min(t["step"]), step_ms_all=[1e3 * x for x in t["step"]],
             step_cpu_s_median=statistics.median(t["step_cpu"]),
             fwd_bwd_ms_median=1e3 * statistics.median(t["fwd_bwd"]),
             update_ms_median=1e3 * statistics.median(t["update"]),
             tokens_per_s=args.batch * args.seq / med, loss_last=built[r["name"]]["loss"])
  moe_ms = next(r["step_ms_median"] for r in rows if r["name"] == "moe")
  for r in rows:
    r["step_ratio_vs_moe"] = r["step_ms_median"] / moe_ms
  moe_cpu = next(r["step_cpu_s_median"] for r in rows if r["name"] == "moe")
  for r in rows:
    r["cpu_ratio_vs_moe"] = r["step_cpu_s_median"] / moe_cpu

  head = (f"{'variant':<24} {'E':>3} {'P_tot':>9} {'P_act':>8} {'FLOPs/tok':>10} {'compile s':>9} {'step ms':>8} "
          f"{'tok/s':>7} {'x MoE':>6} {'cpu s':>6} {'x MoE':>6} {'fwd+bwd':>8} {'update':>7} {'state MB':>8} "
          f"{'temp MB':>8}")
  lines = [head, "-" * len(head)]
  for r in rows:
    lines.append(f"{r['name']:<24} {r['num_experts']:3d} {r['p_total'] / 1e6:8.3f}M {r['p_active'] / 1e6:7.3f}M "
                 f"{r['flops_per_token'] / 1e6:9.2f}M {r['compile_s']:9.1f} {r['step_ms_median']:8.1f} "
                 f"{r['tokens_per_s']:7.0f} {r['step_ratio_vs_moe']:6.3f} {r['step_cpu_s_median']:6.2f} "
                 f"{r['cpu_ratio_vs_moe']:6.3f} {r['fwd_bwd_ms_median']:8.1f} {r['update_ms_median']:7.1f} "
                 f"{(r['argument_size_in_bytes'] or 0) / 2**20:8.1f} {(r['temp_size_in_bytes'] or 0) / 2**20:8.1f}")
  table = "\n".join(lines)
  print(f"\ntrain step, batch {args.batch} x seq {args.seq}, median of {args.steps} round-robin steps, 1 CPU "
        f"device ({os.cpu_count()} cores visible, load average {os.getloadavg()[0]:.1f}); state MB = params + "
        f"optimizer state + batch (XLA arguments), temp MB = XLA scratch of the compiled step; cpu s = process "
        f"CPU seconds per step (all threads); fwd+bwd / update = ms of the gradient alone / the optimizer update "
        f"alone; peak RSS of this process {_rss_mb():.0f} MB\n{table}")
  os.makedirs(os.path.dirname(args.json), exist_ok=True)
  result = {"command": " ".join([sys.executable] + sys.argv), "versions": software_versions(),
            "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor()},
            "load_average": os.getloadavg(), "peak_rss_mb_all_variants": _rss_mb(),
            "batch": args.batch, "seq": args.seq, "steps": args.steps, "table": table, "variants": rows}
  with open(args.json, "w") as f:
    json.dump(result, f, indent=1)
  print(f"wrote {args.json}")
  return result


if __name__ == "__main__":
  main()
