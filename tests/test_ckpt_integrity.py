"""Checkpoint integrity: every step carries a checksum manifest; a truncated, deleted or bit-flipped file in the
latest step is reported by path and the previous good step is used (the bad one moved aside, never deleted);
eval refuses a corrupt step with the same message."""

import json
import shutil

import jax
import numpy as np
import pytest

from engram_jax import checkpoint as ckpt_lib
from engram_jax import ckpt_integrity, run_dir, sharding, steps, train
from tiny_run import STEPS, tiny_model, tiny_run  # tests/ is on sys.path (pytest rootdir-relative import)


def _copy(straight, tmp_path):
  model_dir = tmp_path / "run"
  shutil.copytree(straight[0], model_dir)
  return model_dir


def _largest_state_file(step_dir):
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file()]
  return max(files, key=lambda p: p.stat().st_size)


def _abstract(model_dir):
  return steps.make_setup(tiny_model(), tiny_run(None).optimizer, STEPS, sharding.make_mesh("data=-1"),
                          run_dir.read_record(model_dir).compression).abstract


def test_every_step_has_a_manifest_of_its_files(straight):
  step_dir = straight[0] / "checkpoints" / str(STEPS)
  manifest = json.loads((step_dir / ckpt_integrity.MANIFEST).read_text())
  files = {str(p.relative_to(step_dir)) for p in step_dir.rglob("*") if p.is_file()} - {ckpt_integrity.MANIFEST}
  assert manifest["step"] == STEPS and set(manifest["files"]) == files
  assert any(name.startswith("data") for name in files) and ckpt_integrity.problems(step_dir) == []


def test_truncated_latest_step_falls_back_and_the_resumed_run_equals_the_straight_one(straight, corpus, tmp_path,
                                                                                    capsys):
  model_dir = _copy(straight, tmp_path)
  victim = _largest_state_file(model_dir / "checkpoints" / "12")
  victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
  result = train.train_and_evaluate(tiny_model(), tiny_run(corpus), model_dir)
  out = capsys.readouterr().out
  assert f"{victim}: " in out and "truncated" in out and "resumed from step 6" in out
  assert result["start_step"] == 6 and result["steps"] == STEPS
  assert result["train_curve"] == straight[1]["train_curve"] and result["val_curve"] == straight[1]["val_curve"]
  assert (model_dir / "checkpoints" / "12.corrupt").is_dir()  # kept for inspection
  assert ckpt_lib.finished_steps(model_dir / "checkpoints") == [6, 12]


@pytest.mark.parametrize("damage", ["delete", "flip_64_bytes", "delete_unverified"])
def test_damaged_latest_step_is_named_and_the_previous_one_restored(straight, tmp_path, damage):
  model_dir = _copy(straight, tmp_path)
  step_dir = model_dir / "checkpoints" / "12"
  victim = _largest_state_file(step_dir)
  if damage == "flip_64_bytes":
    data = bytearray(victim.read_bytes())
    data[-80:-16] = bytes(b ^ 0xFF for b in data[-80:-16])
    victim.write_bytes(bytes(data))
  else:
    victim.unlink()
  if damage == "delete_unverified":  # a step without manifest (older version): orbax's own error is caught
    (step_dir / ckpt_integrity.MANIFEST).unlink()
  logs = []
  ckpt = ckpt_lib.Checkpointer(model_dir / "checkpoints")
  state, data, step = ckpt.restore_latest(_abstract(model_dir), log=logs.append)
  ckpt.close()
  assert step == 6
  assert str(step_dir) in logs[0] and "moved to" in logs[0] and "resuming from step 6" in logs[1]
  if damage != "delete_unverified":
    assert f"{victim}: " + ("missing" if damage == "delete" else "sha256 differs") in logs[0]
  good = ckpt_lib.Checkpointer(straight[0] / "checkpoints")
  want, want_data = good.restore(6, _abstract(model_dir))
  good.close()
  assert data == want_data
  for a, b in zip(*(map(np.asarray, jax.tree.leaves(t)) for t in (state, want))):
    np.testing.assert_array_equal(a, b)


def test_eval_and_load_model_refuse_a_corrupt_step_naming_it(straight, tmp_path):
  from engram_jax import eval as eval_lib
  model_dir = _copy(straight, tmp_path)
  victim = _largest_state_file(model_dir / "checkpoints" / "12")
  victim.write_bytes(victim.read_bytes()[:10])
  with pytest.raises(ckpt_integrity.CorruptCheckpointError, match=r"(?s)checkpoints/12 is corrupt:.*truncated.*"
                                                                   r"Fix: pass an earlier step, e\.g\. .*checkpoints/6"):
    eval_lib.evaluate(model_dir)
  assert (model_dir / "checkpoints" / "12").is_dir()  # eval never moves or deletes anything
  model, record = run_dir.load_model(model_dir / "checkpoints" / "6")
  assert record.step == 6
