"""The sharded decoder (8 fake CPU devices) equals the single-device decoder in loss, logits and gradients;
no collective of the sharded step grows with the Engram table."""

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from engram_jax import sharding
from engram_jax.layers.engram_config import EngramConfig
from engram_jax.layers.moe_config import MoEConfig
from engram_jax.models.config import ModelConfig
from engram_jax.models.decoder import Decoder

V, B, S = 64, 8, 8
# One dense and one MoE layer, two branches; capacity_factor = E / k gives every expert room for all local tokens,
# so the expert-parallel capacity path must equal the single-device result exactly (up to float reassociation).
CFG = ModelConfig(vocab_size=V, d_model=16, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=4, dense_hidden=32,
                  hc_expansion=2, moe=MoEConfig(num_experts=4, num_shared_experts=1, top_k=2, expert_hidden=8,
                                                dispatch="capacity", capacity_factor=2.0, seq_aux_loss_coef=0.01))
RTOL, ATOL = 1e-4, 1e-5  # float32; only the reduction order differs between the meshes


def _loss_fn(model, tokens, segment_ids):
  logits, aux = model(tokens, segment_ids)
  nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, tokens[..., None], -1)[..., 0]
  return jnp.mean(nll) + aux["moe_aux_loss"], (logits, aux)


def _step(model, tokens, segment_ids):
  """Jitted loss, logits, aux and parameter gradients."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  @jax.jit
  def f(params, rest, tokens, segment_ids):
    # copy=True: fresh Variables at this trace level (Engram records nnx.Intermediate values during the call).
    merge = lambda p: nnx.merge(graphdef, p, rest, copy=True)
    grad_fn = jax.value_and_grad(lambda p: _loss_fn(merge(p), tokens, segment_ids), has_aux=True)
    return grad_fn(params)

  return f, (params, rest, tokens, segment_ids)


@pytest.fixture(scope="module")
def batch():
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, V, (B, S)), jnp.int32)
  pos = np.arange(S)
  lengths = rng.integers(3, S + 1, (B, 1))  # tokens before the padding
  segment_ids = jnp.asarray(np.where(pos < lengths, 1 + (pos >= 4), 0), jnp.int32)  # [1 1 1 1 2 2 0 0]-like rows
  return tokens, segment_ids


@pytest.fixture(scope="module")
def reference(batch):
  f, args = _step(Decoder(CFG, rngs=nnx.Rngs(0)), *batch)
  return f(*args)


@pytest.mark.parametrize("spec", ["data=8", "data=2,expert=4", "data=2,expert=2,model=2"])
def test_sharded_forward_and_grads_equal_single_device(batch, reference, spec):
  mesh = sharding.make_mesh(spec)
  model = sharding.shard_module(Decoder(CFG, mesh, rngs=nnx.Rngs(0)), mesh)
  tokens, segment_ids = (jax.device_put(x, sharding.batch_sharding(mesh)) for x in batch)
  f, args = _step(model, tokens, segment_ids)
  (loss, (logits, aux)), grads = f(*args)
  (loss0, (logits0, aux0)), grads0 = reference
  np.testing.assert_allclose(float(loss), float(loss0), rtol=RTOL)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(logits0), rtol=RTOL, atol=ATOL)
  for key in aux0:
    np.testing.assert_allclose(np.asarray(aux[key]), np.asarray(aux0[key]), rtol=RTOL, atol=1e-7)
  assert float(aux["dropped_fraction"]) == 0.0
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=RTOL, atol=ATOL),
               grads, grads0)
  # The parameters really are sharded as the rules say, and experts are exchanged with all-to-all.
  w_gate = model.blocks[1].ffn.w_gate[...]
  assert w_gate.sharding.spec == sharding.logical_to_spec(("experts", "embed", "expert_mlp"), mesh=mesh)
  assert ("all_to_all" in f.lower(*args).as_text()) == (mesh.shape["expert"] > 1)


def test_sharded_capacity_path_reports_drops_when_capacity_is_small(batch):
  mesh = sharding.make_mesh("data=2,expert=4")
  cfg = dataclasses.replace(CFG, moe=dataclasses.replace(CFG.moe, capacity_factor=0.25))
  model = sharding.shard_module(Decoder(cfg, mesh, rngs=nnx.Rngs(0)), mesh)
  _, aux = nnx.jit(lambda m, t, s: m(t, s))(model, *batch)
  assert 0.0 < float(aux["dropped_fraction"]) < 1.0


_COLLECTIVE = re.compile(r"= (.+?) (all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(?:-start)?\(")
_SHAPE = re.compile(r"[a-z]+[0-9]*\[([0-9,]*)\]")


def _collectives(hlo: str) -> list[tuple[str, tuple[int, ...]]]:
  """(op, element count of each result shape) for every collective in compiled HLO text, sorted."""
  out = []
  for shapes, op in _COLLECTIVE.findall(hlo):
    for dims in _SHAPE.findall(shapes):
      out.append((op, math.prod(int(d) for d in dims.split(",") if d)))
  return sorted(out)


@pytest.mark.parametrize("lookup", ["take", "shard_map"])
def test_no_collective_grows_with_the_engram_table(batch, lookup):
  """Compile the sharded loss + gradient with two table sizes (x4 rows): the collectives must be the same ops
  on the same shapes, and none as large as the table's row count."""
  mesh = sharding.make_mesh("data=2,expert=2,model=2")
  tokens, segment_ids = (jax.device_put(x, sharding.batch_sharding(mesh)) for x in batch)
  found, rows = [], []
  for base in ((1009, 1013), (4001, 4003)):
    engram = EngramConfig(heads_per_order=2, head_dim=4, table_base_sizes=base, num_branches=2, lookup=lookup,
                          table_row_multiple=8)
    cfg = dataclasses.replace(CFG, num_layers=1, engram_layers=(0,), engram=engram)  # dense: compiles faster
    model = sharding.shard_module(Decoder(cfg, mesh, rngs=nnx.Rngs(0)), mesh)
    rows.append(model.blocks[0].engram.num_rows)
    f, args = _step(model, tokens, segment_ids)
    found.append(_collectives(f.lower(*args).compile().as_text()))
  assert rows[1] > 3 * rows[0]
  assert found[0], "expected some collectives on a sharded mesh"
  assert found[0] == found[1]
  assert max(n for _, n in found[1]) < rows[0], found[1]


def test_collective_detector_flags_an_unpinned_table_gradient():
  """Control for the test above: the gradient of a plain GSPMD take, its sharding left free, is all-reduced at
  full table size (ENV_NOTES), and `_collectives` sees it."""
  mesh = sharding.make_mesh("data=2,expert=2,model=2")
  rows = 4096
  table = jax.device_put(jnp.ones((rows, 4)), jax.NamedSharding(mesh, jax.P(("data", "expert", "model"), None)))
  ids = jax.device_put(jnp.arange(64, dtype=jnp.int32).reshape(8, 8) * 61 % rows, sharding.batch_sharding(mesh))
  grad = jax.jit(jax.grad(lambda t, i: jnp.sum(jnp.take(t, i, axis=0) ** 2)))
  assert max(n for _, n in _collectives(grad.lower(table, ids).compile().as_text())) >= rows
