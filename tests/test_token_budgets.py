"""Several token budgets from one WSD run: each budget's cooldown branch equals a straight WSD run to that budget and
the run itself equals a straight run to its full length (real training, slow); the order of the segments, resume
and bad settings (a stand-in train function that keeps the trainer's contract: a checkpoint at the step it stops);
and the per-budget report of the experiment runner.

Letters: none (no arrays are shaped here).
"""

import dataclasses
import json
import os

import pytest

from engram_jax import optim, train
from engram_jax.experiments import memory_experiments as me
from engram_jax.experiments import token_budgets as tb
from engram_jax.run_config import RunConfig
from tiny_run import tiny_model, tiny_run  # tests/ is on sys.path (pytest rootdir-relative import)

WSD = optim.OptimizerConfig(learning_rate=3e-3, warmup_steps=2, schedule="wsd", decay_fraction=0.25, min_lr_ratio=0.0)


class FakeTrainer:
  """Records (model_dir, steps, stop_after, init_step) per call; writes result.json and a checkpoint step directory
  at the step it stops, like engram_jax.train; final loss = 10 - steps / 100 (branches: + 0.5)."""

  def __init__(self):
    self.calls = []
    self.at = {}  # model_dir -> last step reached

  def __call__(self, model, run, model_dir):
    stop = run.stop_after or run.steps
    self.calls.append((os.path.basename(model_dir), run.steps, run.stop_after, run.init_step))
    self.at[model_dir] = max(self.at.get(model_dir, run.init_step or 0), stop)
    os.makedirs(os.path.join(model_dir, "checkpoints", str(self.at[model_dir])), exist_ok=True)
    loss = 10 - self.at[model_dir] / 100 + (0.5 if run.init_from else 0.0)
    result = {"status": "complete" if self.at[model_dir] >= run.steps else "stopped at stop_after",
              "steps": self.at[model_dir], "final_val_loss": loss, "val_curve": [[self.at[model_dir], loss]]}
    with open(os.path.join(model_dir, "result.json"), "w") as f:
      json.dump(result, f)
    return result


def test_branch_points_follow_the_wsd_cooldown():
  run = RunConfig(steps=2000, optimizer=dataclasses.replace(WSD, warmup_steps=50, decay_fraction=0.2))
  assert [tb.branch_point(run, t) for t in (500, 1000)] == [400, 800]
  fixed = dataclasses.replace(run, optimizer=dataclasses.replace(run.optimizer, decay_steps=100))
  assert [tb.branch_point(fixed, t) for t in (500, 1000)] == [400, 900]
  assert tb.check_budgets((1000, 500), run) == (500, 1000)


def test_segments_run_in_order_and_a_rerun_trains_only_what_is_left(tmp_path):
  run = RunConfig(steps=40, optimizer=WSD)
  fake = FakeTrainer()
  d = str(tmp_path / "p_seed0")
  full, branches = tb.train_with_budgets(fake, None, run, d, (20, 10), log=lambda s: None)
  # C(10) = round(2.5) = 2, C(20) = 5: to 8, branch 8..10; to 15, branch 15..20; then to the full 40 steps
  assert fake.calls == [("p_seed0", 40, 8, None), ("budget10", 10, None, 8), ("p_seed0", 40, 15, None),
                        ("budget20", 20, None, 15), ("p_seed0", 40, None, None)]
  assert full["steps"] == 40 and {t: r["steps"] for t, r in branches.items()} == {10: 10, 20: 20}
  fake.calls.clear()
  again_full, again = tb.train_with_budgets(fake, None, run, d, (10, 20), log=lambda s: None)
  assert fake.calls == [("p_seed0", 40, None, None)]  # both branches finished: only the (finished) run is asked
  assert again == branches
  # a budget added after the run went past its branch point is refused, naming the fix
  with pytest.raises(ValueError, match="budget branches at step 22, .* drop 30"):
    tb.train_with_budgets(fake, None, run, d, (30,), log=lambda s: None)


@pytest.mark.parametrize("change,match", [
    (dict(optimizer=dataclasses.replace(WSD, schedule="cosine")), "schedule='wsd'"),
    (dict(stop_after=20), "stop_after"),
    (dict(steps=10), r"10 steps must be in \(0, RunConfig.steps=10\)"),
    (dict(optimizer=dataclasses.replace(WSD, warmup_steps=9)), "before warmup_steps=9"),
])
def test_bad_budgets_name_the_field(change, match):
  run = dataclasses.replace(RunConfig(steps=40, optimizer=WSD), **change)
  with pytest.raises(ValueError, match=match):
    tb.check_budgets((10,), run)
  with pytest.raises(ValueError, match="distinct"):
    tb.check_budgets((10, 10), RunConfig(steps=40, optimizer=WSD))
  with pytest.raises(ValueError, match="budgets=.*positive ints"):
    from engram_jax.layers.engram_config import EngramConfig
    from engram_jax.models.config import ModelConfig
    me.ExperimentConfig(base=ModelConfig(engram_layers=(1,), engram=EngramConfig()), budgets=(0,))


def test_experiment_reports_every_budget(tmp_path):
  """The ablation runner with budgets: a record per run holding each branch's result, results.json's by_budget
  (summaries and gaps at every budget and the full length), the README's budget table and the gaps PNG."""
  from engram_jax import cli, configurables
  exp, run, _ = configurables.resolve("experiment", ["configs/experiments/memory_experiments_toy.gin"],
                                      entry=cli.EXPERIMENT)
  run = dataclasses.replace(run, steps=40, optimizer=WSD)
  exp = dataclasses.replace(exp, ablations=("full", "no_gate"), budgets=(20,))
  fake = FakeTrainer()
  res = me.run_experiment(exp, run, str(tmp_path), train_fn=fake, command="test", log=lambda s: None)
  assert list(res["by_budget"]) == ["20", "40"]
  b20 = res["by_budget"]["20"]
  assert b20["tokens"] == 20 * run.batch_size * run.seq_len and b20["n_runs"] == 2
  assert b20["summary"]["points"]["full"]["mean_val_loss"] == pytest.approx(10 - 0.2 + 0.5)
  assert b20["summary"]["points"]["no_gate"]["gap"] == pytest.approx(0.0)
  assert res["by_budget"]["40"]["summary"] == res["summary"]
  rec = json.loads((tmp_path / "no_gate_seed0" / "point_result.json").read_text())
  assert rec["budgets"]["20"]["steps"] == 20 and rec["train"]["steps"] == 40
  assert "| full | 10.3000 | 9.6000 |" in (tmp_path / "README.md").read_text()
  assert (tmp_path / "gaps_by_budget.png").stat().st_size > 0
  with pytest.raises(ValueError, match="schedule='wsd'"):  # refused before anything is trained
    me.run_experiment(exp, dataclasses.replace(run, optimizer=dataclasses.replace(WSD, schedule="cosine")),
                      str(tmp_path / "cosine"), train_fn=fake, log=lambda s: None)
  assert not (tmp_path / "cosine").exists()


def test_sparsity_sweep_analyses_every_budget(tmp_path):
  """The allocation runner with budgets: each record holds its branch, and by_budget carries the sweep's analysis
  (means per rho, gaps to rho = 1) at every budget."""
  from engram_jax.experiments import sparsity_allocation as sa
  sweep, run, _ = sa.load_gin(["configs/experiments/sparsity_allocation_toy.gin"])
  sweep = dataclasses.replace(sweep, rhos=(1.0, 0.5), seeds=(0,), budgets=(20,))
  run = dataclasses.replace(run, steps=40, optimizer=WSD)
  res = sa.run_sweep(sweep, run, str(tmp_path), train_fn=FakeTrainer(), command="test", log=lambda s: None)
  b20 = res["by_budget"]["20"]
  assert b20["tokens"] == 20 * run.batch_size * run.seq_len
  assert [s["mean_val_loss"] for s in b20["summary"]] == pytest.approx([10.3, 10.3])  # rho 1.0, 0.5
  assert b20["analysis"]["gaps"][0]["gap"] == pytest.approx(0.0)
  assert [r["budgets"]["20"]["steps"] for r in res["runs"]] == [20, 20]
  assert [s["mean_val_loss"] for s in res["summary"]] == pytest.approx([9.6, 9.6])  # the full 40-step runs


@pytest.mark.slow  # five tiny training runs: ~1-2 min on 2 free cores
def test_branches_equal_straight_runs_to_each_budget(corpus, tmp_path):
  def cfg(steps):
    return tiny_run(corpus, steps=steps, optimizer=WSD, eval_every=4, checkpoint_every=4, keep_checkpoints=1)

  full, branches = tb.train_with_budgets(train.train_and_evaluate, tiny_model(), cfg(16), str(tmp_path / "run"),
                                         (8,), log=lambda s: None)
  for steps, got in ((8, branches[8]), (16, full)):
    want = train.train_and_evaluate(tiny_model(), cfg(steps), tmp_path / f"straight{steps}")
    want_curve = dict(want["train_curve"])
    first = tb.branch_point(cfg(16), steps) + 1 if steps < 16 else 1  # a branch logs its own steps only
    assert [s for s, _ in got["train_curve"]] == list(range(first, steps + 1))
    for step, loss in got["train_curve"]:
      assert loss == want_curve[step], (steps, step)  # step for step, bit for bit
    assert got["final_val_loss"] == want["final_val_loss"] and got["steps"] == steps


def _smoke_bindings(gin_file: str) -> list[str]:
  """The `--gin.NAME=VALUE` overrides of a gin file's 'Smoke mode' header lines, shell quoting removed."""
  import shlex
  header = []
  for line in open(gin_file):
    if not line.startswith("#"):
      break
    header.append(line[1:].strip())
  text = " ".join(header)
  assert "Smoke mode" in text, f"{gin_file}: its header names no smoke mode"
  words = shlex.split(text[text.index("Smoke mode"):])
  return [w[len("--gin."):] for w in words if w.startswith("--gin.")]


BUDGETED = [("ablation_cpu", "experiment"), ("ablation_cpu_4m", "experiment"), ("infinite_memory_cpu", "experiment"),
            ("infinite_memory_cpu_4m", "experiment"), ("wsd_validation_cpu", "sweep")]


@pytest.mark.parametrize("smoke", [False, True], ids=["as_committed", "smoke_mode"])
@pytest.mark.parametrize("gin_file,kind", BUDGETED)
def test_committed_budgets_fit_their_runs(gin_file, kind, smoke):
  """Every committed experiment with budgets passes the runner's check, as committed and with its header's smoke-mode
  overrides (a bad one would fail only after launch)."""
  from engram_jax import cli, configurables
  entry, name = (cli.EXPERIMENT, "experiment") if kind == "experiment" else (cli.SWEEP, "sparsity_allocation")
  path = f"configs/experiments/{gin_file}.gin"
  bindings = _smoke_bindings(path) if smoke else []
  exp, run, _ = configurables.resolve(name, [path], bindings, entry=entry)
  assert exp.budgets and tb.check_budgets(exp.budgets, run) == tuple(sorted(exp.budgets))
  if smoke:
    assert run.steps == 20
