"""The sparsity-allocation sweep runner end to end: two tiny points trained on a corpus made here, results JSON and
PNGs written, budgets recorded, a second invocation resumes (skips) finished runs; and the sweep report's numbers
(pooled seed std, gaps to rho = 1, seed-averaged curves) against hand-computed values.

Letters: none (no arrays are shaped here).
"""

import json

import numpy as np
import pytest

from engram_jax import budget
from engram_jax.experiments import sparsity_allocation as sa
from engram_jax.experiments import sweep_report
from toy_corpus import build_toy_corpus  # tests/ is on sys.path (pytest rootdir-relative import)

TOY = "configs/experiments/sparsity_allocation_toy.gin"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """~300 short documents of a 26-word language with a 300-piece SentencePiece vocabulary."""
  data_dir = tmp_path_factory.mktemp("corpus")
  build_toy_corpus(data_dir, num_docs=300, seed=1)
  return str(data_dir)


@pytest.fixture(scope="module")
def swept(corpus, tmp_path_factory):
  out = tmp_path_factory.mktemp("sweep")
  argv = [f"--gin_file={TOY}", f"--gin.RunConfig.data_dir='{corpus}'", f"--gin.OUT_DIR='{out}'"]
  return out, f"RunConfig.data_dir='{corpus}'", sa.main(argv)


def test_sweep_writes_results_and_plot(swept):
  out, _, results = swept
  on_disk = json.loads((out / "results.json").read_text())
  assert on_disk["summary"] == results["summary"]
  assert [s["rho"] for s in on_disk["summary"]] == [1.0, 0.5]
  assert on_disk["analysis"]["pooled_seed_std"] is None  # one seed: no noise scale, and none is invented
  assert on_disk["analysis"]["best_hybrid"]["rho"] == 0.5
  assert "engram_jax.experiments.sparsity_allocation" in on_disk["command"]
  assert on_disk["versions"]["jax"] and on_disk["versions"]["flax"]
  runs = {r["rho"]: r for r in on_disk["runs"]}
  for rho, run in runs.items():
    val = run["train"]["val_curve"]
    assert val[-1][0] == 6 and len(val) >= 2 and all(np.isfinite(v) for _, v in val)  # eval every 3 of 6 steps
    assert val[-1][1] < val[0][1]  # the toy language is learnable in 6 steps
    assert run["train"]["final_val_loss"] == val[-1][1]
    assert run["tokens"] == 6 * 8 * 32
    assert run["train_flops"] == pytest.approx(run["budget"]["budget"]["flops_per_token"] * run["tokens"])
    assert (out / sa.run_name(rho, 0) / "sweep_result.json").is_file()
    assert 0.0 <= run["routing"]["mean_dropped_fraction"] < 0.5  # capacity dispatch, factor 1.5
  # The recorded budgets are those of the configs that were trained: iso-P_tot / P_act within the toy tolerance.
  b1, b5 = runs[1.0]["budget"]["budget"], runs[0.5]["budget"]["budget"]
  assert b1["engram_table"] == 0 and b5["engram_table"] > 0
  assert abs(b5["total"] / b1["total"] - 1) < 0.02 and abs(b5["active"] / b1["active"] - 1) < 0.02
  assert runs[0.5]["model_config"]["engram_layers"] == [1]
  for name in ("loss_vs_rho.png", "val_curves.png"):
    png = (out / name).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000, name
  plan = json.loads((out / "plan.json").read_text())
  assert [p["rho_target"] for p in plan["points"]] == [1.0, 0.5]


def test_summary_mean_and_std_over_seeds():
  runs = [{"rho": 0.8, "train": {"final_val_loss": x}} for x in (2.0, 2.2, 2.4)] + [
      {"rho": 1.0, "train": {"final_val_loss": 3.0}}]
  summary = sweep_report.summarise(runs)
  assert [s["rho"] for s in summary] == [1.0, 0.8]
  assert summary[1]["mean_val_loss"] == pytest.approx(2.2)
  assert summary[1]["std_val_loss"] == pytest.approx(np.std([2.0, 2.2, 2.4], ddof=1))
  assert summary[0]["std_val_loss"] == 0.0


def test_analysis_gap_in_seed_std_units():
  """Hand-computed: within-rho deviations are +-0.01 at every rho, so the pooled std is sqrt(2) * 0.01."""
  losses = {1.0: (5.00, 5.02), 0.8: (4.97, 4.99), 0.4: (5.03, 5.05)}
  runs = [{"rho": rho, "seed": seed, "train": {"final_val_loss": x}}
          for rho, xs in losses.items() for seed, x in enumerate(xs)]
  analysis = sweep_report.analyse(sweep_report.summarise(runs), runs)
  pooled = np.sqrt(2) * 0.01
  assert analysis["pooled_seed_std"] == pytest.approx(pooled) and analysis["pooled_dof"] == 3
  assert analysis["argmin_rho"] == 0.8 and analysis["interior_minimum"]
  best = analysis["best_hybrid"]
  assert best["rho"] == 0.8 and best["gap"] == pytest.approx(-0.03)
  assert best["gap_in_seed_std"] == pytest.approx(-0.03 / pooled)
  assert best["gap_z"] == pytest.approx(-0.03 / (pooled * np.sqrt(1 / 2 + 1 / 2)))
  assert best["paired_gaps"] == pytest.approx([-0.03, -0.03])
  assert "interior minimum" in sweep_report.format_analysis(analysis)
  # Minimum at an end of the grid (pure MoE lowest) is not interior.
  runs[0]["train"]["final_val_loss"] = runs[1]["train"]["final_val_loss"] = 4.9
  flat = sweep_report.analyse(sweep_report.summarise(runs), runs)
  assert flat["argmin_rho"] == 1.0 and not flat["interior_minimum"] and flat["best_hybrid"]["gap"] > 0


def test_analysis_arms_of_the_u_paired_over_shared_seeds():
  """A third seed at one rho only (seed 2, lucky: 0.04 below that rho's other seeds) must not move its gaps: every
  gap is the mean over the seeds both rhos have. Hand-computed: the pooled std has 4 dof (1 + 1 + 2)."""
  losses = {1.0: {0: 5.00, 1: 5.02}, 0.6: {0: 4.90, 1: 4.92}, 0.1: {0: 4.95, 1: 4.97, 2: 4.90}}
  runs = [{"rho": rho, "seed": seed, "train": {"final_val_loss": x}}
          for rho, xs in losses.items() for seed, x in xs.items()]
  analysis = sweep_report.analyse(sweep_report.summarise(runs), runs)
  pooled = np.sqrt((0.0002 + 0.0002 + np.var([4.95, 4.97, 4.90]) * 3) / 4)
  assert analysis["pooled_seed_std"] == pytest.approx(pooled) and analysis["pooled_dof"] == 4
  assert analysis["argmin_rho"] == 0.6 and analysis["interior_minimum"]
  memory, moe = analysis["arms"]
  assert memory["side"] == "memory" and memory["rho"] == 0.1 and memory["gap_seeds"] == 2
  assert memory["gap"] == pytest.approx(0.05)  # not 4.94 - 4.91 = 0.03, the difference of the means
  assert memory["paired_gaps"] == pytest.approx([0.05, 0.05])
  assert memory["gap_in_seed_std"] == pytest.approx(0.05 / pooled)
  assert memory["gap_z"] == pytest.approx(0.05 / (pooled * np.sqrt(2 / 2)))
  assert moe["side"] == "moe" and moe["rho"] == 1.0 and moe["gap"] == pytest.approx(0.10)
  assert not analysis["interior_minimum_resolved"]  # the memory arm is 1.8 seed std
  to_moe = {g["rho"]: g for g in analysis["gaps"]}
  assert to_moe[0.1]["gap"] == pytest.approx(-0.05) and to_moe[0.1]["gap_seeds"] == 2
  assert "not resolved" in sweep_report.format_analysis(analysis)
  # Both arms far above the seed noise: resolved.
  runs = [r for r in runs if r["seed"] != 2]
  for r in runs:
    if r["rho"] == 0.1:
      r["train"]["final_val_loss"] += 0.05
  resolved = sweep_report.analyse(sweep_report.summarise(runs), runs)
  assert resolved["arms"][0]["gap_in_seed_std"] == pytest.approx(0.10 / (np.sqrt(2) * 0.01))
  assert resolved["interior_minimum_resolved"]
  assert "resolved: both arms" in sweep_report.format_analysis(resolved)


def test_paired_gap_without_a_shared_seed_is_the_difference_of_means():
  gap = sweep_report.paired_gap([(0, 2.0), (1, 2.2)], [(2, 3.0)])
  assert gap["seeds"] == 0 and gap["paired"] == []
  assert gap["gap"] == pytest.approx(-0.9) and gap["se_scale"] == pytest.approx(np.sqrt(1 / 2 + 1))


def test_mean_curves_average_seeds_at_shared_steps():
  runs = [{"rho": 0.8, "train": {"val_curve": [[0, 9.0], [5, 4.0], [10, 3.0]]}},
          {"rho": 0.8, "train": {"val_curve": [[0, 9.2], [10, 3.4]]}},  # e.g. a resumed run that skipped step 5
          {"rho": 1.0, "train": {"val_curve": [[0, 9.1], [10, 3.1]]}}]
  curves = sweep_report.mean_curves(runs)
  assert list(curves) == [1.0, 0.8]
  assert curves[0.8] == [(0, pytest.approx(9.1)), (10, pytest.approx(3.2))]


def test_second_invocation_skips_finished_runs(swept):
  out, data_binding, first = swept
  sweep, run, _ = sa.load_gin([TOY], [data_binding])

  def must_not_train(*args):
    raise AssertionError(f"run {args[2]} was trained again although its result exists")

  again = sa.run_sweep(sweep, run, str(out), train_fn=must_not_train, log=lambda _: None)
  assert again["summary"] == first["summary"]


def test_report_only_summarises_finished_runs_and_names_the_rest(swept):
  out, data_binding, first = swept
  sweep, run, _ = sa.load_gin([TOY], [data_binding, "SweepConfig.seeds = (0, 1)", "SweepConfig.report_only = True"])

  def must_not_train(*args):
    raise AssertionError(f"report_only trained {args[2]}")

  report = sa.run_sweep(sweep, run, str(out), train_fn=must_not_train, log=lambda _: None)
  assert report["not_finished"] == [sa.run_name(1.0, 1), sa.run_name(0.5, 1)]
  assert report["summary"] == first["summary"]  # the seed-0 runs only
  assert json.loads((out / "results.json").read_text())["not_finished"] == report["not_finished"]
  sweep_none, _, _ = sa.load_gin([TOY], [data_binding, "SweepConfig.seeds = (7,)", "SweepConfig.report_only = True"])
  with pytest.raises(ValueError, match="no finished run"):
    sa.run_sweep(sweep_none, run, str(out), train_fn=must_not_train, log=lambda _: None)


def test_config_differs_ignores_fields_added_later_but_not_changed_values():
  saved = {"d_model": 64, "moe": {"num_experts": 8, "dispatch": "capacity"}}
  now = {"d_model": 64, "moe": {"num_experts": 8, "dispatch": "capacity", "capacity_impl": "sorted"}}
  assert not sa.config_differs(saved, now)  # a field the record lacks: an implementation choice added later
  assert sa.config_differs({**saved, "d_model": 32}, now)
  assert sa.config_differs({**saved, "moe": {"num_experts": 4, "dispatch": "capacity"}}, now)
  assert sa.config_differs({**saved, "removed_field": 1}, now)  # a field the plan no longer has


def test_changed_plan_refuses_stale_results(swept):
  """A finished run whose model config differs from the new plan is an error, not silently reused."""
  out, data_binding, _ = swept
  sweep, run, _ = sa.load_gin([TOY], [data_binding, "SweepConfig.total_to_active = 3.0"])
  with pytest.raises(ValueError, match="different model config"):
    sa.run_sweep(sweep, run, str(out), train_fn=lambda *a: {}, log=lambda _: None)


def test_budget_cli_prints_table(capsys):
  budget.main([f"--gin_file={TOY}"])
  text = capsys.readouterr().out
  sweep, run, _ = sa.load_gin([TOY])
  allocs = sa.plan_sweep(sweep, run.seq_len)
  assert budget.format_table(allocs) in text
