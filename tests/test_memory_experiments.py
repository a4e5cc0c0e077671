"""The ablation / infinite-memory runner end to end on a toy config (a few steps, tiny model, a corpus made here):
results JSON, PNG and README written, a second invocation skips finished runs; and its numbers (gaps in seed-std
units, the log-linear fit) against hand-computed values.

Letters: none (no arrays are shaped here).
"""

import json
import math

import numpy as np
import pytest

from engram_jax.experiments import memory_experiments as me
from toy_corpus import build_toy_corpus  # tests/ is on sys.path (pytest rootdir-relative import)

TOY = "configs/experiments/memory_experiments_toy.gin"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("corpus")
  build_toy_corpus(data_dir, num_docs=200, seed=2)
  return str(data_dir)


@pytest.mark.slow
def test_ablation_and_infinite_memory_runs_end_to_end_and_resume(corpus, tmp_path, capsys):
  out = tmp_path / "ablation"
  argv = [f"--gin_file={TOY}", f"--gin.RunConfig.data_dir='{corpus}'", f"--gin.OUT_DIR='{out}'"]
  results = me.main(argv)
  on_disk = json.loads((out / "results.json").read_text())
  points = on_disk["summary"]["points"]
  assert list(points) == ["full", "moe_only", "no_gate", "capacity_one"]
  assert on_disk["summary"]["reference"] == "full" and on_disk["summary"]["pooled_seed_std"] is None  # one seed
  for name, p in points.items():
    run = next(r for r in on_disk["runs"] if r["point"] == name)
    assert p["mean_val_loss"] == run["train"]["final_val_loss"] and run["train"]["steps"] == 4
    assert np.isfinite(p["mean_val_loss"])
    if name != "full":
      assert p["gap"] == pytest.approx(p["mean_val_loss"] - points["full"]["mean_val_loss"])
  assert points["moe_only"]["params"] < points["capacity_one"]["params"] < points["full"]["params"]
  assert next(r for r in on_disk["runs"] if r["point"] == "no_gate")["model_config"]["engram"]["gate"] is False
  for name in ("ablation.png", "README.md"):
    assert (out / name).stat().st_size > 0
  readme = (out / "README.md").read_text()
  assert "memory_experiments" in readme and "| no_gate |" in readme
  # a rerun trains nothing and writes the same summary
  capsys.readouterr()
  again = me.main(argv)
  assert capsys.readouterr().out.count("(skipped)") == 4
  assert again["summary"] == results["summary"]

  out2 = tmp_path / "memory"
  me.main([f"--gin_file={TOY}", f"--gin.RunConfig.data_dir='{corpus}'", f"--gin.OUT_DIR='{out2}'",
           "--gin.ExperimentConfig.kind='infinite_memory'"])
  res = json.loads((out2 / "results.json").read_text())
  assert list(res["summary"]["points"]) == ["moe_only", "engram_slots200", "engram_slots800",
                                            "overencoding_slots200", "overencoding_slots800"]
  assert set(res["fits"]) == {"engram", "overencoding"} and (out2 / "loss_vs_slots.png").is_file()
  e_loss = {(r["variant"], r["point"].rsplit("slots", 1)[1]): r["train"]["final_val_loss"] for r in res["runs"]}
  assert res["contrasts"]["overencoding"]["per_slots"]["800"]["gap"] == pytest.approx(
      e_loss[("overencoding", "800")] - e_loss[("engram", "800")])
  assert "At equal slots (variant - engram" in (out2 / "README.md").read_text()
  for r in res["runs"]:
    if r["variant"]:
      assert r["slots"] >= int(r["point"].rsplit("slots", 1)[1])  # primes round each head up
  f = res["fits"]["engram"]
  e = {r["slots"]: r["train"]["final_val_loss"] for r in res["runs"] if r["variant"] == "engram"}
  (x1, y1), (x2, y2) = sorted(e.items())
  assert f["slope"] == pytest.approx((y2 - y1) / math.log(x2 / x1))  # two points: the line through them


def test_summary_gaps_in_seed_std_units_and_paired_by_seed():
  def run(point, seed, loss):
    return {"point": point, "seed": seed, "train": {"final_val_loss": loss}, "params": {"total": 1}}

  runs = [run("full", 0, 3.0), run("full", 1, 3.2), run("no_gate", 0, 3.3), run("no_gate", 1, 3.3)]
  s = me.summarise(runs, "full")
  pooled = math.sqrt(((3.0 - 3.1) ** 2 + (3.2 - 3.1) ** 2) / 2)  # within-point variances pooled over 2 dof
  assert s["pooled_seed_std"] == pytest.approx(pooled) and s["pooled_dof"] == 2
  p = s["points"]["no_gate"]
  assert p["gap"] == pytest.approx(0.2) and p["paired_gaps"] == pytest.approx([0.3, 0.1])
  assert p["gap_in_seed_std"] == pytest.approx(0.2 / pooled)
  assert p["gap_z"] == pytest.approx(0.2 / (pooled * math.sqrt(1 / 2 + 1 / 2)))
  # the paired gaps 0.3, 0.1 spread by sqrt(0.02) over 1 dof; a 2-seed mean gap's se is that / sqrt(2)
  assert s["paired_gap_std"] == pytest.approx(math.sqrt(0.02)) and s["paired_gap_dof"] == 1
  assert p["gap_z_paired"] == pytest.approx(0.2 / (math.sqrt(0.02) / math.sqrt(2)))


def test_summary_gap_of_a_point_missing_a_seed_is_over_the_shared_seeds():
  def run(point, seed, loss):
    return {"point": point, "seed": seed, "train": {"final_val_loss": loss}, "params": {"total": 1}}

  # seed 1 is 0.2 lower for every point; no_conv has only seed 0 so far and equals full there
  runs = [run("full", 0, 3.2), run("full", 1, 3.0), run("no_conv", 0, 3.2), run("no_gate", 0, 3.3),
          run("no_gate", 1, 3.1)]
  s = me.summarise(runs, "full")
  pooled = s["pooled_seed_std"]
  nc, ng = s["points"]["no_conv"], s["points"]["no_gate"]
  assert nc["gap"] == pytest.approx(0.0) and nc["gap_seeds"] == 1  # not 3.2 - mean(3.2, 3.0) = +0.1
  assert nc["gap_z"] == pytest.approx(0.0)
  assert ng["gap"] == pytest.approx(0.1) and ng["gap_seeds"] == 2
  assert ng["gap_z"] == pytest.approx(0.1 / (pooled * math.sqrt(2 / 2)))
  no_shared = me.summarise([run("full", 0, 3.2), run("full", 1, 3.0), run("no_conv", 2, 3.4)], "full")
  p = no_shared["points"]["no_conv"]  # no seed in common: the difference of the means
  assert p["gap"] == pytest.approx(0.3) and p["gap_seeds"] == 0
  assert p["gap_z"] == pytest.approx(0.3 / (no_shared["pooled_seed_std"] * math.sqrt(1 + 1 / 2)))


def test_loglinear_fit_matches_numpy_polyfit():
  rng = np.random.default_rng(0)
  x = np.repeat([1e3, 4e3, 16e3, 64e3], 2)
  y = 4.0 - 0.03 * np.log(x) + rng.normal(0, 0.01, x.size)
  f = me.loglinear_fit(list(x), list(y))
  slope, intercept = np.polyfit(np.log(x), y, 1)
  assert f["slope"] == pytest.approx(slope) and f["intercept"] == pytest.approx(intercept)
  resid = y - (intercept + slope * np.log(x))
  se = math.sqrt(np.sum(resid ** 2) / (x.size - 2) / np.sum((np.log(x) - np.log(x).mean()) ** 2))
  assert f["slope_se"] == pytest.approx(se) and f["slope_per_doubling"] == pytest.approx(slope * math.log(2))


def test_variant_contrasts_pair_equal_slots_and_seeds():
  """OverEncoding minus Engram at each slot count, paired by seed; a slot count only one variant has is left out;
  the slope difference's se combines the two fits' (per doubling)."""
  def run(variant, slots, seed, loss):
    return {"point": f"{variant}_slots{slots}" if variant else "moe_only", "variant": variant, "slots": slots + 7,
            "seed": seed, "train": {"final_val_loss": loss}}  # built tables round each head up to a prime

  runs = [run("engram", 100, 0, 4.0), run("engram", 100, 1, 4.1), run("engram", 400, 0, 3.9),
          run("engram", 1600, 0, 3.8), run("overencoding", 100, 0, 4.05), run("overencoding", 100, 1, 4.12),
          run("overencoding", 400, 0, 3.97), run("overencoding", 800, 0, 3.9), run(None, 0, 0, 4.3)]
  fit = me.fits(runs)
  c = me.variant_contrasts(runs, fit)
  assert list(c) == ["overencoding"]
  oe = c["overencoding"]
  assert oe["per_slots"]["100"]["paired"] == pytest.approx([0.05, 0.02])
  assert oe["per_slots"]["100"]["gap"] == pytest.approx(0.035) and oe["per_slots"]["400"]["gap"] == pytest.approx(0.07)
  assert "800" not in oe["per_slots"] and "1600" not in oe["per_slots"]
  assert oe["mean_gap"] == pytest.approx((0.035 + 0.07) / 2) and oe["n_slot_counts"] == 2
  d = fit["overencoding"]["slope_per_doubling"] - fit["engram"]["slope_per_doubling"]
  assert oe["slope_per_doubling_diff"] == pytest.approx(d)
  se = math.log(2) * math.sqrt(fit["overencoding"]["slope_se"] ** 2 + fit["engram"]["slope_se"] ** 2)
  assert oe["slope_per_doubling_diff_se"] == pytest.approx(se)
  lines = me._contrast_lines(c, pooled=0.01)
  assert any(line.startswith("| overencoding | +0.0350 | +0.0700 | +0.0525 (+5.") for line in lines)


def test_bad_experiment_configs_name_the_field():
  from engram_jax.models.config import ModelConfig
  from engram_jax.layers.engram_config import EngramConfig
  base = ModelConfig(engram_layers=(1,), engram=EngramConfig())
  with pytest.raises(ValueError, match="kind='sweep'"):
    me.ExperimentConfig(kind="sweep", base=base)
  with pytest.raises(ValueError, match="include 'full'"):
    me.ExperimentConfig(base=base, ablations=("no_gate",))
  with pytest.raises(ValueError, match="unknown \\['no_table'\\]"):
    me.ExperimentConfig(base=base, ablations=("full", "no_table"))
  with pytest.raises(ValueError, match="slots"):
    me.ExperimentConfig(kind="infinite_memory", base=base, slots=(100,))
  with pytest.raises(ValueError, match="EngramConfig"):
    me.ExperimentConfig(base=ModelConfig())
  with pytest.raises(ValueError, match="include 'adam_dense'"):
    me.ExperimentConfig(kind="table_optimizer", base=base, table_optimizers=("adam_lazy",))
  with pytest.raises(ValueError, match="unknown \\['lamb'\\]"):
    me.ExperimentConfig(kind="table_optimizer", base=base, table_optimizers=("adam_dense", "lamb"))


def test_ablation_plan_keeps_table_slots_where_it_says():
  from engram_jax import budget
  from engram_jax import configurables, cli
  exp, run, _ = configurables.resolve("experiment", ["configs/experiments/ablation_cpu.gin"], entry=cli.EXPERIMENT)
  points = {name: m for name, m, _ in me.plan(exp, run)}
  assert list(points)[0] == "full" and len(points) == 12
  rows = {name: budget.engram_table_rows(m) if m.engram_layers else 0 for name, m in points.items()}
  for name in ("no_gate", "no_conv", "no_compression", "single_branch", "one_head_per_order", "ngram4",
               "layers_early", "layers_late"):
    assert abs(rows[name] / rows["full"] - 1) < 0.01, name  # equal slots (up to prime rounding and padding)
  assert rows["moe_only"] == 0 and rows["capacity_one"] == 1024 < rows["full"]  # 8 rows, padded to table_row_multiple
  assert rows["layers_every"] == pytest.approx(4 * rows["full"], rel=0.01)  # one full table per block


def test_table_optimizer_plan_changes_only_the_table_optimizer_and_writes_results(tmp_path):
  """The quality experiment's points differ from the reference run only in OptimizerConfig.table_optimizer; with
  a stand-in train function (losses by hand) the runner writes the gaps to adam_dense and skips finished runs."""
  import dataclasses
  from engram_jax import configurables, cli
  exp, run, _ = configurables.resolve("experiment", ["configs/experiments/table_optimizer_quality.gin"],
                                      entry=cli.EXPERIMENT)
  points = me.plan(exp, run)
  assert [p[0] for p in points] == ["adam_dense", "adam_lazy", "adagrad_rowwise"]
  for name, model, r in points:
    assert model == exp.base and r.optimizer.table_optimizer == name
    assert dataclasses.replace(r, optimizer=run.optimizer) == run
  losses = {("adam_dense", 0): 6.24, ("adam_dense", 1): 6.26, ("adam_lazy", 0): 6.25, ("adam_lazy", 1): 6.27,
            ("adagrad_rowwise", 0): 6.40, ("adagrad_rowwise", 1): 6.42}
  trained = []

  def fake_train(model, cfg, run_dir):
    trained.append((cfg.optimizer.table_optimizer, cfg.seed))
    return {"final_val_loss": losses[trained[-1]], "val_curve": [[0, 9.0], [cfg.steps, losses[trained[-1]]]]}

  res = me.run_experiment(exp, run, str(tmp_path), train_fn=fake_train, command="test", log=lambda s: None)
  assert sorted(trained) == sorted(losses)
  pts = res["summary"]["points"]
  assert res["summary"]["reference"] == "adam_dense"
  assert pts["adam_lazy"]["gap"] == pytest.approx(0.01) and pts["adagrad_rowwise"]["gap"] == pytest.approx(0.16)
  assert pts["adagrad_rowwise"]["gap_in_seed_std"] == pytest.approx(0.16 / math.sqrt(0.02 ** 2 / 2))
  assert (tmp_path / "table_optimizers.png").stat().st_size > 0
  # the table gives each seed's paired gap (6.40 - 6.24, 6.42 - 6.26)
  assert "| adagrad_rowwise | " in (tmp_path / "README.md").read_text()
  assert "| +0.1600 | +0.1600, +0.1600 | " in (tmp_path / "README.md").read_text()
  trained.clear()
  readme_path = tmp_path / "README.md"
  hand = "## Reading (by hand, today)\n\nadam_lazy ties adam_dense.\n"
  readme_path.write_text(readme_path.read_text() + "\n" + hand)
  me.run_experiment(exp, run, str(tmp_path), train_fn=fake_train, command="test", log=lambda s: None)
  assert trained == []
  text = readme_path.read_text()
  assert text.endswith(hand) and text.count("## Reading (by hand") == 1  # a rerun keeps a person's reading
  assert text.startswith("# table_optimizer: results")
  # a record written before a field existed (a later implementation choice) still counts as finished
  rec = json.loads((tmp_path / "adam_lazy_seed0" / "point_result.json").read_text())
  del rec["model_config"]["moe"]["capacity_impl"]
  (tmp_path / "adam_lazy_seed0" / "point_result.json").write_text(json.dumps(rec))
  me.run_experiment(exp, run, str(tmp_path), train_fn=fake_train, command="test", log=lambda s: None)
  assert trained == []
  # report_only: a partial report of the finished runs, nothing trained, the missing ones named
  partial = tmp_path / "partial"
  for name in ("adam_dense_seed0", "adam_dense_seed1", "adam_lazy_seed0"):
    (partial / name).mkdir(parents=True)
    (partial / name / "point_result.json").write_bytes((tmp_path / name / "point_result.json").read_bytes())
  res = me.run_experiment(dataclasses.replace(exp, report_only=True), run, str(partial), train_fn=fake_train,
                          command="test", log=lambda s: None)
  assert trained == [] and res["not_finished"] == ["adam_lazy_seed1", "adagrad_rowwise_seed0",
                                                    "adagrad_rowwise_seed1"]
  assert res["summary"]["points"]["adam_lazy"]["gap"] == pytest.approx(0.01)  # 6.25 - 6.24: seed 0 alone
  assert "Gaps are over the seeds a point shares with adam_dense" in (partial / "README.md").read_text()
  assert "Not finished (left out of this report): adam_lazy_seed1" in (partial / "README.md").read_text()
  with pytest.raises(ValueError, match="no finished run"):
    me.run_experiment(dataclasses.replace(exp, report_only=True), run, str(tmp_path / "empty"),
                      train_fn=fake_train, log=lambda s: None)


def test_a_run_finished_by_a_train_command_is_adopted_without_training(tmp_path):
  """result.json complete at the planned steps and run_record.json with the planned configs: reported as is
  (checkpoints not opened); another seed's or optimizer's record is not adopted."""
  import dataclasses
  from engram_jax import configurables, cli
  from engram_jax.experiments.sparsity_allocation import _jsonable
  exp, run, _ = configurables.resolve("experiment", ["configs/experiments/table_optimizer_quality.gin"],
                                      entry=cli.EXPERIMENT)
  exp = dataclasses.replace(exp, seeds=(0,), table_optimizers=("adam_dense",))
  (_, model, planned), = me.plan(exp, run)
  cfg = dataclasses.replace(planned, seed=0)
  run_dir = tmp_path / "adam_dense_seed0"
  run_dir.mkdir()
  (run_dir / "result.json").write_text(json.dumps({"status": "complete", "steps": cfg.steps, "final_val_loss": 6.3,
                                                   "val_curve": [[cfg.steps, 6.3]]}))
  record = {"model_config": _jsonable(model), "run_config": _jsonable(dataclasses.replace(cfg, seed=1))}
  (run_dir / "run_record.json").write_text(json.dumps(record))
  assert me._finished_elsewhere(str(run_dir), model, cfg) is None  # another seed
  record["run_config"] = _jsonable(cfg)
  (run_dir / "run_record.json").write_text(json.dumps(record))
  trained = []
  res = me.run_experiment(exp, run, str(tmp_path), train_fn=lambda *a: trained.append(a), command="t",
                          log=lambda s: None)
  assert trained == [] and res["summary"]["points"]["adam_dense"]["mean_val_loss"] == 6.3
