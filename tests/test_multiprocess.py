"""Two JAX processes (2 CPU devices each, one job through jax.distributed): a run stopped and resumed equals the
uninterrupted one, because each process saves and restores its own data position. Slow (three 2-process jobs)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from engram_jax import run_dir
from tiny_run import cli_flags  # tests/ is on sys.path (pytest rootdir-relative import)

REPO = Path(__file__).resolve().parent.parent


def _launch(model_dir, corpus, logs, *extra):
  cmd = [sys.executable, "launch/multiprocess.py", "--num_processes=2", "--devices_per_process=2",
         f"--log_dir={logs}", "--", *cli_flags(model_dir, corpus), "--gin.TRAIN_STEPS=6",
         "--gin.RunConfig.mesh='data=2,expert=2'", "--gin.MoEConfig.dispatch='capacity'",
         "--gin.RunConfig.checkpoint_every=3", "--gin.RunConfig.eval_every=3", "--gin.RunConfig.log_every=1",
         "--gin.RunConfig.eval_batches=2", *extra]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run(cmd, env=env, cwd=REPO, timeout=900, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return json.loads((Path(model_dir) / "result.json").read_text()), proc.stdout


@pytest.mark.slow
def test_two_process_stop_and_resume_equals_the_straight_run(corpus, tmp_path):
  straight, _ = _launch(tmp_path / "straight", corpus, tmp_path / "logs0")
  first, _ = _launch(tmp_path / "resumed", corpus, tmp_path / "logs1", "--gin.RunConfig.stop_after=3")
  resumed, out = _launch(tmp_path / "resumed", corpus, tmp_path / "logs2")
  assert first["steps"] == 3 and "resumed from step 3" in out and resumed["start_step"] == 3
  assert resumed["train_curve"] == straight["train_curve"] and resumed["val_curve"] == straight["val_curve"]
  # orbax writes the JSON item from process 0 only: it holds every process's own position
  data = json.loads((tmp_path / "resumed" / "checkpoints" / "3" / "data" / "metadata").read_text())
  assert len(data["processes"]) == 2
  a, _ = run_dir.load_model(tmp_path / "straight")
  b, _ = run_dir.load_model(tmp_path / "resumed")
  from flax import nnx
  for x, y in zip(*(jax.tree.leaves(nnx.state(m, nnx.Param)) for m in (a, b))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
