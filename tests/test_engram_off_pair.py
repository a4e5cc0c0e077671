"""evals.engram_off_pair end to end on the tiny model (toy corpus mixed with synthetic facts, fake benchmark wheel):
the report's numbers are the suites' own, the differences are paired over the same probes, a rerun trains and
scores nothing and keeps the hand-written reading, and a config without Engram fails before anything is written."""

import dataclasses
import json

import numpy as np
import pytest

import fake_olmo_eval  # tests/ is on sys.path
from evals import engram_off_pair
from task_registry import registered_tasks_removed
from tiny_run import STEPS, tiny_model, tiny_run

PAIR = engram_off_pair.PairConfig(seeds=(0,), tasks=("facts_closed", "arc_easy", "lambada"), limit=6, batch_size=4,
                                  analysis_rows=2, gate_text="the cat sat on a mat")


@pytest.fixture(scope="module")
def pair_run(corpus, tmp_path_factory):
  mp = pytest.MonkeyPatch()
  fake_olmo_eval.install(mp, tmp_path_factory.mktemp("eval_cache"))
  import evals.mixtures  # noqa: F401 (registers the engram_corpus_facts_<P> mixtures)
  out = tmp_path_factory.mktemp("pair")
  run = tiny_run(corpus, task="engram_corpus_facts_30", steps=STEPS)
  with registered_tasks_removed():  # the mixture points at this corpus; other tests register it over theirs
    results = engram_off_pair.run_pair(PAIR, tiny_model(), run, str(out), log=lambda s: None)
    yield out, run, results
  mp.undo()


def test_report_holds_the_suites_numbers_and_paired_differences(pair_run):
  out, _, results = pair_run
  on_off = json.loads((out / "seed0" / "engram_moe" / "evals" / "engram_off.json").read_text())
  moe = json.loads((out / "seed0" / "moe" / "evals" / "standard.json").read_text())
  rows = results["per_seed"]["0"]
  for name in PAIR.tasks:
    t, tm, r = on_off["tasks"][name], moe["tasks"][name], rows[name]
    p = t["primary"]
    assert r["on"] == t["metrics"][p] and r["off"] == t["engram_off"][p] and r["moe"] == tm["metrics"][p]
    # paired over the same documents: the mean difference is the difference of the means
    assert r["off_minus_on"]["value"] == pytest.approx(r["off"]["value"] - r["on"]["value"], abs=1e-9)
    assert r["engram_minus_moe"]["value"] == pytest.approx(r["on"]["value"] - r["moe"]["value"], abs=1e-9)
    d = np.asarray(t["per_doc"][p]) - np.asarray(tm["per_doc"][p])
    assert r["engram_minus_moe"]["stderr"] == pytest.approx(np.std(d, ddof=1) / np.sqrt(d.size))
  mean = results["mean"]["facts_closed"]
  assert mean["seeds"] == 1 and mean["on"] == rows["facts_closed"]["on"]["value"]
  assert mean["off_minus_on_seed_std"] is None  # one seed
  assert set(results["val_loss"]["0"]) == {"engram_moe", "moe"}
  records = {n: json.loads((out / "seed0" / n / "run_record.json").read_text()) for n in ("engram_moe", "moe")}
  assert records["engram_moe"]["model_config"]["engram_layers"] == [1]
  assert records["moe"]["model_config"]["engram_layers"] == [] and records["moe"]["model_config"]["engram"] is None
  assert results["analysis"]["0"]["cka_diagonal"][0] == pytest.approx(1.0, abs=1e-3)  # both embed the same tokens
  assert (out / "engram_off.png").stat().st_size > 1000 and (out / "seed0" / "analysis" / "cka.png").is_file()
  assert "| facts_closed | knowledge | acc |" in (out / "README.md").read_text()


def test_rerun_trains_and_scores_nothing_and_keeps_the_hand_reading(pair_run):
  out, run, first = pair_run
  with open(out / "README.md", "a") as f:
    f.write("\n## Reading (by hand, today)\n\nA person's words.\n")
  again = engram_off_pair.run_pair(PAIR, tiny_model(), run, str(out), log=lambda s: None)
  assert again["train_wall_s"] == 0.0 and again["eval_wall_s"] == 0.0
  assert again["mean"] == json.loads(json.dumps(first["mean"]))
  assert (out / "README.md").read_text().count("A person's words.") == 1


def test_a_model_without_engram_or_a_task_without_facts_fails_before_anything_is_written(corpus, tmp_path):
  no_engram = dataclasses.replace(tiny_model(), engram_layers=(), engram=None)
  with pytest.raises(ValueError, match=r"no Engram layers \(ModelConfig.engram_layers"):
    engram_off_pair.run_pair(PAIR, no_engram, tiny_run(corpus, task="engram_corpus_facts_30"), str(tmp_path / "a"))
  with pytest.raises(ValueError, match=r"RunConfig.task='engram_corpus_en'.*engram_corpus_facts_<P>"):
    engram_off_pair.run_pair(PAIR, tiny_model(), tiny_run(corpus, task="engram_corpus_en"), str(tmp_path / "b"))
  assert not list(tmp_path.iterdir())
  with pytest.raises(ValueError, match="PairConfig.seeds"):
    engram_off_pair.PairConfig(seeds=(1, 1))
