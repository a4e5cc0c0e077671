"""Result files of an eval suite: JSON (everything), a markdown report (tables), and the console table."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from engram_jax import fileio


def atomic_write(path: str | os.PathLike, data: str | bytes) -> Path:
  """engram_jax.fileio.atomic_write (readers never see a partial file), returning a pathlib.Path."""
  fileio.atomic_write(path, data)
  return Path(path)


def jsonable(x: Any) -> Any:
  """Numpy / jax values and non-finite floats -> plain JSON values (NaN and inf as strings)."""
  if isinstance(x, dict):
    return {str(k): jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [jsonable(v) for v in x]
  if hasattr(x, "tolist") and not isinstance(x, (str, bytes)):
    return jsonable(x.tolist())
  if isinstance(x, float) and not math.isfinite(x):
    return str(x)
  if isinstance(x, Path):
    return str(x)
  return x


def write_json(path: str | os.PathLike, obj: Any) -> Path:
  return atomic_write(path, json.dumps(jsonable(obj), indent=1) + "\n")


def _fmt(metric: dict | None, pct: bool, signed: bool = False) -> str:
  if not metric:
    return "-"
  v, se, sign = metric["value"], metric["stderr"], "+" if signed else ""
  return f"{100 * v:{sign}.1f} ± {100 * se:.1f}" if pct else f"{v:{sign}.3f} ± {se:.3f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(r) + " |" for r in rows]
  return "\n".join(lines)


def score_table(tasks: dict[str, dict], key: str = "metrics") -> str:
  """Markdown: per task its primary metric (± standard error, in % for accuracies), chance, bits per byte of
  the gold continuation, documents, and requests whose context was left-truncated."""
  rows = []
  for name, t in tasks.items():
    m = t[key]
    primary = t["primary"]
    is_acc = primary != "bpb"
    chance = "-" if t.get("chance") is None else f"{100 * t['chance']:.1f}"
    extra = ", ".join(f"{k} {_fmt(m.get(k), True)}" for k in ("acc", "acc_per_char", "acc_per_token", "acc_uncond",
                                                                "acc_greedy") if k in m and k != primary)
    rows.append([name, t["family"], primary, _fmt(m.get(primary), is_acc), chance, _fmt(m.get("bpb"), False),
                 str(m["docs"]), str(t["truncated"]["context"]), extra])
  return markdown_table(["task", "family", "metric", "score ± se", "chance", "bpb ± se", "docs", "truncated",
                          "other metrics"], rows)


def engram_off_table(tasks: dict[str, dict], summary: dict[str, dict]) -> str:
  """Markdown: each task's primary score with Engram on and off, the retained fraction (raw and above chance),
  and the change in bits per byte; then the family means."""
  rows = []
  for name, t in tasks.items():
    if "engram_off" not in t:
      continue
    p = t["primary"]
    r = t["retained"]
    fmt = lambda x: "-" if x is None else f"{100 * x:.0f}%"  # noqa: E731
    paired = r.get("paired", {}).get(p)  # results written before the paired difference have none
    rows.append([name, t["family"], p, _fmt(t["metrics"].get(p), p != "bpb"), _fmt(t["engram_off"].get(p), p != "bpb"),
                 _fmt(paired, p != "bpb", signed=True), fmt(r["raw"]), fmt(r["above_chance"]), f"{r['bpb_delta']:+.3f}"])
  for fam, s in summary.items():
    fmt = lambda x: "-" if x is None else f"{100 * x:.0f}%"  # noqa: E731
    rows.append([f"**{fam} (mean)**", fam, "", "", "", "", fmt(s["raw"]), fmt(s["above_chance"]),
                 f"{s['bpb_delta']:+.3f}"])
  return markdown_table(["task", "family", "metric", "on", "off", "off - on (paired se)", "retained",
                          "retained above chance", "Δ bpb (off - on)"], rows)


def family_summary(tasks: dict[str, dict]) -> dict[str, dict]:
  """Mean retained fractions and bpb change per task family (over the tasks that have them)."""
  out = {}
  for fam in sorted({t["family"] for t in tasks.values() if "retained" in t}):
    ts = [t for t in tasks.values() if t["family"] == fam and "retained" in t]
    mean = lambda xs: float(np.mean(xs)) if xs else None  # noqa: E731
    out[fam] = {"tasks": len(ts),
                "raw": mean([t["retained"]["raw"] for t in ts if t["retained"]["raw"] is not None]),
                "above_chance": mean([t["retained"]["above_chance"] for t in ts
                                      if t["retained"]["above_chance"] is not None]),
                "bpb_delta": mean([t["retained"]["bpb_delta"] for t in ts])}
  return out
