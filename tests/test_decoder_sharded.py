"""The sharded decoder (8 fake CPU devices) equals the single-device decoder in loss, logits and gradients."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from engram_jax import sharding
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
    grad_fn = jax.value_and_grad(lambda p: _loss_fn(nnx.merge(graphdef, p, rest), tokens, segment_ids), has_aux=True)
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
