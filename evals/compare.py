"""Two suite results side by side: per task the primary metric and bits per byte of each, and their difference
with its standard error: that of the per-document differences where both results hold per-document values of the
same documents (the paired difference), else sqrt(se_a^2 + se_b^2) (conservative for models scored on the same
documents; results written before per-document values were kept).

    python -m evals.compare A/evals/step_300/standard.json B/evals/step_300/standard.json [--out table.md]
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence

from evals.metrics import paired_difference
from evals.report import atomic_write, markdown_table


def difference(ta: dict, tb: dict, key: str) -> dict[str, float]:
  """b - a of one task's metric `key`, {'value', 'stderr', 'paired'}."""
  da, db = (t.get("per_doc", {}).get(key) for t in (ta, tb))
  if da is not None and db is not None and len(da) == len(db):
    return {**paired_difference(da, db), "paired": True}
  ma, mb = ta["metrics"][key], tb["metrics"][key]
  return {"value": mb["value"] - ma["value"], "stderr": math.hypot(ma["stderr"], mb["stderr"]), "paired": False}


def comparison_table(a: dict, b: dict, name_a: str, name_b: str) -> str:
  """Markdown: tasks present in both results."""
  rows = []
  for task, ta in a["tasks"].items():
    tb = b["tasks"].get(task)
    if tb is None:
      continue
    p = ta["primary"]
    pct = 1.0 if p == "bpb" else 100.0
    cells = [task, ta["family"], p]
    for key in (p, "bpb") if p != "bpb" else ("bpb",):
      ma, mb = ta["metrics"][key], tb["metrics"][key]
      scale = 1.0 if key == "bpb" else pct
      d = difference(ta, tb, key)
      diff, se = d["value"] * scale, d["stderr"] * scale
      fmt = "{:.3f}" if key == "bpb" else "{:.1f}"
      cells += [fmt.format(ma["value"] * scale), fmt.format(mb["value"] * scale),
                (fmt.format(diff) if diff < 0 else "+" + fmt.format(diff)) + " ± " + fmt.format(se)]
    if p == "bpb":
      cells = cells[:3] + ["", "", ""] + cells[3:]
    chance = ta.get("chance")
    rows.append(cells + ["-" if chance is None else f"{100 * chance:.1f}"])
  return markdown_table(["task", "family", "metric", name_a, name_b, f"{name_b} - {name_a}", f"bpb {name_a}",
                         f"bpb {name_b}", "Δ bpb", "chance"], rows)


def main(argv: Sequence[str] | None = None) -> str:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("a")
  p.add_argument("b")
  p.add_argument("--names", nargs=2, default=None, help="column names (default: the checkpoint directories)")
  p.add_argument("--out", default=None, help="also write the markdown here")
  args = p.parse_args(argv)
  a, b = (json.loads(open(f).read()) for f in (args.a, args.b))
  names = args.names or [r["checkpoint"].rstrip("/").split("/")[-1] for r in (a, b)]
  text = comparison_table(a, b, *names)
  print(text)
  if args.out:
    atomic_write(args.out, text + "\n")
  return text


if __name__ == "__main__":
  main()
