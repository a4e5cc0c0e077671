"""Warmup-stable-decay schedule (against a NumPy reference) and cooldown branches: a branch from a WSD run's
checkpoint at step k starts from exactly that state, equals a straight WSD run to its own length step for step,
resumes, and never writes to the source directory.

Letters: none (no arrays are shaped here beyond flat parameter leaves).
"""

import hashlib
import os

import jax
import numpy as np
import pytest

from engram_jax import branch, optim, run_dir, sharding, steps, train
from engram_jax import checkpoint as ckpt_lib
from tiny_run import tiny_model, tiny_run  # tests/ is on sys.path (pytest rootdir-relative import)


def wsd_reference(t, peak, warmup, total, cooldown, min_ratio):
  """NumPy twin of the documented formula."""
  t = np.asarray(t, np.float64)
  warm = peak * np.minimum((t + 1) / max(warmup, 1), 1.0)
  frac = np.clip((t - (total - cooldown) + 1) / cooldown, 0.0, 1.0)
  return np.where(t < warmup, warm, peak * (1 - (1 - min_ratio) * frac))


@pytest.mark.parametrize("warmup,total,decay_steps,fraction,min_ratio", [
    (10, 100, 20, 0.2, 0.0), (0, 50, None, 0.1, 0.1), (5, 40, 35, 0.2, 0.0), (3, 30, None, 0.5, 0.5), (0, 20, None, 1.0, 0.0)])
def test_wsd_schedule_matches_numpy(warmup, total, decay_steps, fraction, min_ratio):
  cfg = optim.OptimizerConfig(learning_rate=2e-3, warmup_steps=warmup, min_lr_ratio=min_ratio, schedule="wsd",
                              decay_steps=decay_steps, decay_fraction=fraction)
  cooldown = decay_steps if decay_steps is not None else max(1, round(fraction * total))
  assert optim.cooldown_steps(cfg, total) == cooldown
  t = np.arange(total + 5)
  got = np.asarray(optim.learning_rate_schedule(cfg, total)(t))
  np.testing.assert_allclose(got, wsd_reference(t, 2e-3, warmup, total, cooldown, min_ratio), rtol=1e-5)
  assert got[total - 1] == pytest.approx(min_ratio * 2e-3, abs=1e-9)  # the last update is at the floor
  if total - cooldown > warmup:
    assert got[total - cooldown - 1] == pytest.approx(2e-3)  # still at the peak right before the cooldown


def test_wsd_stable_phase_does_not_depend_on_the_run_length():
  cfg = optim.OptimizerConfig(learning_rate=1e-3, warmup_steps=5, schedule="wsd", decay_steps=10)
  short, long = (np.asarray(optim.learning_rate_schedule(cfg, n)(np.arange(40))) for n in (40, 400))
  np.testing.assert_array_equal(short[:30], long[:30])
  assert short[35] < long[35]


def test_bad_wsd_settings_name_the_field():
  with pytest.raises(ValueError, match="schedule='linear'"):
    optim.OptimizerConfig(schedule="linear")
  with pytest.raises(ValueError, match="decay_fraction"):
    optim.OptimizerConfig(schedule="wsd", decay_fraction=0.0)
  with pytest.raises(ValueError, match="cooldown"):
    optim.learning_rate_schedule(optim.OptimizerConfig(schedule="wsd", warmup_steps=10, decay_steps=8), 15)
  with pytest.raises(ValueError, match="init_from"):
    tiny_run("/tmp", init_step=4)
  with pytest.raises(ValueError, match="init_step=12"):
    tiny_run("/tmp", init_from="/tmp/x", init_step=12)


# ------------------------------------------------------------------------------------------------ branches

WSD = optim.OptimizerConfig(learning_rate=3e-3, warmup_steps=2, schedule="wsd", decay_steps=3, min_lr_ratio=0.0)


def wsd_run(corpus, steps_, **kw):
  return tiny_run(corpus, steps=steps_, optimizer=WSD, eval_every=2, checkpoint_every=4, keep_checkpoints=3, **kw)


def snapshot(directory):
  """{relative path: (size, mtime_ns, sha256)} of every file under `directory`."""
  out = {}
  for root, _, files in os.walk(directory):
    for f in files:
      p = os.path.join(root, f)
      st = os.stat(p)
      out[os.path.relpath(p, directory)] = (st.st_size, st.st_mtime_ns, hashlib.sha256(open(p, "rb").read()).digest())
  return out


@pytest.fixture(scope="module")
def source(corpus, tmp_path_factory):
  """A 12-step WSD run checkpointed at 4, 8, 12 (its cooldown: steps 9..11)."""
  d = tmp_path_factory.mktemp("wsd_source")
  return d, train.train_and_evaluate(tiny_model(), wsd_run(corpus, 12), d)


@pytest.mark.slow  # four tiny training runs: ~2 min on 2 free cores
def test_branch_equals_straight_run_and_leaves_the_source_untouched(corpus, source, tmp_path):
  src_dir, src_result = source
  before = snapshot(src_dir)
  straight = train.train_and_evaluate(tiny_model(), wsd_run(corpus, 8), tmp_path / "straight")
  # The branch: from the source's step 4, cooldown over its own last 3 steps (5..7), to 8 steps, resumed once.
  b_dir = tmp_path / "branch"
  first = train.train_and_evaluate(tiny_model(), wsd_run(corpus, 8, init_from=str(src_dir), init_step=4,
                                                         stop_after=6), b_dir)
  assert first["start_step"] == 4 and first["steps"] == 6
  # Its starting point is the source's state at step 4: the same validation loss, logged as the branch's anchor.
  assert dict(first["val_curve"])[4] == dict(src_result["val_curve"])[4]
  done = train.train_and_evaluate(tiny_model(), wsd_run(corpus, 8, init_from=str(src_dir), init_step=4), b_dir)
  assert done["start_step"] == 6 and done["steps"] == 8  # resumed from the branch's own checkpoint
  # Step for step the branch is the straight 8-step WSD run (same data position, same learning rates).
  straight_train = dict(straight["train_curve"])
  for step, loss in done["train_curve"]:
    assert loss == straight_train[step], step
  assert done["final_val_loss"] == straight["final_val_loss"]
  assert snapshot(src_dir) == before  # the source is only read
  setup = steps.make_setup(tiny_model(), WSD, 8, sharding.make_mesh("data=-1"), run_dir.read_record(b_dir).compression)
  a, _ = ckpt_lib.Checkpointer(tmp_path / "straight" / "checkpoints").restore(8, setup.abstract)
  b, _ = ckpt_lib.Checkpointer(b_dir / "checkpoints").restore(8, setup.abstract)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_branch_restores_the_source_checkpoint_exactly(corpus, source):
  src_dir, _ = source
  before = snapshot(src_dir)
  run = wsd_run(corpus, 8, init_from=str(src_dir), init_step=4)
  setup = steps.make_setup(tiny_model(), WSD, 8, sharding.make_mesh("data=-1"),
                           run_dir.read_record(src_dir).compression)
  got, position = branch.restore_source(run, setup.abstract)
  assert snapshot(src_dir) == before  # the read-only restore wrote nothing there
  want, want_position = ckpt_lib.Checkpointer(src_dir / "checkpoints").restore(4, setup.abstract)
  assert position == want_position and int(got["step"]) == 4
  for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_branch_with_another_schedule_or_missing_step_is_refused_before_writing(corpus, source, tmp_path):
  src_dir, _ = source
  cosine = tiny_run(corpus, steps=8, init_from=str(src_dir), init_step=4)  # cosine decays from step 2 on
  with pytest.raises(ValueError, match="learning rate differs"):
    train.train_and_evaluate(tiny_model(), cosine, tmp_path / "a")
  with pytest.raises(ValueError, match=r"init_step=6: .* holds steps \[4, 8, 12\]"):
    train.train_and_evaluate(tiny_model(), wsd_run(corpus, 8, init_from=str(src_dir), init_step=6), tmp_path / "b")
  late = optim.OptimizerConfig(**{**WSD.__dict__, "decay_steps": 6})  # the branch's cooldown would start at 2 < 4
  with pytest.raises(ValueError, match="learning rate differs"):
    train.train_and_evaluate(tiny_model(), tiny_run(corpus, steps=8, optimizer=late, init_from=str(src_dir),
                                                    init_step=4), tmp_path / "c")
  with pytest.raises(ValueError, match="another model"):
    train.train_and_evaluate(tiny_model(d_model=48), wsd_run(corpus, 8, init_from=str(src_dir), init_step=4),
                             tmp_path / "d")
  assert not any((tmp_path / n).exists() for n in "abcd")
