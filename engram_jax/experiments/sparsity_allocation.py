"""Sparsity-allocation sweep (arXiv 2601.07372, section 3): validation loss against the MoE share rho.

A fixed sparse-parameter budget is split between routed experts (conditional computation) and Engram tables
(conditional memory); P_tot, P_act and FLOPs per token are held equal (engram_jax.budget.solve_allocation). One
model is trained per (rho, seed) on the same data and token count. The paper finds a U-shaped curve with its
minimum near rho = 0.75-0.8.

    python -m engram_jax.experiments.sparsity_allocation --gin_file=configs/experiments/sparsity_allocation_cpu.gin
    python -m engram_jax.budget --gin_file=configs/experiments/budget_6e20.gin      # budget table only

Resumable: each finished run leaves `<out_dir>/<run>/sweep_result.json` and is skipped next time (an interrupted
run resumes from its own latest checkpoint through train_and_evaluate). Outputs:
`<out_dir>/plan.json` (budget table, before anything trains), `results.json` (losses, budgets, tokens, wall time,
versions, command), `loss_vs_rho.png` (mean validation loss per rho with seed error bars, and the paired gaps) and
`val_curves.png` (validation curves per rho and their gap to rho = 1 over training).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence

from engram_jax import budget
from engram_jax.experiments import token_budgets
from engram_jax.experiments.sweep_report import analyse, final_loss, format_analysis, plot_curves, plot_sweep, summarise
from engram_jax.layers.engram_config import EngramConfig
from engram_jax.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class SweepConfig:
  """What a sparsity-allocation sweep holds fixed and what it varies."""

  backbone: ModelConfig  # Attention, layers, dense FFN, shared experts, top_k, expert width; num_experts is solved.
  engram: EngramConfig  # Shape of each Engram module (N, K, head_dim, G); table sizes are solved per rho.
  engram_layers: tuple[int, ...] = (1,)  # Blocks that get Engram when rho < 1 (paper: early layers).
  rhos: tuple[float, ...] = (1.0, 0.9, 0.8, 0.6, 0.4, 0.2)  # MoE share of P_sparse; 1.0 = pure MoE.
  seeds: tuple[int, ...] = (0, 1)  # One run per (rho, seed) via RunConfig.seed (init and data order); all rhos of
  #                                   a seed see the same batches. Error bars are over seeds.
  p_total: int | None = None  # Target P_tot; or give num_experts (at rho = 1) or total_to_active instead.
  num_experts: int | None = None  # Routed experts of the pure-MoE point (paper: 106 at 2e20, 99 at 6e20).
  total_to_active: float | None = None  # P_tot / P_act (paper: ~10).
  seq_len: int = 256  # For FLOPs/token; a run config's seq_len overrides it when training.
  offset: str = "dense_ffn"  # How P_act is kept equal (see engram_jax.budget).
  tolerance: float = 0.01  # Allowed relative miss of P_tot, P_act and FLOPs/token.
  train_flops: float | None = None  # Compute budget C (paper: 2e20, 6e20): the table reports C / (FLOPs/token) tokens.
  report_only: bool = False  # Train nothing: summarise the finished runs (a partial report while runs are left).
  # Smaller token budgets, in steps, analysed beside the full length: WSD cooldown branches from each run
  # (engram_jax.experiments.token_budgets), each costing its cooldown's steps only.
  budgets: tuple[int, ...] = ()

  def __post_init__(self):
    if not self.rhos:
      raise ValueError("SweepConfig.rhos is empty; list the MoE shares to train, e.g. (1.0, 0.8, 0.6)")
    if not self.seeds:
      raise ValueError("SweepConfig.seeds is empty; give at least one seed")
    if len(set(self.rhos)) != len(self.rhos) or len(set(self.seeds)) != len(self.seeds):
      raise ValueError(f"SweepConfig.rhos={self.rhos} / seeds={self.seeds} contain duplicates; list each once")


def plan_sweep(sweep: SweepConfig, seq_len: int | None = None) -> list[budget.Allocation]:
  """The concrete config of every rho (raises if a point misses the tolerance)."""
  return budget.solve_sweep(sweep.backbone, sweep.engram, sweep.engram_layers, sweep.rhos,
                            seq_len=seq_len or sweep.seq_len, p_total=sweep.p_total, num_experts=sweep.num_experts,
                            total_to_active=sweep.total_to_active, offset=sweep.offset, tolerance=sweep.tolerance)


def run_tokens(run) -> int | None:
  """Training tokens of one run (all steps, also when it resumed from a checkpoint)."""
  if not all(hasattr(run, k) for k in ("steps", "batch_size", "seq_len")):
    return None
  return (getattr(run, "stop_after", None) or run.steps) * run.batch_size * run.seq_len


def run_name(rho: float, seed: int) -> str:
  return f"rho{rho:.3f}_seed{seed}"


def software_versions() -> dict[str, str]:
  out = {"python": platform.python_version(), "platform": platform.platform()}
  for pkg in ("jax", "jaxlib", "flax", "optax", "numpy", "orbax-checkpoint", "gin-config"):
    try:
      out[pkg] = importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
      out[pkg] = "missing"
  return out


def _jsonable(x):
  """Plain JSON types from numpy / jax scalars, arrays, tuples and dataclasses."""
  if dataclasses.is_dataclass(x) and not isinstance(x, type):
    return _jsonable(dataclasses.asdict(x))
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if hasattr(x, "tolist"):
    return _jsonable(x.tolist())
  if isinstance(x, float) and not math.isfinite(x):
    return str(x)
  return x


def _write_json(path: str, obj) -> None:
  """Atomic: a crash never leaves a half-written result that would mark a run as finished."""
  from engram_jax import fileio  # noqa: PLC0415
  fileio.atomic_write(path, json.dumps(_jsonable(obj), indent=1))


def routing_stats(run_dir: str) -> dict:
  """From the run's metrics.jsonl: mean MoE drop fraction over logged steps (capacity dispatch drops tokens, and
  fewer experts at lower rho could drop more), the last max/mean expert load and the last Engram gate means."""
  from engram_jax.metrics_io import read_records  # noqa: PLC0415 - the one reader of metrics.jsonl
  records = read_records(os.path.join(run_dir, "metrics.jsonl"))
  if not records:
    return {}
  drops = [r["aux/dropped_fraction"] for r in records if "aux/dropped_fraction" in r]
  out = {"mean_dropped_fraction": sum(drops) / len(drops) if drops else None}
  for key, name in (("aux/max_over_mean_load", "last_max_over_mean_load"), ("aux/engram_gate_mean", "last_gate")):
    values = [r[key] for r in records if key in r]
    out[name] = values[-1] if values else None
  return out


def _default_train_fn():
  from engram_jax import train  # noqa: PLC0415 - training pulls in the data pipeline; the planner does not.
  return train.train_and_evaluate


def config_differs(saved, now) -> bool:
  """Whether a finished run's recorded config (JSON) differs from the planned one. Fields the record lacks are
  implementation choices added later with math-preserving defaults (e.g. MoEConfig.capacity_impl): ignored."""
  if isinstance(saved, dict) and isinstance(now, dict):
    return any(k not in now or config_differs(v, now[k]) for k, v in saved.items())
  return saved != now


def run_sweep(sweep: SweepConfig, run, out_dir: str, *, train_fn: Callable | None = None,
              command: str | None = None, log: Callable[[str], None] = print) -> dict:
  """Trains every (rho, seed) not yet finished under `out_dir`, then writes results.json and loss_vs_rho.png.

  `run` is the training run config (engram_jax.run_config.RunConfig): every point uses it unchanged except `seed`.
  `train_fn(model_config, run_config, model_dir) -> dict` defaults to engram_jax.train.train_and_evaluate.
  """
  train_fn = train_fn or _default_train_fn()
  budgets = token_budgets.check_budgets(sweep.budgets, run)  # before anything is written or compiled
  seq_len = getattr(run, "seq_len", None) or sweep.seq_len
  os.makedirs(out_dir, exist_ok=True)
  allocs = plan_sweep(sweep, seq_len)
  table = budget.format_table(allocs)
  log(f"sparsity allocation: {len(allocs)} points x {len(sweep.seeds)} seeds, seq_len {seq_len}\n{table}")
  _write_json(os.path.join(out_dir, "plan.json"),
              {"sweep": sweep, "run": run, "table": table, "points": [a.as_dict() for a in allocs]})

  runs, missing = [], []
  t_sweep = time.time()
  for alloc in allocs:
    for seed in sweep.seeds:
      name = run_name(alloc.rho_target, seed)
      run_dir = os.path.join(out_dir, name)
      path = os.path.join(run_dir, "sweep_result.json")  # train_and_evaluate writes its own result.json
      model_json = _jsonable(alloc.config)
      if os.path.exists(path):
        with open(path) as f:
          done = json.load(f)
        saved = {k: v for k, v in done["model_config"].items() if k != "engram_compression_path"}  # older key
        if config_differs(saved, model_json):
          raise ValueError(f"{path} was trained with a different model config than this sweep plans for rho="
                           f"{alloc.rho_target}; use a new out_dir or delete that run")
        log(f"[{name}] finished earlier: val loss {final_loss(done['train']):.4f} (skipped)")
        runs.append(done)
        continue
      if sweep.report_only:
        missing.append(name)
        log(f"[{name}] not finished: left out of the report (report_only)")
        continue
      os.makedirs(run_dir, exist_ok=True)
      run_cfg = dataclasses.replace(run, seed=seed) if hasattr(run, "seed") else run
      log(f"[{name}] training: E={alloc.budget.num_experts} Engram={alloc.budget.engram_table} "
          f"P_tot={alloc.budget.total} P_act={alloc.budget.active}")
      t0 = time.time()
      branches = {}
      if budgets:
        result, branches = token_budgets.train_with_budgets(train_fn, alloc.config, run_cfg, run_dir, budgets, log)
      else:
        result = train_fn(alloc.config, run_cfg, run_dir)
      wall = time.time() - t0
      tokens = run_tokens(run_cfg)
      record = {"name": name, "rho": alloc.rho_target, "seed": seed, "wall_s": wall,
                "tokens": tokens, "train_flops": alloc.budget.flops_per_token * tokens if tokens else None,
                "budget": alloc.as_dict(), "model_config": model_json, "run_config": run_cfg,
                "routing": routing_stats(run_dir), "train": result,
                "budgets": {str(t): r for t, r in branches.items()}}
      _write_json(path, record)
      runs.append(_jsonable(record))
      log(f"[{name}] val loss {final_loss(result):.4f} in {wall:.0f} s")

  if not runs:
    raise ValueError(f"{out_dir}: no finished run to report; run without SweepConfig.report_only first")
  summary = summarise(runs)
  analysis = analyse(summary, runs)
  by_budget = {}
  for t in budgets:  # the same analysis over each budget's branches (runs trained before it was asked for: none)
    at = token_budgets.runs_at(runs, t)
    if at:
      s = summarise(at)
      by_budget[str(t)] = {"tokens": t * run.batch_size * run.seq_len, "summary": s, "analysis": analyse(s, at)}
  results = {"command": command or " ".join([sys.executable] + sys.argv), "versions": software_versions(),
             "sweep": sweep, "run": run, "table": table, "summary": summary, "analysis": analysis, "runs": runs,
             "by_budget": by_budget, "not_finished": missing,
             "sweep_wall_s_this_invocation": time.time() - t_sweep}
  _write_json(os.path.join(out_dir, "results.json"), results)
  plot_sweep(summary, os.path.join(out_dir, "loss_vs_rho.png"), analysis=analysis)
  plot_curves(runs, os.path.join(out_dir, "val_curves.png"))
  log("rho    mean val loss   std      n\n" + "\n".join(
      f"{s['rho']:.3f}  {s['mean_val_loss']:.4f}        {s['std_val_loss']:.4f}   {s['n']}" for s in summary)
      + "\n" + format_analysis(analysis) + (f"\nnot finished (left out): {', '.join(missing)}" if missing else ""))
  for t, b in by_budget.items():
    log(f"at the {t}-step budget ({b['tokens']} tokens): " + ", ".join(
        f"rho {s['rho']:.3f} {s['mean_val_loss']:.4f}" for s in b["summary"]) + "\n" + format_analysis(b["analysis"]))
  return results


# ----------------------------------------------------------------------------------------------------------------
# Entry points (flags and gin: engram_jax.cli / engram_jax.configurables)
# ----------------------------------------------------------------------------------------------------------------


def load_gin(files: Sequence[str], bindings: Sequence[str] = ()) -> tuple[SweepConfig, object, str | None]:
  """Parses gin files and bindings like the command line does -> (sweep, run config or None, out_dir or None)."""
  from engram_jax import cli, configurables  # noqa: PLC0415 - gin lives there
  return configurables.resolve("sparsity_allocation", files, bindings, entry=cli.SWEEP)


def print_budget(sweep: SweepConfig, run=None, out_dir: str | None = None) -> None:
  """The budget table of the plan (and the training tokens of the compute budget, when it is given)."""
  allocs = plan_sweep(sweep, getattr(run, "seq_len", None))
  print(f"budget table (seq_len {getattr(run, 'seq_len', None) or sweep.seq_len} for FLOPs; rho=1 is the reference)")
  print(budget.format_table(allocs))
  largest = max(allocs, key=lambda a: a.budget.engram_table)
  if largest.config.engram_layers:  # the largest tables of the plan: what each table optimizer adds to memory
    print(f"rho {largest.rho_target:.2f}: " + budget.format_table_memory(largest.config))
  if sweep.train_flops:
    fpt = allocs[0].budget.flops_per_token
    print(f"compute budget C = {sweep.train_flops:.3g} FLOPs -> {sweep.train_flops / fpt:.4g} training tokens "
          f"per point ({fpt:.4g} FLOPs/token, {sweep.train_flops / fpt / allocs[0].budget.active:.1f} tokens "
          "per activated parameter)")


def main(argv: Sequence[str] | None = None) -> dict | None:
  from engram_jax import cli  # noqa: PLC0415
  argv = sys.argv[1:] if argv is None else list(argv)
  command = " ".join([sys.executable, "-m", "engram_jax.experiments.sparsity_allocation", *argv])

  def sweep_or_budget(sweep, run, out_dir):
    if run is None:  # a budget-only file (no RunConfig): print the table
      return print_budget(sweep, run)
    if out_dir is None:
      raise ValueError("sparsity_allocation.out_dir is unset; bind it in the gin file or pass --gin.OUT_DIR=DIR")
    return run_sweep(sweep, run, out_dir, command=command)

  return cli.run(cli.SWEEP, argv, sweep_or_budget)


if __name__ == "__main__":  # run the importable module's main, so gin and the caches see a single copy
  from engram_jax.experiments import sparsity_allocation as _entry
  _entry.main()
