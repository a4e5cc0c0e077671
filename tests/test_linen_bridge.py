"""The Linen Engram module equals the NNX layer (outputs, gradients) and carries the same logical axis names."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.linen import partitioning as nn_partitioning
from jax.sharding import PartitionSpec

from engram_jax import hashing, linen, sharding
from engram_jax.layers.engram import build_engram_layers
from engram_jax.layers.engram_config import EngramConfig

CFG = EngramConfig(max_ngram=3, heads_per_order=2, head_dim=4, table_base_sizes=(31, 37), num_branches=2, seed=5,
                   table_row_multiple=16, projection_bias=True, gate_norm_eps=1e-7, conv_norm_eps=1e-5)
D, V_RAW, LAYERS = 8, 40, (1, 4)
COMP = (np.arange(V_RAW) % 25).astype(np.int32)
SPECS = hashing.make_hash_specs(max_ngram=3, heads_per_order=2, table_base_sizes=(31, 37), seed=5, hash_bits=32,
                                layer_ids=list(LAYERS), vocab_size=25, pad_id=0)  # as build_engram_layers makes them


@pytest.fixture(scope="module")
def pair():
  """An NNX layer with every parameter random, and the Linen module with the same spec and those parameters."""
  layer = build_engram_layers(CFG, LAYERS, D, COMP, rngs=nnx.Rngs(0))[4]
  rng = np.random.default_rng(0)
  for name in ("conv_weight", "gate_norm_h", "gate_norm_k", "conv_norm", "value_bias", "key_bias"):
    var = getattr(layer, name)
    var.set_value(jnp.asarray(rng.normal(size=var[...].shape) * 0.5 + ("norm" in name), jnp.float32))
  module = linen.Engram(CFG, D, COMP, layer_id=4, hash_spec=SPECS[4])
  h, ids, seg = _inputs()
  variables = module.init(jax.random.key(1), h, ids, seg)
  return layer, module, linen.replace_params(variables, linen.params_from_nnx(layer))


def _inputs(b=2, s=12, seed=0):
  rng = np.random.default_rng(seed)
  h = jnp.asarray(rng.normal(size=(b, s, CFG.num_branches, D)), jnp.float32)
  ids = jnp.asarray(rng.integers(0, V_RAW, (b, s)), jnp.int32)
  seg = np.ones((b, s), np.int32)
  seg[::2, 5:] = 2  # every other row packs two documents
  return h, ids, jnp.asarray(seg)


def test_linen_output_and_gate_equal_nnx(pair):
  layer, module, variables = pair
  h, ids, seg = _inputs(seed=1)
  want = layer(h, ids, seg)
  got, state = jax.jit(lambda v: module.apply(v, h, ids, seg, mutable=["intermediates"]))(variables)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(np.asarray(state["intermediates"]["gate_mean"][0]), np.asarray(layer.last_gate[...]),
                             rtol=1e-6)
  host = hashing.hash_ngrams_np(COMP[np.asarray(ids)], np.asarray(seg), layer.spec)
  np.testing.assert_allclose(np.asarray(module.apply(variables, h, ids, seg, hash_ids=jnp.asarray(host))),
                             np.asarray(want), rtol=1e-6, atol=1e-7)


def test_linen_gradients_equal_nnx(pair):
  layer, module, variables = pair
  h, ids, seg = _inputs(seed=2)

  def nnx_loss(m, h):
    return jnp.sum(jnp.sin(m(h, ids, seg)))

  def linen_loss(params, h):
    return jnp.sum(jnp.sin(module.apply(linen.replace_params(variables, params), h, ids, seg)))

  g_state, g_h = nnx.grad(nnx_loss, argnums=(0, 1))(layer, h)
  g_nnx = ({name: g_state[name][...] for name in linen.param_axes(CFG)}, g_h)
  g_linen = jax.grad(linen_loss, argnums=(0, 1))(linen.params_from_nnx(layer), h)
  assert set(g_nnx[0]) == set(g_linen[0]) == set(linen.param_axes(CFG))
  for name in g_nnx[0]:
    np.testing.assert_allclose(np.asarray(g_linen[0][name]), np.asarray(g_nnx[0][name]), rtol=1e-5, atol=1e-6,
                               err_msg=name)
    assert np.abs(np.asarray(g_nnx[0][name])).max() > 0, name
  np.testing.assert_allclose(np.asarray(g_linen[1]), np.asarray(g_nnx[1]), rtol=1e-5, atol=1e-6)


def test_linen_params_carry_the_logical_axis_names(pair):
  layer, module, variables = pair
  specs = nn.get_partition_spec(variables)["params"]
  for name, axes in linen.param_axes(CFG).items():
    assert specs[name] == PartitionSpec(*axes), name
    assert tuple(getattr(layer, name).get_metadata()["out_sharding"]) == axes, name  # same names as NNX
  mesh = sharding.make_mesh("data=2,expert=2,model=2")
  shardings = nn.logical_to_mesh_sharding(specs, mesh, list(sharding.DEFAULT_RULES))
  assert shardings["table"].spec == PartitionSpec(("data", "expert", "model"), None)
  # flaxformer style: the names go to the 'params_axes' collection that T5X reads.
  styled = linen.Engram(CFG, D, COMP, layer_id=4, hash_spec=SPECS[4], axes_style="params_axes")
  h, ids, seg = _inputs()
  v = styled.init(jax.random.key(0), h, ids, seg)
  assert v["params_axes"]["table_axes"] == nn_partitioning.AxisMetadata(names=("table_rows", "table_dim"))
  assert nn_partitioning.get_axis_names(v["params_axes"])["key_proj"] == PartitionSpec("branches", None, "embed")
  assert v["params"]["table"].shape == layer.table[...].shape
  with pytest.raises(ValueError, match="axes_style"):
    linen.Engram(CFG, D, COMP, axes_style="t5x").init(jax.random.key(0), h, ids, seg)


def test_linen_on_a_mesh_with_params_placed_by_their_axis_names(pair):
  """Placed T5X-style (logical names -> rules -> mesh), the sharded module gives the unsharded output."""
  layer, _, variables = pair
  mesh = sharding.make_mesh("data=2,expert=2,model=2")
  cfg = dataclasses.replace(CFG, lookup="shard_map")
  module = linen.Engram(cfg, D, COMP, layer_id=4, hash_spec=SPECS[4], mesh=mesh)
  h, ids, seg = _inputs(b=8, seed=3)
  abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), h, ids, seg))
  shard = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, list(sharding.DEFAULT_RULES))
  table = np.zeros(abstract["params"]["table"].value.shape, np.float32)
  table[:layer.table[...].shape[0]] = np.asarray(layer.table[...])  # the mesh pads the table to 8 shards
  params = {**linen.params_from_nnx(layer), "table": table}
  placed = jax.device_put(linen.replace_params(abstract, params), shard)
  got = jax.jit(lambda v: module.apply(v, h, ids, seg))(placed)
  np.testing.assert_allclose(np.asarray(got), np.asarray(layer(h, ids, seg)), rtol=1e-5, atol=1e-6)


def test_docs_linen_example_runs():
  """docs/linen.md's small Linen decoder with an Engram layer trains as written."""
  text = (Path(__file__).resolve().parents[1] / "docs" / "linen.md").read_text()
  code = "\n".join(re.findall(r"```python\n(.*?)```", text, flags=re.S))
  scope: dict = {}
  exec(compile(code, "docs/linen.md", "exec"), scope)
  losses = scope["losses"]
  assert np.isfinite(losses).all() and losses[-1] < losses[0]
