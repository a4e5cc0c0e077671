"""Report tables: the score table, the Engram-off table with family means, and two results side by side."""

import math

import pytest

from evals import compare, report


def _task(family, primary, value, se, chance, bpb, off=None, paired_se=None):
  t = {"family": family, "primary": primary, "chance": chance, "truncated": {"context": 0},
       "metrics": {primary: {"value": value, "stderr": se}, "bpb": {"value": bpb, "stderr": 0.01}, "docs": 100}}
  if off is not None:
    t["engram_off"] = {primary: {"value": off, "stderr": se}, "bpb": {"value": bpb + 0.1, "stderr": 0.01}}
    t["retained"] = {"raw": off / value, "above_chance": (off - chance) / (value - chance), "bpb_delta": 0.1}
    if paired_se is not None:  # results written before the paired difference have none
      t["retained"]["paired"] = {primary: {"value": off - value, "stderr": paired_se}}
  return t


def test_score_and_engram_off_tables_with_family_means():
  tasks = {"arc_easy": _task("knowledge", "acc", 0.40, 0.02, 0.25, 2.5, off=0.30, paired_se=0.015),
           "sciq": _task("knowledge", "acc", 0.60, 0.02, 0.25, 2.0, off=0.50),
           "boolq": _task("reading", "acc", 0.55, 0.02, 0.5, 3.0, off=0.55)}
  table = report.score_table(tasks)
  assert "| arc_easy | knowledge | acc | 40.0 ± 2.0 | 25.0 | 2.500 ± 0.010 | 100 | 0 |" in table
  summary = report.family_summary(tasks)
  assert summary["knowledge"]["raw"] == pytest.approx((0.30 / 0.40 + 0.50 / 0.60) / 2)
  assert summary["knowledge"]["above_chance"] == pytest.approx((0.05 / 0.15 + 0.25 / 0.35) / 2)
  assert summary["reading"]["above_chance"] == pytest.approx(1.0) and summary["reading"]["tasks"] == 1
  off = report.engram_off_table(tasks, summary)
  assert "| arc_easy | knowledge | acc | 40.0 ± 2.0 | 30.0 ± 2.0 | -10.0 ± 1.5 | 75% | 33% | +0.100 |" in off
  assert "| sciq | knowledge | acc | 60.0 ± 2.0 | 50.0 ± 2.0 | - | 83% | 71% | +0.100 |" in off
  assert "**knowledge (mean)**" in off


def test_comparison_table_differences_and_standard_errors():
  a = {"tasks": {"arc_easy": _task("knowledge", "acc", 0.40, 0.03, 0.25, 2.5),
                 "lambada": _task("reading", "bpb", 3.0, 0.05, None, 3.0)}}
  b = {"tasks": {"arc_easy": _task("knowledge", "acc", 0.44, 0.04, 0.25, 2.4),
                 "lambada": _task("reading", "bpb", 2.9, 0.05, None, 2.9)}}
  text = compare.comparison_table(a, b, "moe", "engram")
  se = 100 * math.hypot(0.03, 0.04)
  assert f"| arc_easy | knowledge | acc | 40.0 | 44.0 | +4.0 ± {se:.1f} | 2.500 | 2.400 | -0.100 ± 0.014 | 25.0 |" in text
  assert "| lambada | reading | bpb |  |  |  | 3.000 | 2.900 | -0.100 ± 0.014 | - |" in text
  # with per-document values of the same documents in both: the paired difference's standard error
  on, off = [1.0, 1.0, 0.0, 1.0], [1.0, 0.0, 0.0, 1.0]
  a["tasks"]["arc_easy"]["per_doc"], b["tasks"]["arc_easy"]["per_doc"] = {"acc": on}, {"acc": off}
  d = compare.difference(a["tasks"]["arc_easy"], b["tasks"]["arc_easy"], "acc")
  assert d["paired"] and d["value"] == pytest.approx(-0.25) and d["stderr"] == pytest.approx(0.25)
  assert "| arc_easy | knowledge | acc | 40.0 | 44.0 | -25.0 ± 25.0 |" in compare.comparison_table(a, b, "moe", "engram")
