"""Three experiments on one fixed model, each one resumable command (arXiv 2601.07372):

  'ablation'         the full Engram+MoE model against one change at a time (no gate, no short conv, no tokenizer
                     compression, one branch, one head per order, 4-grams, injection early / late / every layer, a
                     capacity-1 table) and the backbone without memory, at one token budget;
  'infinite_memory'  the backbone with table slots swept over `slots` for each memory variant (Engram,
                     OverEncoding arXiv 2501.16975, every-layer bigram; engram_jax.models.memory_variants): loss vs
                     slots with a log-linear fit per variant and its slope's standard error;
  'table_optimizer'  the full model trained with each table optimizer (OptimizerConfig.table_optimizer: the
                     row-sparse 'adam_lazy', 'adagrad_rowwise', 'sgd' against the reference 'adam_dense'): does the
                     cheaper update cost quality?

    python -m engram_jax.experiments.memory_experiments --gin_file=configs/experiments/ablation_cpu.gin
    python -m engram_jax.experiments.memory_experiments --gin_file=configs/experiments/infinite_memory_cpu.gin
    python -m engram_jax.experiments.memory_experiments --gin_file=configs/experiments/table_optimizer_quality.gin

Every (point, seed) trains with engram_jax.train (RunConfig.seed varies: init and data order; all points of a seed
see the same batches) into `<out_dir>/<point>_seed<s>/`; a finished one leaves `point_result.json` and is skipped
next time, an interrupted one resumes from its own checkpoint. Written after every invocation: `results.json`
(per point mean / std over seeds, pooled seed std, gaps to the reference point paired by seed, fits, command,
versions, wall time), a PNG and README.md (tables and a mechanical reading; add the interpretation by hand).
With `budgets` (steps, WSD schedule) every run also yields results at those smaller token budgets
(engram_jax.experiments.token_budgets); they are reported per budget beside the full length (`by_budget`,
gaps_by_budget.png).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence

from engram_jax import budget
from engram_jax.experiments.sparsity_allocation import _default_train_fn, _jsonable, _write_json, config_differs
from engram_jax.experiments.sparsity_allocation import routing_stats
from engram_jax.experiments.sparsity_allocation import software_versions
from engram_jax.experiments import token_budgets
from engram_jax.experiments.sweep_report import _figure, _save, final_loss, paired_gap, pooled_within_std
from engram_jax.models.config import ModelConfig
from engram_jax.models.memory_variants import VARIANTS, memory_model
from engram_jax.optim import TABLE_OPTIMIZERS

KINDS = ("ablation", "infinite_memory", "table_optimizer")


def _engram(**changes):
  return lambda m, r: (dataclasses.replace(m, engram=dataclasses.replace(m.engram, **changes)), r)


def _spread(sizes: tuple[int, ...], orders: int) -> tuple[int, ...]:
  """Per-order base sizes for `orders` orders holding the rows of `sizes` (equal split)."""
  return (max(2, sum(sizes) // orders),) * orders


# name -> (model config, run config) -> (model config, run config): one change against the full model
ABLATIONS: dict[str, Callable] = {
    "full": lambda m, r: (m, r),
    "moe_only": lambda m, r: (dataclasses.replace(m, engram_layers=(), engram=None), r),
    "no_gate": _engram(gate=False),
    "no_conv": _engram(short_conv=False),
    "no_compression": lambda m, r: (m, dataclasses.replace(r, engram_compression="none")),
    "single_branch": lambda m, r: (dataclasses.replace(m, hc_expansion=1, engram=dataclasses.replace(
        m.engram, num_branches=1)), r),
    # equal table slots: one head gets the K heads' rows; four orders share three orders' rows
    "one_head_per_order": lambda m, r: (dataclasses.replace(m, engram=dataclasses.replace(
        m.engram, heads_per_order=1, table_base_sizes=tuple(b * m.engram.heads_per_order
                                                            for b in m.engram.table_base_sizes))), r),
    "ngram4": lambda m, r: (dataclasses.replace(m, engram=dataclasses.replace(
        m.engram, max_ngram=4, table_base_sizes=_spread(m.engram.table_base_sizes, 3))), r),
    "layers_early": lambda m, r: (dataclasses.replace(m, engram_layers=(0,)), r),
    "layers_late": lambda m, r: (dataclasses.replace(m, engram_layers=(m.num_layers - 1,)), r),
    "layers_every": lambda m, r: (dataclasses.replace(m, engram_layers=tuple(range(m.num_layers))), r),
    "capacity_one": _engram(single_row_table=True),
}


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """What one experiment trains. `base`: for 'ablation' and 'table_optimizer' the full Engram+MoE model; for
  'infinite_memory' the backbone whose `engram` field gives head_dim, orders, heads and branches (its table sizes
  are set per point)."""

  kind: str = "ablation"  # 'ablation' or 'infinite_memory'.
  base: ModelConfig | None = None
  seeds: tuple[int, ...] = (0, 1)
  ablations: tuple[str, ...] = tuple(ABLATIONS)  # 'ablation': the points ('full' is the reference).
  slots: tuple[int, ...] = ()  # 'infinite_memory': total table rows per point (all layers, orders and heads).
  variants: tuple[str, ...] = VARIANTS  # 'infinite_memory': the memory variants given each slot count.
  engram_layers: tuple[int, ...] = (1,)  # 'infinite_memory': where the 'engram' variant sits.
  table_optimizers: tuple[str, ...] = ("adam_dense", "adam_lazy", "adagrad_rowwise")  # 'table_optimizer' points.
  report_only: bool = False  # Train nothing: summarise the finished runs (a partial report while runs are left).
  # Smaller token budgets, in steps, reported beside the full length: WSD cooldown branches from each run
  # (engram_jax.experiments.token_budgets), each costing its cooldown's steps only.
  budgets: tuple[int, ...] = ()

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"ExperimentConfig.kind={self.kind!r}: use one of {KINDS}")
    if self.base is None or self.base.engram is None:
      raise ValueError("ExperimentConfig.base must be a ModelConfig with an EngramConfig (ModelConfig.engram)")
    if not self.seeds or len(set(self.seeds)) != len(self.seeds):
      raise ValueError(f"ExperimentConfig.seeds={self.seeds}: give distinct seeds")
    bad = [a for a in self.ablations if a not in ABLATIONS]
    if self.kind == "ablation" and (bad or "full" not in self.ablations):
      raise ValueError(f"ExperimentConfig.ablations={self.ablations}: unknown {bad}; choose from {tuple(ABLATIONS)} "
                       "and include 'full' (the reference)")
    bad = [o for o in self.table_optimizers if o not in TABLE_OPTIMIZERS]
    if self.kind == "table_optimizer" and (bad or "adam_dense" not in self.table_optimizers):
      raise ValueError(f"ExperimentConfig.table_optimizers={self.table_optimizers}: unknown {bad}; choose from "
                       f"{TABLE_OPTIMIZERS} and include 'adam_dense' (the reference)")
    if any(not isinstance(b, int) or b < 1 for b in self.budgets):
      raise ValueError(f"ExperimentConfig.budgets={self.budgets}: give step counts (positive ints)")
    if self.kind == "infinite_memory":
      if len(self.slots) < 2 or any(s < 1 for s in self.slots):
        raise ValueError(f"ExperimentConfig.slots={self.slots}: give at least two positive slot counts")
      bad = [v for v in self.variants if v not in VARIANTS]
      if bad or not self.variants:
        raise ValueError(f"ExperimentConfig.variants={self.variants}: choose from {VARIANTS}")


def plan(exp: ExperimentConfig, run) -> list[tuple[str, ModelConfig, object]]:
  """(point name, model config, run config) of every point; the reference point first."""
  if exp.kind == "ablation":
    return [(name, *ABLATIONS[name](exp.base, run)) for name in ("full",) + tuple(
        a for a in exp.ablations if a != "full")]
  if exp.kind == "table_optimizer":
    return [(name, exp.base, dataclasses.replace(run, optimizer=dataclasses.replace(run.optimizer,
                                                                                     table_optimizer=name)))
            for name in ("adam_dense",) + tuple(o for o in exp.table_optimizers if o != "adam_dense")]
  backbone = dataclasses.replace(exp.base, engram_layers=())
  points = [("moe_only", dataclasses.replace(backbone, engram=None), run)]
  for variant in exp.variants:
    for slots in sorted(exp.slots):
      points.append((f"{variant}_slots{slots}", memory_model(backbone, variant, slots, exp.engram_layers), run))
  return points


def reference_name(exp: ExperimentConfig) -> str:
  return {"ablation": "full", "table_optimizer": "adam_dense"}.get(exp.kind, "moe_only")


# ------------------------------------------------------------------------------------------------ analysis


def summarise(runs: Sequence[dict], reference: str) -> dict:
  """Per point: mean and sample std over seeds; pooled seed std; each point's gap to `reference` (paired by seed,
  and in pooled-seed-std units: gap / pooled std, z = gap / (pooled std * sqrt(2/k))); the pooled std of the paired
  gaps and each gap's z against it.

  The gap is the mean of the paired gaps over the k seeds the point shares with `reference`, so a point that has
  fewer seeds than the reference (a sweep still running) is not compared with other seeds' runs. With equal seed
  sets it is the difference of the means. Without a shared seed it falls back to the difference of the means, with
  z = gap / (pooled std * sqrt(1/n + 1/n_ref))."""
  seeded = {}  # point -> [(seed, final loss)], in run order
  for r in runs:
    seeded.setdefault(r["point"], []).append((r["seed"], final_loss(r["train"])))
  points = {}
  for name, pairs in seeded.items():
    losses = [x for _, x in pairs]
    mean = sum(losses) / len(losses)
    std = math.sqrt(sum((x - mean) ** 2 for x in losses) / (len(losses) - 1)) if len(losses) > 1 else 0.0
    first = next(r for r in runs if r["point"] == name)
    points[name] = {"mean_val_loss": mean, "std_val_loss": std, "n": len(losses), "val_losses": losses,
                    "slots": first.get("slots"), "variant": first.get("variant"), "params": first.get("params")}
  pooled, dof = pooled_within_std([p["val_losses"] for p in points.values()])
  ref = points.get(reference)
  for name, p in points.items():
    if ref is None or name == reference:
      continue
    g = paired_gap(seeded[name], seeded[reference])
    p["gap"], p["paired_gaps"], p["gap_seeds"] = g["gap"], g["paired"], g["seeds"]
    p["gap_in_seed_std"] = g["gap"] / pooled if pooled else None
    p["gap_z"] = g["gap"] / (pooled * g["se_scale"]) if pooled else None
  # The spread of the paired gaps, pooled over points with >= 2 shared seeds: a gap's noise once the shift that a seed
  # gives every point alike (its init and data order) is removed. gap_z_paired = gap / (paired std / sqrt(k)).
  paired_std, paired_dof = pooled_within_std([p.get("paired_gaps", []) for p in points.values()])
  for p in points.values():
    if p.get("gap_seeds"):
      p["gap_z_paired"] = p["gap"] / (paired_std / math.sqrt(p["gap_seeds"])) if paired_std else None
  return {"reference": reference, "pooled_seed_std": pooled, "pooled_dof": dof, "paired_gap_std": paired_std,
          "paired_gap_dof": paired_dof, "points": points}


def summarise_with_params(runs: Sequence[dict], reference: str) -> dict:
  """summarise, with each point's parameter count as one number (its total) for the tables."""
  summary = summarise(runs, reference)
  for p in summary["points"].values():
    p["params"] = p["params"]["total"] if p["params"] else None
  return summary


def by_budget(runs: Sequence[dict], budgets: Sequence[int], steps: int, tokens_per_step: int, reference: str,
              kind: str) -> dict:
  """{steps: {tokens, summary, fits}} at every budget and the full length; a budget's summary covers the runs
  that have that branch (records trained before the budget was asked for have none)."""
  out = {}
  for t in sorted(budgets) + [steps]:
    at = runs if t == steps else token_budgets.runs_at(runs, t)
    if at:
      out[str(t)] = {"tokens": t * tokens_per_step, "n_runs": len(at), "summary": summarise_with_params(at, reference),
                     "fits": fits(at) if kind == "infinite_memory" else {}}
      out[str(t)]["contrasts"] = variant_contrasts(at, out[str(t)]["fits"]) if kind == "infinite_memory" else {}
  return out


def loglinear_fit(xs: Sequence[float], ys: Sequence[float]) -> dict | None:
  """OLS of y = a + b ln(x) over all (x, y) pairs: intercept, slope (per e-fold of x; per doubling = b ln 2),
  the slope's standard error (needs >= 3 pairs) and R^2."""
  n = len(xs)
  if n < 2 or len(set(xs)) < 2:
    return None
  lx = [math.log(x) for x in xs]
  mx, my = sum(lx) / n, sum(ys) / n
  sxx = sum((u - mx) ** 2 for u in lx)
  b = sum((u - mx) * (y - my) for u, y in zip(lx, ys)) / sxx
  a = my - b * mx
  resid = [y - (a + b * u) for u, y in zip(lx, ys)]
  sse, sst = sum(r * r for r in resid), sum((y - my) ** 2 for y in ys)
  se = math.sqrt(sse / (n - 2) / sxx) if n > 2 else None
  return {"intercept": a, "slope": b, "slope_se": se, "slope_per_doubling": b * math.log(2),
          "r2": 1 - sse / sst if sst else None, "n": n}


def fits(runs: Sequence[dict]) -> dict[str, dict | None]:
  """Per memory variant: loglinear_fit of final loss against slots over every (slots, seed) run."""
  out = {}
  for variant in dict.fromkeys(r["variant"] for r in runs if r.get("variant")):
    pts = [(r["slots"], final_loss(r["train"])) for r in runs if r.get("variant") == variant]
    out[variant] = loglinear_fit([p[0] for p in pts], [p[1] for p in pts])
  return out


def variant_contrasts(runs: Sequence[dict], fit: dict[str, dict | None], base: str = "engram") -> dict[str, dict]:
  """Every other memory variant against `base` at equal slots: per slot count the loss difference (variant - base)
  paired by seed, their mean over slot counts, and the difference of the fitted slopes per doubling of slots with
  its standard error (the two fits' se combined, as independent). Slot counts are the planned ones (the point's
  name): each variant rounds its heads up to primes of its own, so the built tables differ by a few rows."""
  loss = {(r["variant"], int(r["point"].rsplit("_slots", 1)[1]), r["seed"]): final_loss(r["train"])
          for r in runs if r.get("variant")}
  out = {}
  for variant in dict.fromkeys(v for v, _, _ in loss):
    if variant == base:
      continue
    per_slots = {}
    for (v, slots, seed), x in sorted(loss.items(), key=lambda kv: (kv[0][1], kv[0][2])):
      if v == variant and (base, slots, seed) in loss:
        per_slots.setdefault(slots, []).append(x - loss[(base, slots, seed)])
    if not per_slots:
      continue
    gaps = {str(k): {"gap": sum(d) / len(d), "paired": d} for k, d in per_slots.items()}
    f, fb = fit.get(variant), fit.get(base)
    diff = se = None
    if f and fb:
      diff = f["slope_per_doubling"] - fb["slope_per_doubling"]
      if f["slope_se"] is not None and fb["slope_se"] is not None:
        se = math.log(2) * math.hypot(f["slope_se"], fb["slope_se"])
    out[variant] = {"base": base, "per_slots": gaps, "mean_gap": sum(g["gap"] for g in gaps.values()) / len(gaps),
                    "n_slot_counts": len(gaps), "slope_per_doubling_diff": diff, "slope_per_doubling_diff_se": se}
  return out


def plot(summary: dict, fit: dict, kind: str, path: str) -> None:
  """'ablation' / 'table_optimizer': mean loss per point with seed error bars; 'infinite_memory': loss vs slots
  (log x) per variant, with the fit and the memory-free backbone as a band."""
  fig, axes = _figure(1)
  ax = axes[0, 0]
  pts = summary["points"]
  if kind != "infinite_memory":
    names = list(pts)
    ax.barh(range(len(names)), [pts[n]["mean_val_loss"] for n in names],
            xerr=[pts[n]["std_val_loss"] for n in names], capsize=3, color="tab:blue", alpha=0.7)
    ax.set_yticks(range(len(names)), names)
    lo = min(min(p["val_losses"]) for p in pts.values())
    hi = max(max(p["val_losses"]) for p in pts.values())
    ax.set_xlim(lo - 0.1 * (hi - lo + 1e-3), hi + 0.1 * (hi - lo + 1e-3))
    ax.axvline(pts[summary["reference"]]["mean_val_loss"], color="black", lw=0.8)
    ax.set_xlabel("final validation loss (mean ± std over seeds)")
    ax.set_title("Engram ablations (line: full model)" if kind == "ablation"
                 else "Table optimizers (line: adam_dense)")
  else:
    for i, (variant, f) in enumerate(fit.items()):
      vp = sorted((p for p in pts.values() if p["variant"] == variant), key=lambda p: p["slots"])
      xs = [p["slots"] for p in vp]
      ax.errorbar(xs, [p["mean_val_loss"] for p in vp], yerr=[p["std_val_loss"] for p in vp], marker="o",
                  capsize=3, color=f"C{i}", label=variant + (f" (slope/doubling {f['slope_per_doubling']:+.4f})"
                                                             if f else ""))
      if f:
        ax.plot(xs, [f["intercept"] + f["slope"] * math.log(x) for x in xs], color=f"C{i}", ls="--", lw=0.8)
    moe = pts.get("moe_only")
    if moe:  # a line at the mean (a band of zero width would not show with one seed) and the seed band
      ax.axhline(moe["mean_val_loss"], color="gray", ls=":", label="no memory (mean ± std)")
      ax.axhspan(moe["mean_val_loss"] - moe["std_val_loss"], moe["mean_val_loss"] + moe["std_val_loss"],
                 color="gray", alpha=0.2)
    ax.set_xscale("log")
    from matplotlib.ticker import NullFormatter  # noqa: PLC0415 - matplotlib loads only when plotting
    ax.xaxis.set_minor_formatter(NullFormatter())  # minor-tick labels overlap on a log axis
    ax.set_xlabel("table slots (rows, all layers and heads)")
    ax.set_ylabel("final validation loss")
    ax.set_title("Infinite memory: loss vs slots at fixed backbone")
    ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  _save(fig, path)


def plot_budgets(budgets: dict, path: str) -> None:
  """Each point's gap to the reference against tokens trained (one line per point, log x)."""
  fig, axes = _figure(1)
  ax = axes[0, 0]
  names = dict.fromkeys(n for b in budgets.values() for n, p in b["summary"]["points"].items() if "gap" in p)
  for i, name in enumerate(names):
    pts = [(b["tokens"], b["summary"]["points"][name]["gap"]) for b in budgets.values()
           if "gap" in b["summary"]["points"].get(name, {})]
    ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", color=f"C{i % 10}", label=name)
  reference = next(iter(budgets.values()))["summary"]["reference"]
  ax.axhline(0.0, color="black", lw=0.8)
  ax.set_xscale("log")
  ax.set_xlabel("tokens trained (WSD cooldown branches; the last is the full run)")
  ax.set_ylabel(f"validation loss - {reference} (mean over seeds)")
  ax.set_title("Gaps at each token budget")
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3)
  _save(fig, path)


def _budget_lines(budgets: dict) -> list[str]:
  """README section: every point's mean loss and gap at each budget, and the fits' slopes for infinite memory."""
  cols = list(budgets)
  ref = next(iter(budgets.values()))["summary"]["reference"]
  lines = ["", "Token budgets (WSD cooldown branches from each run; mean val loss, gap to "
           f"{ref} in brackets):", "",
           "| point | " + " | ".join(f"{budgets[c]['tokens'] / 1e6:.2f}M tokens ({c} steps)" for c in cols) + " |",
           "|---|" + "---|" * len(cols)]
  names = dict.fromkeys(n for b in budgets.values() for n in b["summary"]["points"])
  for name in names:
    cells = []
    for c in cols:
      p = budgets[c]["summary"]["points"].get(name)
      cells.append("" if p is None else f"{p['mean_val_loss']:.4f}" + (f" ({p['gap']:+.4f})" if "gap" in p else ""))
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  variants = dict.fromkeys(v for b in budgets.values() for v in b["fits"])
  for v in variants:
    cells = [f"{f['slope_per_doubling']:+.4f}" if (f := budgets[c]["fits"].get(v)) else "" for c in cols]
    lines.append(f"| {v}: slope per doubling of slots | " + " | ".join(cells) + " |")
  return lines


def _contrast_lines(contrasts: dict, pooled: float | None) -> list[str]:
  """README section: each variant minus the base variant at equal slots, and the difference of their slopes."""
  slots = sorted({int(k) for c in contrasts.values() for k in c["per_slots"]})
  base = next(iter(contrasts.values()))["base"]
  lines = ["", f"At equal slots (variant - {base}, paired by seed; negative: the variant is better):", "",
           "| variant | " + " | ".join(f"{k:,}" for k in slots) + " | mean | slope/doubling diff (se) |",
           "|---|" + "---|" * (len(slots) + 2)]
  for v, c in contrasts.items():
    cells = [f"{g['gap']:+.4f}" if (g := c["per_slots"].get(str(k))) else "" for k in slots]
    mean = f"{c['mean_gap']:+.4f}" + (f" ({c['mean_gap'] / pooled:+.1f} seed std)" if pooled else "")
    d, se = c["slope_per_doubling_diff"], c["slope_per_doubling_diff_se"]
    slope = "" if d is None else f"{d:+.4f}" + ("" if se is None else f" ({se:.4f})")
    lines.append(f"| {v} | " + " | ".join(cells) + f" | {mean} | {slope} |")
  return lines


HAND_READING = "## Reading (by hand"  # README.md from this line on is a person's; a rerun keeps it


def keep_hand_reading(path: str, text: str) -> str:
  """`text` (the regenerated README) followed by the hand-written reading of the README already at `path`."""
  try:
    with open(path) as f:
      old = f.read()
  except OSError:
    return text
  i = old.find(HAND_READING)
  return text if i < 0 else text.rstrip("\n") + "\n\n" + old[i:]


def readme(results: dict) -> str:
  """README.md: command, versions, wall time, the table, the fits and a mechanical reading."""
  s = results["summary"]
  pooled = s["pooled_seed_std"]
  lines = [f"# {results['experiment']['kind']}: results", "",
           "Written by engram_jax.experiments.memory_experiments (rerun the command to resume / refresh).", "",
           "Command:", "", "    " + results["command"], "",
           f"Versions: {', '.join(f'{k} {v}' for k, v in results['versions'].items())}", "",
           f"Training wall time over all points: {results['train_wall_s'] / 60:.1f} min "
           f"({len(results['runs'])} runs, tokens per run {results['tokens_per_run']}).", "",
           f"Pooled seed std: {pooled:.4f} ({s['pooled_dof']} dof)" if pooled else "Pooled seed std: n/a (one seed)",
           "", f"Spread of the gaps paired by seed: {s['paired_gap_std']:.4f} ({s['paired_gap_dof']} dof; the last "
           "column's z is a gap over it / sqrt(seeds))" if s.get("paired_gap_std") else
           "Spread of the gaps paired by seed: n/a (no point with two seeds shared with the reference)",
           "", f"| point | params | mean val loss | std | n | gap to {s['reference']} | paired by seed | "
           "gap / seed std | z (paired) |", "|---|---|---|---|---|---|---|---|---|"]
  ref_n = s["points"].get(s["reference"], {}).get("n", 0)
  if any(0 < p.get("gap_seeds", 0) < max(p["n"], ref_n) for p in s["points"].values()):
    lines[-2:-2] = [f"Gaps are over the seeds a point shares with {s['reference']} (the mean of its paired gaps); "
                    "the mean val loss column is over all its seeds.", ""]
  for name, p in s["points"].items():
    gap = p.get("gap")
    units = p.get("gap_in_seed_std")
    paired = ", ".join(f"{g:+.4f}" for g in p.get("paired_gaps", []))
    zp = p.get("gap_z_paired")
    lines.append(f"| {name} | {p['params'] or ''} | {p['mean_val_loss']:.4f} | {p['std_val_loss']:.4f} | {p['n']} | "
                 f"{'' if gap is None else f'{gap:+.4f}'} | {paired} | {'' if units is None else f'{units:+.2f}'} | "
                 f"{'' if zp is None else f'{zp:+.1f}'} |")
  if results.get("fits"):
    lines += ["", "Log-linear fits (loss = a + b ln slots, all seeds):", "",
              "| variant | slope per doubling | slope se (per e-fold) | R^2 | n |", "|---|---|---|---|---|"]
    for v, f in results["fits"].items():
      if f:
        se = "" if f["slope_se"] is None else f"{f['slope_se']:.4f}"
        r2 = "" if f["r2"] is None else f"{f['r2']:.3f}"
        lines.append(f"| {v} | {f['slope_per_doubling']:+.4f} | {se} | {r2} | {f['n']} |")
  if results.get("contrasts"):
    lines += _contrast_lines(results["contrasts"], pooled)
  if len(results.get("by_budget") or {}) > 1:
    lines += _budget_lines(results["by_budget"])
  if results.get("not_finished"):
    lines += ["", f"Not finished (left out of this report): {', '.join(results['not_finished'])}."]
  lines += ["", "Mechanical reading (|gap| < 2 seed std is called inconclusive):", ""]
  for name, p in s["points"].items():
    if p.get("gap_in_seed_std") is not None:
      u = p["gap_in_seed_std"]
      verdict = "inconclusive against" if abs(u) < 2 else ("worse than" if u > 0 else "better than")
      lines.append(f"- {name}: {verdict} {s['reference']} ({p['gap']:+.4f} nats, {u:+.1f} seed std)")
  return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ runner


def _finished_elsewhere(run_dir: str, model, cfg) -> dict | None:
  """The result of a run that a plain train command finished in `run_dir` with this point's model and run config
  (result.json complete at cfg.steps; run_record.json's configs equal the plan), else None. Its checkpoints are not
  opened, so a run whose optimizer-state layout a later version changed still reports."""
  try:
    with open(os.path.join(run_dir, "result.json")) as f:
      result = json.load(f)
    with open(os.path.join(run_dir, "run_record.json")) as f:
      record = json.load(f)
  except (OSError, ValueError):
    return None
  if result.get("status") != "complete" or result.get("steps") != cfg.steps:
    return None
  if (config_differs(record.get("model_config"), _jsonable(model))
      or config_differs(record.get("run_config"), _jsonable(cfg))):
    return None
  return result


def run_experiment(exp: ExperimentConfig, run, out_dir: str, *, train_fn: Callable | None = None,
                   command: str | None = None, log: Callable[[str], None] = print) -> dict:
  """Trains every (point, seed) not finished under `out_dir`, then writes results.json, the PNG and README.md."""
  train_fn = train_fn or _default_train_fn()
  budgets = token_budgets.check_budgets(exp.budgets, run)  # before anything is written or compiled
  os.makedirs(out_dir, exist_ok=True)
  points = plan(exp, run)
  seq_len = run.seq_len
  log(f"{exp.kind}: {len(points)} points x {len(exp.seeds)} seeds")
  runs, missing = [], []
  for name, model, run_cfg in points:
    b = budget.compute_budget(model, seq_len)
    for seed in exp.seeds:
      rname = f"{name}_seed{seed}"
      run_dir = os.path.join(out_dir, rname)
      path = os.path.join(run_dir, "point_result.json")
      if os.path.exists(path):
        with open(path) as f:
          done = json.load(f)
        if config_differs(done["model_config"], _jsonable(model)):
          raise ValueError(f"{path} was trained with another model config than point {name!r} plans now; use a "
                           "new out_dir or delete that run")
        log(f"[{rname}] finished earlier: val loss {final_loss(done['train']):.4f} (skipped)")
        runs.append(done)
        continue
      if exp.report_only and _finished_elsewhere(run_dir, model, dataclasses.replace(run_cfg, seed=seed)) is None:
        missing.append(rname)
        log(f"[{rname}] not finished: left out of the report (report_only)")
        continue
      os.makedirs(run_dir, exist_ok=True)
      cfg = dataclasses.replace(run_cfg, seed=seed)
      log(f"[{rname}] training: P_tot={b.total} P_act={b.active} table={b.engram_table}")
      t0 = time.time()
      result = _finished_elsewhere(run_dir, model, cfg)
      branches = {}
      if result is not None:  # trained to the end by a train command into this directory: adopted, not reopened
        log(f"[{rname}] finished by an earlier train command: adopted")
      elif budgets:
        result, branches = token_budgets.train_with_budgets(train_fn, model, cfg, run_dir, budgets, log)
      else:
        result = train_fn(model, cfg, run_dir)
      slots = budget.engram_table_rows(model) if model.engram_layers else 0
      record = {"point": name, "seed": seed, "wall_s": time.time() - t0, "slots": slots,
                "variant": name.rsplit("_slots", 1)[0] if exp.kind == "infinite_memory" and slots else None,
                "params": {"total": b.total, "active": b.active, "engram_table": b.engram_table},
                "model_config": _jsonable(model), "run_config": _jsonable(cfg), "routing": routing_stats(run_dir),
                "train": _jsonable(result), "budgets": {str(t): _jsonable(r) for t, r in branches.items()}}
      _write_json(path, record)
      runs.append(json.loads(json.dumps(_jsonable(record))))
      log(f"[{rname}] val loss {final_loss(result):.4f} in {record['wall_s']:.0f} s")
  if not runs:
    raise ValueError(f"{out_dir}: no finished run to report; run without ExperimentConfig.report_only first")
  summary = summarise_with_params(runs, reference_name(exp))
  fit = fits(runs) if exp.kind == "infinite_memory" else {}
  contrasts = variant_contrasts(runs, fit) if exp.kind == "infinite_memory" else {}
  tokens_per_step = run.batch_size * run.seq_len
  budget_results = by_budget(runs, budgets, run.steps, tokens_per_step, reference_name(exp), exp.kind)
  results = {"experiment": exp, "command": command or " ".join([sys.executable] + sys.argv),
             "versions": software_versions(), "run": run, "summary": summary, "fits": fit,
             "contrasts": contrasts, "runs": runs,
             "train_wall_s": sum(r["wall_s"] for r in runs), "not_finished": missing,
             "tokens_per_run": (run.stop_after or run.steps) * tokens_per_step, "by_budget": budget_results}
  results = json.loads(json.dumps(_jsonable(results)))
  _write_json(os.path.join(out_dir, "results.json"), results)
  png = {"ablation": "ablation.png", "table_optimizer": "table_optimizers.png"}.get(exp.kind, "loss_vs_slots.png")
  plot(summary, fit, exp.kind, os.path.join(out_dir, png))
  if len(budget_results) > 1:
    plot_budgets(budget_results, os.path.join(out_dir, "gaps_by_budget.png"))
  from engram_jax import fileio  # noqa: PLC0415
  path = os.path.join(out_dir, "README.md")
  fileio.atomic_write(path, keep_hand_reading(path, readme(results)))
  log(readme(results))
  return results


def main(argv: Sequence[str] | None = None) -> dict:
  from engram_jax import cli  # noqa: PLC0415
  argv = sys.argv[1:] if argv is None else list(argv)
  command = " ".join([sys.executable, "-m", "engram_jax.experiments.memory_experiments", *argv])
  return cli.run(cli.EXPERIMENT, argv, lambda exp, run, out_dir: run_experiment(exp, run, out_dir, command=command))


if __name__ == "__main__":  # run the importable module's main, so gin and the caches see a single copy
  from engram_jax.experiments import memory_experiments as _entry
  _entry.main()
