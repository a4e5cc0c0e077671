"""Eval and training say how many validation batches their losses used, and eval says whether they are the same."""

import json

from engram_jax import eval as eval_lib
from engram_jax.run_config import EvalConfig


def test_eval_and_result_json_name_their_validation_batches(straight, tmp_path, capsys):
  model_dir, result = straight
  saved = json.loads((model_dir / "result.json").read_text())
  assert saved["val_batches"] == result["val_batches"] == 2  # tiny_run: eval_batches=2

  same = eval_lib.evaluate(model_dir, output_dir=tmp_path)
  line = capsys.readouterr().out
  assert same["val_batches"] == same["training_val_batches"] == 2 and same["same_validation_as_training"]
  assert same["val_loss"] == result["final_val_loss"]
  assert "over 2 batches" in line and "the same 2 validation batches as training's" in line

  fewer = eval_lib.evaluate(model_dir, EvalConfig(eval_batches=1), output_dir=tmp_path)
  line = capsys.readouterr().out
  assert fewer["val_batches"] == 1 and fewer["training_val_batches"] == 2
  assert not fewer["same_validation_as_training"] and fewer["val_loss"] != result["final_val_loss"]
  assert "over 1 batches" in line and "val_batches 2 -> 1" in line and "differ by design" in line
  written = json.loads((tmp_path / f"eval_step{same['step']}.json").read_text())
  assert written["training_val_batches"] == 2 and written["same_validation_as_training"] is False
