"""The non-finite guard: an inf on resume stops the run with the step, loss and parameter group named, a non-zero
exit status, no non-finite checkpoint and the last good one kept; 'skip_step' keeps the previous state."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engram_jax import checkpoint as ckpt_lib
from engram_jax import guard, run_dir, sharding, steps, train
from tiny_run import STEPS, cli_flags, tiny_model, tiny_run  # tests/ is on sys.path (pytest rootdir-relative import)


def _strict_json(path):
  def refuse(name):
    raise AssertionError(f"{path} holds a bare {name}")
  return json.loads(path.read_text(), parse_constant=refuse)


def test_inf_on_resume_stops_nonzero_and_keeps_the_last_good_checkpoint(straight, corpus, tmp_path, capsys):
  model_dir = tmp_path / "diverged"
  shutil.copytree(straight[0], model_dir)
  shutil.rmtree(model_dir / "checkpoints" / "12")
  record = run_dir.read_record(model_dir)
  setup = steps.make_setup(tiny_model(), tiny_run(corpus).optimizer, STEPS, sharding.make_mesh("data=-1"),
                           record.compression)
  ckpt = ckpt_lib.Checkpointer(model_dir / "checkpoints")
  state, data = ckpt.restore(6, setup.abstract)
  ckpt.close()
  shutil.rmtree(model_dir / "checkpoints" / "6")
  state["params"]["final_norm"]["scale"] = state["params"]["final_norm"]["scale"].at[0].set(jnp.inf)
  ckpt = ckpt_lib.Checkpointer(model_dir / "checkpoints", max_to_keep=1)
  ckpt.save(6, state, data)  # a good-looking checkpoint (valid manifest) whose state holds an inf
  ckpt.close()
  before = (model_dir / "checkpoints" / "6" / "engram_integrity.json").read_text()

  flags = cli_flags(model_dir, corpus) + ["--gin.RunConfig.checkpoint_every=1", "--gin.RunConfig.log_every=1",
                                          "--gin.RunConfig.keep_checkpoints=1"]
  with pytest.raises(SystemExit) as exit_info:
    train.main(flags)
  assert exit_info.value.code != 0
  err = capsys.readouterr().err
  assert "non-finite training step 7: loss nan" in err and "parameter group" in err and "'backbone'" in err
  assert "on_nonfinite='skip_step'" in err
  assert ckpt_lib.finished_steps(model_dir / "checkpoints") == [6]  # nothing saved after it, nothing evicted
  assert (model_dir / "checkpoints" / "6" / "engram_integrity.json").read_text() == before
  result = _strict_json(model_dir / "result.json")
  assert result["status"] == "stopped: non-finite" and result["last_good_checkpoint"] == 6 and "step 7" in result["error"]


def _toy_step(state, batch):
  """A stand-in update: params += batch, loss = sum(params); a NaN batch makes the step non-finite."""
  grads = {"w": batch}
  new = {"params": {"w": state["params"]["w"] + batch}, "opt": {"m": state["opt"]["m"] + 1.0},
         "rest": state["rest"], "step": state["step"] + 1, "rng": state["rng"]}
  metrics = {"loss": jnp.sum(new["params"]["w"]), "grad_norm": jnp.sqrt(jnp.sum(batch ** 2)),
             guard.LEAVES: guard.nonfinite_leaves(grads)}
  return new, metrics


def test_skip_step_keeps_the_previous_state_and_stop_mode_only_flags():
  state = {"params": {"w": jnp.ones(3)}, "opt": {"m": jnp.zeros(3)}, "rest": {}, "step": jnp.int32(4),
           "rng": jnp.zeros(2, jnp.uint32)}
  bad = jnp.array([1.0, jnp.nan, 0.0])
  skipped, m = jax.jit(guard.guarded(_toy_step, "skip_step"))(state, bad)
  assert not bool(m[guard.FINITE]) and np.asarray(m[guard.LEAVES]).tolist() == [True]
  np.testing.assert_array_equal(skipped["params"]["w"], np.ones(3))  # the update was not applied
  np.testing.assert_array_equal(skipped["opt"]["m"], np.zeros(3))
  assert int(skipped["step"]) == 5  # the step (and data) still advance
  good, m = jax.jit(guard.guarded(_toy_step, "skip_step"))(state, jnp.ones(3))
  assert bool(m[guard.FINITE]) and np.asarray(good["params"]["w"]).tolist() == [2.0, 2.0, 2.0]
  flagged, m = jax.jit(guard.guarded(_toy_step, "stop"))(state, bad)
  assert not bool(m[guard.FINITE]) and np.isnan(np.asarray(flagged["params"]["w"])[1])
  with pytest.raises(ValueError, match="RunConfig.on_nonfinite='halt'"):
    guard.guarded(_toy_step, "halt")


def test_describe_names_the_groups_and_parameters():
  params = {"embed": jnp.zeros(2), "blocks": [{"engram": {"table": jnp.zeros(2)}}, {"w": jnp.zeros(2)}]}
  labels = {"embed": "backbone", "blocks": [{"engram": {"table": "table"}}, {"w": "backbone"}]}
  flags = np.array([True, False, False])  # leaf order: blocks.0.engram.table, blocks.1.w, embed
  text = guard.describe(37, {"loss": np.float32(np.nan), "grad_norm": np.float32(np.inf), guard.LEAVES: flags},
                        params, labels)
  assert text == "step 37: loss nan, gradient norm inf; non-finite gradients in parameter group ['table'] " \
                 "(blocks.0.engram.table)"
  state = {"params": params, "step": jnp.int32(1)}
  state["params"]["blocks"][1]["w"] = jnp.array([0.0, jnp.inf])
  assert guard.bad_state_entries(state, guard.state_leaf_flags(state)) == ["params.blocks.1.w"]
