"""Reading a sparsity-allocation sweep (arXiv 2601.07372, section 3): per-rho means over seeds, the gap of every
hybrid to pure MoE in seed-noise units, and the two PNGs (loss vs rho, validation curves). Pure functions of the
run records that engram_jax.experiments.sparsity_allocation writes."""

from __future__ import annotations

import math
from collections.abc import Sequence


def final_loss(result: dict) -> float:
  """The final validation loss in a train result (train.train_and_evaluate's dict)."""
  for key in ("final_val_loss", "val_loss", "final_eval_loss", "eval_loss"):
    if key in result:
      return float(result[key])
  raise KeyError(f"train result has no final validation loss; keys: {sorted(result)}")


def pooled_within_std(groups: Sequence[Sequence[float]]) -> tuple[float | None, int]:
  """Sample std within groups, pooled over the groups with >= 2 values: sqrt(sum of squared deviations from each
  group's mean / dof), and dof = sum(len - 1). (None, 0) without such a group."""
  groups = [g for g in groups if len(g) > 1]
  dof = sum(len(g) - 1 for g in groups)
  ss = sum(sum((x - sum(g) / len(g)) ** 2 for x in g) for g in groups)
  return (math.sqrt(ss / dof) if dof else None), dof


def paired_gap(a: Sequence[tuple[int | None, float]], b: Sequence[tuple[int | None, float]]) -> dict:
  """Loss of a minus loss of b, from (seed, loss) pairs, over the k seeds both have: `gap` is the mean of the
  per-seed differences (`paired`), and `se_scale` = sqrt(2/k) turns a one-run seed std into the gap's standard
  error. Pairing keeps a seed's shift (its init and data order, shared by every point of that seed) out of the
  gap when a and b have different seed sets. Without a shared seed: the difference of the means, se_scale
  sqrt(1/n_a + 1/n_b)."""
  b_by_seed = {seed: x for seed, x in b if seed is not None}
  paired = [x - b_by_seed[seed] for seed, x in a if seed in b_by_seed]
  if paired:
    return {"gap": sum(paired) / len(paired), "paired": paired, "seeds": len(paired),
            "se_scale": math.sqrt(2 / len(paired))}
  mean = lambda xs: sum(x for _, x in xs) / len(xs)  # noqa: E731
  return {"gap": mean(a) - mean(b), "paired": [], "seeds": 0, "se_scale": math.sqrt(1 / len(a) + 1 / len(b))}


def summarise(runs: Sequence[dict]) -> list[dict]:
  """Per rho: mean and sample std of the final validation loss over seeds."""
  out = []
  for rho in sorted({r["rho"] for r in runs}, reverse=True):
    losses = [final_loss(r["train"]) for r in runs if r["rho"] == rho]
    mean = sum(losses) / len(losses)
    std = math.sqrt(sum((l - mean) ** 2 for l in losses) / (len(losses) - 1)) if len(losses) > 1 else 0.0
    out.append({"rho": rho, "mean_val_loss": mean, "std_val_loss": std, "n": len(losses), "val_losses": losses})
  return out


def analyse(summary: Sequence[dict], runs: Sequence[dict]) -> dict:
  """The numbers a sweep is read by: where the minimum is, how far every hybrid is from pure MoE (rho = 1), and how
  far each end of the grid is above the minimum (the two arms of the U), in units of the seed noise.

  `pooled_seed_std` pools the within-rho sample variances (each rho weighted by its n - 1 degrees of freedom).
  Every gap is paired by seed (all rhos of a seed see the same batches; see `paired_gap`): `gap` is the mean of
  the per-seed differences over the shared seeds, `gap_in_seed_std` = gap / pooled_seed_std and `gap_z` = gap /
  its standard error (pooled_seed_std * se_scale). `gaps` holds each hybrid minus rho = 1 (negative: the hybrid is
  better). `interior_minimum` is true when the lowest mean is at neither end of the rho grid; `arms` then holds
  each end minus the argmin (positive: the end is worse), and `interior_minimum_resolved` is true when both arms
  are at least 3 pooled seed std.
  """
  pooled, dof = pooled_within_std([s["val_losses"] for s in summary])
  lowest = min(summary, key=lambda s: s["mean_val_loss"])
  rhos = [s["rho"] for s in summary]
  interior = min(rhos) < lowest["rho"] < max(rhos)
  out = {"pooled_seed_std": pooled, "pooled_dof": dof, "argmin_rho": lowest["rho"], "interior_minimum": interior,
         "gaps": [], "best_hybrid": None, "arms": [], "interior_minimum_resolved": False}
  seeded = {rho: [(r.get("seed"), final_loss(r["train"])) for r in runs if r["rho"] == rho] for rho in rhos}

  def gap(rho: float, ref: float) -> dict:
    g = paired_gap(seeded[rho], seeded[ref])
    return {"rho": rho, "gap": g["gap"], "gap_in_seed_std": g["gap"] / pooled if pooled else None,
            "gap_z": g["gap"] / (pooled * g["se_scale"]) if pooled else None, "paired_gaps": g["paired"],
            "gap_seeds": g["seeds"]}

  if interior:
    out["arms"] = [{**gap(end, lowest["rho"]), "side": side}
                   for side, end in (("memory", min(rhos)), ("moe", max(rhos)))]
    out["interior_minimum_resolved"] = bool(pooled) and all(a["gap_in_seed_std"] >= 3 for a in out["arms"])
  if 1.0 not in seeded:
    return out
  out["gaps"] = [gap(rho, 1.0) for rho in rhos if rho != 1.0]
  if out["gaps"]:
    out["best_hybrid"] = min(out["gaps"], key=lambda g: g["gap"])
  return out


def format_analysis(analysis: dict) -> str:
  """A few lines reading `analyse`'s output, for logs and READMEs."""
  pooled = analysis["pooled_seed_std"]
  lines = [f"lowest mean loss at rho = {analysis['argmin_rho']:.3f} "
           f"({'interior minimum' if analysis['interior_minimum'] else 'no interior minimum'}); pooled seed std "
           + (f"{pooled:.4f} ({analysis['pooled_dof']} dof)" if pooled else "n/a (one seed per rho)")]
  best = analysis["best_hybrid"]
  if best:
    units = f", {best['gap_in_seed_std']:+.2f} seed std, z {best['gap_z']:+.2f}" if pooled else ""
    lines.append(f"best hybrid rho = {best['rho']:.3f}: {best['gap']:+.4f} nats vs rho = 1{units}")
  for arm in analysis.get("arms", []):
    units = f", {arm['gap_in_seed_std']:+.2f} seed std, z {arm['gap_z']:+.2f}" if pooled else ""
    lines.append(f"{arm['side']} arm: rho = {arm['rho']:.3f} is {arm['gap']:+.4f} nats above the minimum "
                 f"(over {arm['gap_seeds']} paired seeds{units})")
  if analysis.get("arms"):
    lines.append("interior minimum " + ("resolved: both arms >= 3 seed std" if analysis["interior_minimum_resolved"]
                                        else "not resolved: an arm is below 3 seed std"))
  return "\n".join(lines)


def _figure(panels: int):
  """A row of `panels` 5.5 x 4 inch axes (headless backend; matplotlib is imported only when plotting)."""
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  return plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False)


def _save(fig, path: str) -> None:
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_sweep(summary: Sequence[dict], path: str, title: str = "", analysis: dict | None = None) -> None:
  """Validation loss vs rho (mean over seeds, error bars = sample std; dots = single seeds) to a PNG.

  With `analysis` (from `analyse`): a band of +- one pooled seed std around the pure-MoE mean, and, when rho = 1
  was trained, a second panel of the paired gaps (each hybrid's loss minus rho = 1's loss on the same seed and
  batches), which cancels the seed-to-seed offset that both share.
  """
  gaps = [g for g in (analysis or {}).get("gaps", []) if g["paired_gaps"]]
  fig, axes = _figure(2 if gaps else 1)
  ax = axes[0, 0]
  rhos = [s["rho"] for s in summary]
  ax.errorbar(rhos, [s["mean_val_loss"] for s in summary], yerr=[s["std_val_loss"] for s in summary],
              marker="o", capsize=3, label="mean ± std over seeds")
  for s in summary:
    ax.scatter([s["rho"]] * len(s["val_losses"]), s["val_losses"], s=8, color="gray", alpha=0.6)
  ref = next((s["mean_val_loss"] for s in summary if s["rho"] == 1.0), None)
  pooled = (analysis or {}).get("pooled_seed_std")
  if pooled and ref is not None:
    ax.axhspan(ref - pooled, ref + pooled, color="tab:orange", alpha=0.15, label="rho = 1 mean ± pooled seed std")
  ax.set_ylabel("final validation loss")
  ax.set_title(title or "Sparsity allocation (iso P_tot, P_act, FLOPs)")
  if gaps:
    bx = axes[0, 1]
    bx.axhline(0.0, color="black", lw=0.8)
    bx.plot([1.0] + [g["rho"] for g in gaps], [0.0] + [sum(g["paired_gaps"]) / len(g["paired_gaps"]) for g in gaps],
            marker="o", label="mean paired gap")
    for g in gaps:
      bx.scatter([g["rho"]] * len(g["paired_gaps"]), g["paired_gaps"], s=8, color="gray", alpha=0.6)
    bx.set_ylabel("loss - loss at rho = 1, same seed (< 0: hybrid better)")
    bx.set_title("Paired gap to pure MoE")
  for a in axes[0]:
    a.set_xlabel("rho = MoE share of sparse parameters (1 = pure MoE)")
    a.invert_xaxis()
    a.grid(alpha=0.3)
    a.legend()
  _save(fig, path)


def mean_curves(runs: Sequence[dict]) -> dict[float, list[tuple[int, float]]]:
  """Per rho: the validation curve [(step, loss)] averaged over seeds, at the steps every seed evaluated."""
  out = {}
  for rho in sorted({r["rho"] for r in runs}, reverse=True):
    curves = [dict(r["train"]["val_curve"]) for r in runs if r["rho"] == rho and r["train"].get("val_curve")]
    if curves:
      steps = sorted(set.intersection(*(set(c) for c in curves)))
      out[rho] = [(step, sum(c[step] for c in curves) / len(curves)) for step in steps]
  return out


def plot_curves(runs: Sequence[dict], path: str) -> None:
  """Validation loss against training step per rho (mean over seeds), and each hybrid's gap to rho = 1 along the
  way, to a PNG: whether the gap grows or shrinks with tokens is the first question a flat end point raises."""
  curves = mean_curves(runs)
  ref = dict(curves.get(1.0, []))
  fig, axes = _figure(2 if ref else 1)
  ax = axes[0, 0]
  color = {rho: f"C{i}" for i, rho in enumerate(curves)}  # one colour per rho in both panels
  for rho, curve in curves.items():
    late = [(s, v) for s, v in curve if s > 0]  # step 0 (~ln V) would squash the interesting range
    ax.plot([s for s, _ in late], [v for _, v in late], marker=".", color=color[rho], label=f"rho {rho:.2f}")
  ax.set_ylabel("validation loss (mean over seeds)")
  ax.set_title("Validation curves")
  if ref:
    bx = axes[0, 1]
    bx.axhline(0.0, color="black", lw=0.8)
    for rho, curve in curves.items():
      if rho != 1.0:
        gap = [(s, v - ref[s]) for s, v in curve if s in ref and s > 0]
        bx.plot([s for s, _ in gap], [g for _, g in gap], marker=".", color=color[rho], label=f"rho {rho:.2f}")
    bx.set_ylabel("loss - loss at rho = 1 (< 0: hybrid better)")
    bx.set_title("Gap to pure MoE during training")
  for a in axes[0]:
    a.set_xlabel("training step")
    a.grid(alpha=0.3)
    a.legend(fontsize=8)
  _save(fig, path)
