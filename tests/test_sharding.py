"""Mesh construction and logical-axis mapping."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from engram_jax import sharding


def test_parse_mesh_spec_fills_minus_one():
  assert sharding.parse_mesh_spec("data=2,expert=-1", 8) == {"data": 2, "expert": 4, "model": 1}
  assert sharding.parse_mesh_spec({"model": 2}, 2) == {"data": 1, "expert": 1, "model": 2}


@pytest.mark.parametrize("spec, match", [
    ("data=3", "uses 3 devices"), ("pipe=2", "unknown axes"), ("data=-1,model=-1", "at most one"), ("data", "axis=size"),
])
def test_parse_mesh_spec_errors_name_the_fix(spec, match):
  with pytest.raises(ValueError, match=match):
    sharding.parse_mesh_spec(spec, 8)


def test_logical_to_spec_drops_size_one_axes():
  mesh = sharding.make_mesh("data=2,expert=4")
  assert sharding.logical_to_spec(("table_rows", "table_dim"), mesh=mesh) == jax.P(("data", "expert"), None)
  assert sharding.logical_to_spec(("batch", None), mesh=mesh) == jax.P(("data", "expert"), None)
  assert sharding.logical_to_spec(("embed", "mlp"), mesh=mesh) == jax.P(None, None)


class _Toy(nnx.Module):

  def __init__(self):
    self.table = sharding.param(jnp.arange(16 * 4, dtype=jnp.float32).reshape(16, 4), "table_rows", "table_dim")
    self.w = sharding.param(jnp.ones((4, 8)), "embed", "mlp")


def test_shard_module_places_rows_on_all_devices_and_keeps_values():
  mesh = sharding.make_mesh("data=2,expert=2,model=2")
  toy = sharding.shard_module(_Toy(), mesh)
  table = toy.table[...]
  assert table.sharding.spec == jax.P(("data", "expert", "model"), None)
  assert len({s.device for s in table.addressable_shards}) == 8
  np.testing.assert_array_equal(np.asarray(table), np.arange(64).reshape(16, 4))
  assert toy.w[...].sharding.spec == jax.P(None, "model")
