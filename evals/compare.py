"""Two suite results side by side: per task the primary metric and bits per byte of each, and their difference
with its standard error (sqrt(se_a^2 + se_b^2): the two models are scored on the same documents, so this is
conservative).

    python -m evals.compare A/evals/step_300/standard.json B/evals/step_300/standard.json [--out table.md]
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence

from evals.report import atomic_write, markdown_table


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
      diff = (mb["value"] - ma["value"]) * scale
      se = math.hypot(ma["stderr"], mb["stderr"]) * scale
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
