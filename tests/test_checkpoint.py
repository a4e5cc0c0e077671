"""Checkpoints: bit-exact round trip of a full train state onto another mesh, the model-config guard, keep-N, and
that an unfinished (temporary) step directory is never picked for resume."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engram_jax import checkpoint as ckpt_lib
from engram_jax import optim, sharding, steps
from engram_jax.layers.engram_config import EngramConfig
from engram_jax.layers.moe_config import MoEConfig
from engram_jax.models.config import ModelConfig

CONFIG = ModelConfig(vocab_size=64, d_model=16, num_layers=2, num_heads=2, num_kv_heads=2, head_dim=8,
                     dense_hidden=32, num_dense_layers=1,
                     moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=16, dispatch="capacity"),
                     engram_layers=(1,), engram=EngramConfig(heads_per_order=2, head_dim=4, table_base_sizes=(31, 37)))
OPT = optim.OptimizerConfig()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """A full train state (params, Adam moments of both groups, MoE biases, step, rng) saved at steps 1..3."""
  directory = tmp_path_factory.mktemp("ckpt")
  setup = steps.make_setup(CONFIG, OPT, 10, sharding.make_mesh("data=8"))
  state = setup.init(jnp.int32(0))
  # Make every leaf distinctive (moments and biases are zero at init).
  state = jax.tree.map(lambda x: x + jnp.asarray(np.random.default_rng(x.size).normal(size=x.shape), x.dtype)
                       if jnp.issubdtype(x.dtype, jnp.floating) else x + 3, state)
  ckpt = ckpt_lib.Checkpointer(directory, max_to_keep=2)
  for step in (1, 2, 3):
    ckpt.save(step, state, {"epoch": 0, "index": step})
  ckpt.close()
  return directory, jax.device_get(state)


def test_keeps_the_last_n_and_restores_bit_exactly_onto_another_mesh(saved):
  directory, state = saved
  ckpt = ckpt_lib.Checkpointer(directory, max_to_keep=2)
  assert ckpt.all_steps() == [2, 3] and ckpt.latest_step() == 3
  mesh = sharding.make_mesh("data=2,expert=2,model=2")
  target = steps.make_setup(CONFIG, OPT, 10, mesh).abstract
  restored, data = ckpt.restore(3, target)
  assert data == {"epoch": 0, "index": 3}
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for got, want, abstract in zip(jax.tree.leaves(restored), jax.tree.leaves(state), jax.tree.leaves(target)):
    np.testing.assert_array_equal(np.asarray(got), want)
    assert got.sharding == abstract.sharding
  table = restored["params"]["blocks"][1]["engram"]["table"]
  assert table.sharding.spec[0] == ("data", "expert", "model")  # rows sharded over every device of the new mesh


def test_unfinished_step_directory_is_ignored(saved, tmp_path):
  """A save that crashed before orbax's final rename leaves '<step>.orbax-checkpoint-tmp-*': never resumed from."""
  directory, _ = saved
  copy = tmp_path / "ckpt"
  shutil.copytree(directory, copy)
  shutil.copytree(copy / "3", copy / "9.orbax-checkpoint-tmp-1234567")
  assert ckpt_lib.Checkpointer(copy).latest_step() == 3


def test_model_config_guard(tmp_path):
  ckpt = ckpt_lib.Checkpointer(tmp_path)
  ckpt.check_model_config(CONFIG)
  assert json.loads((tmp_path / ckpt_lib.CONFIG_FILE).read_text())["moe"]["num_experts"] == 4
  ckpt.check_model_config(CONFIG)  # same config: fine
  # Compute-only fields may change between runs of the same parameters.
  import dataclasses
  ckpt.check_model_config(dataclasses.replace(CONFIG, compute_dtype="bfloat16", remat=True))
  other = dataclasses.replace(CONFIG, d_model=32, engram=dataclasses.replace(CONFIG.engram, head_dim=8))
  with pytest.raises(ValueError) as e:
    ckpt.check_model_config(other)
  msg = str(e.value)
  assert "d_model: 16 -> 32" in msg and "engram.head_dim: 4 -> 8" in msg and "new model_dir (MODEL_DIR)" in msg
  assert "compute_dtype" not in msg


def test_config_differences_lists_only_changed_structural_fields():
  a = {"d_model": 8, "moe": {"num_experts": 4, "dispatch": "dropless"}, "compute_dtype": "float32"}
  b = {"d_model": 8, "moe": {"num_experts": 6, "dispatch": "capacity"}, "compute_dtype": "bfloat16"}
  assert ckpt_lib.config_differences(a, b) == ["moe.num_experts: 4 -> 6"]
  assert ckpt_lib.config_differences(a, {**a, "moe": None}) == ["moe: <absent> -> None",
                                                                "moe.num_experts: 4 -> <absent>"]
