"""WSD against cosine on the same runs: does a warmup-stable-decay cooldown branch stand in for a cosine run?

Reads the run records (`<dir>/*/sweep_result.json`) of a sparsity-allocation sweep trained on the WSD schedule with
budgets (each run's full length and its cooldown branches) and of sweeps of the same models trained on cosine, pairs
them by (rho, seed, steps), checks that each pair shares model config, batch size, sequence length and seed (the
same batches), and reports per pair the loss gap WSD - cosine, and per (steps, seed) each rho's gap to pure MoE
(rho = 1) under both schedules: the allocation comparison the sweeps rely on, and whether it survives the change.

    python -m engram_jax.experiments.schedule_comparison --wsd evals/results/wsd_validation_cpu \
        --cosine evals/results/sparsity_allocation_cpu evals/results/sparsity_allocation_cpu_8m

Writes `<wsd>/vs_cosine.json` and `<wsd>/vs_cosine.png` (validation curves of both schedules per rho) and prints
the table. Gaps are also given in units of the cosine sweep's pooled seed std where its results.json has one.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from collections.abc import Sequence

from engram_jax.experiments.sparsity_allocation import software_versions
from engram_jax.experiments.sweep_report import _figure, _save


def load_runs(sweep_dir: str) -> list[dict]:
  """Every finished run record of a sweep directory (sweep_result.json), sorted by (rho, seed)."""
  runs = []
  for path in sorted(glob.glob(os.path.join(sweep_dir, "*", "sweep_result.json"))):
    with open(path) as f:
      runs.append(json.load(f))
  return sorted(runs, key=lambda r: (r["rho"], r["seed"]))


def by_length(runs: Sequence[dict]) -> dict[tuple[float, int, int], tuple[dict, dict]]:
  """{(rho, seed, steps): (train result, run record)} over each run's full length and its budget branches."""
  out = {}
  for r in runs:
    out[(r["rho"], r["seed"], r["train"]["steps"])] = (r["train"], r)
    for t, branch in (r.get("budgets") or {}).items():
      out[(r["rho"], r["seed"], int(t))] = (branch, r)
  return out


def pooled_std(sweep_dir: str) -> float | None:
  try:
    with open(os.path.join(sweep_dir, "results.json")) as f:
      return json.load(f)["analysis"].get("pooled_seed_std")
  except (OSError, KeyError, ValueError):
    return None


def _shared_fields_differ(a, b) -> bool:
  """Whether two recorded configs differ in a field both have (records of different versions add or drop fields
  whose defaults do not change the model, e.g. an implementation choice)."""
  if isinstance(a, dict) and isinstance(b, dict):
    return any(_shared_fields_differ(a[k], b[k]) for k in a.keys() & b.keys())
  return a != b


def _same_data(a: dict, b: dict) -> str | None:
  """Why two run records do not see the same model and batches, or None."""
  if _shared_fields_differ(a["model_config"], b["model_config"]):
    return "model configs differ"
  for field in ("batch_size", "seq_len", "seed"):
    if a["run_config"][field] != b["run_config"][field]:
      return f"RunConfig.{field} differs ({a['run_config'][field]} vs {b['run_config'][field]})"
  return None


def compare(wsd_dir: str, cosine_dirs: Sequence[str]) -> dict:
  """Pairs (see the module docstring); ValueError naming the run when a pair's model or data differ."""
  wsd = by_length(load_runs(wsd_dir))
  if not wsd:
    raise ValueError(f"--wsd {wsd_dir}: no finished run (no */sweep_result.json); train it first")
  cosine, stds = {}, {}
  for d in cosine_dirs:
    runs = by_length(r for r in load_runs(d) if not r.get("budgets"))
    for key, value in runs.items():
      cosine.setdefault(key, value)
      stds.setdefault(key[2], pooled_std(d))
  pairs = []
  for key in sorted(set(wsd) & set(cosine)):
    (w, wrec), (c, crec) = wsd[key], cosine[key]
    why = _same_data(wrec, crec)
    if why:
      raise ValueError(f"rho {key[0]} seed {key[1]}: the WSD and cosine runs do not see the same model and data "
                       f"({why}); compare runs of the same sweep config only")
    gap, std = w["final_val_loss"] - c["final_val_loss"], stds.get(key[2])
    tokens = key[2] * wrec["run_config"]["batch_size"] * wrec["run_config"]["seq_len"]
    pairs.append({"rho": key[0], "seed": key[1], "steps": key[2], "tokens": tokens,
                  "wsd": w["final_val_loss"], "cosine": c["final_val_loss"], "gap": gap,
                  "gap_in_seed_std": gap / std if std else None, "cosine_seed_std": std,
                  "wsd_val_curve": w["val_curve"], "cosine_val_curve": c["val_curve"]})
  if not pairs:
    raise ValueError(f"no (rho, seed, steps) of {wsd_dir} has a cosine run in {list(cosine_dirs)}")
  return {"pairs": pairs, "rho_gaps": rho_gaps(pairs)}


def rho_gaps(pairs: Sequence[dict]) -> list[dict]:
  """Per (steps, seed) with rho = 1 paired: each other rho's loss minus rho = 1's, under WSD and under cosine."""
  ref = {(p["steps"], p["seed"]): p for p in pairs if p["rho"] == 1.0}
  out = []
  for p in pairs:
    r = ref.get((p["steps"], p["seed"]))
    if r is not None and p["rho"] != 1.0:
      out.append({"rho": p["rho"], "seed": p["seed"], "steps": p["steps"], "wsd": p["wsd"] - r["wsd"],
                  "cosine": p["cosine"] - r["cosine"]})
  return out


def table(result: dict) -> str:
  lines = ["| rho | seed | steps | tokens | WSD | cosine | WSD - cosine | / cosine seed std |",
           "|---|---|---|---|---|---|---|---|"]
  for p in result["pairs"]:
    units = "" if p["gap_in_seed_std"] is None else f"{p['gap_in_seed_std']:+.1f}"
    lines.append(f"| {p['rho']:.3f} | {p['seed']} | {p['steps']} | {p['tokens'] / 1e6:.2f}M | {p['wsd']:.4f} | "
                 f"{p['cosine']:.4f} | {p['gap']:+.4f} | {units} |")
  if result["rho_gaps"]:
    lines += ["", "| rho - rho 1.0 | seed | steps | under WSD | under cosine |", "|---|---|---|---|---|"]
    for g in result["rho_gaps"]:
      lines.append(f"| {g['rho']:.3f} | {g['seed']} | {g['steps']} | {g['wsd']:+.4f} | {g['cosine']:+.4f} |")
  return "\n".join(lines)


def plot(result: dict, path: str) -> None:
  """One panel per rho: validation loss against step for each length (from a fifth of it on), WSD solid and cosine
  dashed."""
  rhos = sorted({p["rho"] for p in result["pairs"]}, reverse=True)
  fig, axes = _figure(len(rhos))
  for ax, rho in zip(axes[0], rhos):
    for i, p in enumerate(q for q in result["pairs"] if q["rho"] == rho):
      for curve, style, name in ((p["wsd_val_curve"], "-", "WSD"), (p["cosine_val_curve"], "--", "cosine")):
        pts = [(s, v) for s, v in curve if s >= p["steps"] // 5]  # past the early drop, where the schedules part
        ax.plot([s for s, _ in pts], [v for _, v in pts], style, marker=".", color=f"C{i}",
                label=f"{name}, {p['steps']} steps (seed {p['seed']}): {p[name.lower()]:.4f}")
    ax.set_xlabel("training step")
    ax.set_ylabel("validation loss")
    ax.set_title(f"rho = {rho}: WSD (solid) vs cosine (dashed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  _save(fig, path)


def main(argv: Sequence[str] | None = None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--wsd", required=True, help="sweep directory trained on WSD (with budgets)")
  p.add_argument("--cosine", required=True, nargs="+", help="sweep directories of the same models on cosine")
  args = p.parse_args(argv)
  result = compare(args.wsd, args.cosine)
  result.update(command=" ".join([sys.executable, "-m", "engram_jax.experiments.schedule_comparison",
                                  *(sys.argv[1:] if argv is None else argv)]), versions=software_versions())
  from engram_jax import fileio  # noqa: PLC0415
  fileio.atomic_write(os.path.join(args.wsd, "vs_cosine.json"), json.dumps(result, indent=1))
  plot(result, os.path.join(args.wsd, "vs_cosine.png"))
  print(table(result))
  return result


if __name__ == "__main__":
  main()
