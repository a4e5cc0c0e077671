"""The MoE implementations that must agree: the capacity path's slot rankings ('sorted', 'onehot': slots, outputs,
gradients, train losses) and the dropless grouped matmuls ('blocked', 'ragged_dot': outputs and gradients)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from engram_jax.layers import moe
from engram_jax.layers.moe_config import MoEConfig


def _np_slots(experts, mask, capacity):
  """The plain loop: (token, k) order, a counter per expert; masked tokens take no slot."""
  t, k = experts.shape
  used, slot, kept = {}, np.zeros((t, k), np.int32), np.zeros((t, k), bool)
  for i in range(t):
    for j in range(k):
      if not mask[i]:
        continue
      e = int(experts[i, j])
      slot[i, j] = used.get(e, 0)
      used[e] = slot[i, j] + 1
      kept[i, j] = slot[i, j] < capacity
  return slot, kept


@pytest.mark.parametrize("capacity", [1, 3, 40])
@pytest.mark.parametrize("num_experts", [3, 17])
def test_slots_match_the_loop(capacity, num_experts):
  rng = np.random.default_rng(capacity + num_experts)
  experts = np.stack([rng.choice(num_experts, 2, replace=False) for _ in range(50)]).astype(np.int32)  # [T, k]
  mask = rng.random(50) > 0.3
  want_slot, want_kept = _np_slots(experts, mask, capacity)
  for impl in moe.CAPACITY_IMPLS:
    slot, kept = moe.capacity_slots(jnp.asarray(experts), num_experts, capacity, jnp.asarray(mask), impl)
    np.testing.assert_array_equal(np.asarray(kept), want_kept, err_msg=impl)
    np.testing.assert_array_equal(np.asarray(slot)[mask], want_slot[mask], err_msg=impl)
    assert (np.asarray(slot)[~mask] == 0).all()


def test_unknown_impl_is_rejected():
  with pytest.raises(ValueError, match="capacity_impl"):
    moe.validate_moe_config(MoEConfig(capacity_impl="dense"))
  with pytest.raises(ValueError, match="dropless_impl"):
    moe.validate_moe_config(MoEConfig(dropless_impl="dense"))


@pytest.mark.parametrize("block_rows", [1, 4, 7, 128])
def test_blocked_dropless_equals_ragged_dot(block_rows):
  """Uneven groups (expert 5 of 6 gets no rows), blocks smaller and larger than groups: outputs and all grads."""
  t, k, e, d, f = 21, 2, 6, 8, 5
  rng = np.random.default_rng(block_rows)
  experts = jnp.asarray(np.stack([rng.choice(5, k, replace=False) for _ in range(t)]), jnp.int32)  # [T, k]
  keys = jax.random.split(jax.random.key(block_rows), 5)
  x = jax.random.normal(keys[0], (t, d))
  wts = jax.random.uniform(keys[1], (t, k))
  ws = (jax.random.normal(keys[2], (e, d, f)), jax.random.normal(keys[3], (e, d, f)),
        jax.random.normal(keys[4], (e, f, d)))

  def run(impl):
    fn = lambda *a: jnp.sum(jnp.sin(moe.dropless_experts(a[0], a[1], experts, *a[2:], impl=impl,
                                                         block_rows=block_rows)))
    return jax.jit(jax.value_and_grad(fn, argnums=tuple(range(5))))(x, wts, *ws)

  (la, ga), (lb, gb) = run("blocked"), run("ragged_dot")
  np.testing.assert_allclose(float(la), float(lb), rtol=1e-5)
  for u, v in zip(ga, gb):  # float reassociation only: tolerance relative to each gradient's scale
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-4, atol=1e-5 * float(np.abs(v).max()))


def test_module_outputs_and_grads_agree_with_drops_and_padding():
  cfg = MoEConfig(num_experts=6, top_k=2, expert_hidden=16, dispatch="capacity", capacity_factor=0.7)
  x = jax.random.normal(jax.random.key(0), (3, 20, 24))  # [B, S, D]
  mask = jnp.arange(20)[None, :] < jnp.array([[20], [13], [5]])  # [B, S] padded rows

  def run(impl):
    module = moe.MoE(dataclasses.replace(cfg, capacity_impl=impl), 24, rngs=nnx.Rngs(3))

    def loss(m, v):
      y, metrics = m(v, mask)
      return jnp.sum(jnp.sin(y)), metrics

    (l, metrics), (g_m, g_x) = nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True))(module, x)
    return l, metrics, nnx.to_pure_dict(nnx.state(g_m, nnx.Param)), g_x

  a, b = run("sorted"), run("onehot")
  assert float(a[1]["dropped"]) > 0  # the capacity binds
  assert float(a[1]["dropped"]) == float(b[1]["dropped"])
  # Same slots -> the same arithmetic in the same order: equal to the last bit.
  np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
  np.testing.assert_array_equal(np.asarray(a[3]), np.asarray(b[3]))
  for u, v in zip(jax.tree.leaves(a[2]), jax.tree.leaves(b[2])):
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


@pytest.mark.slow  # compiles the whole train step twice (~4 min on a loaded 2-core machine)
@pytest.mark.parametrize("dispatch,field,impls", [("capacity", "capacity_impl", moe.CAPACITY_IMPLS),
                                                   ("dropless", "dropless_impl", moe.DROPLESS_IMPLS)])
def test_train_steps_give_equal_losses(dispatch, field, impls):
  """Three real train steps of a small MoE model with either implementation: capacity rankings give identical
  losses (same slots, same arithmetic); the dropless matmuls agree within float reassociation (rtol 1e-5)."""
  from engram_jax import sharding, steps
  from engram_jax.models.config import ModelConfig
  from engram_jax.optim import OptimizerConfig

  base = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
                     dense_hidden=64, num_dense_layers=1,
                     moe=MoEConfig(num_experts=8, top_k=2, expert_hidden=16, dispatch=dispatch,
                                   capacity_factor=1.0))
  rng = np.random.default_rng(0)
  batch = {"targets": rng.integers(3, 64, (4, 32)).astype(np.int32),
           "segment_ids": np.repeat(np.array([[1] * 20 + [2] * 8 + [0] * 4]), 4, 0).astype(np.int32)}
  batch["positions"] = np.asarray(
      np.concatenate([np.arange(20), np.arange(8), np.zeros(4)])[None].repeat(4, 0), np.int32)
  mesh = sharding.make_mesh("data=1", jax.devices()[:1])
  losses = {}
  for impl in impls:
    cfg = dataclasses.replace(base, moe=dataclasses.replace(base.moe, **{field: impl}))
    setup = steps.make_setup(cfg, OptimizerConfig(learning_rate=1e-2, warmup_steps=1), 10, mesh)
    state = setup.init(jnp.int32(0))
    out = []
    for _ in range(3):
      state, m = setup.train_step(state, batch)
      out.append(float(m["loss"]))
    losses[impl] = out
  a, b = (losses[i] for i in impls)
  if dispatch == "capacity":
    assert a == b
  else:
    np.testing.assert_allclose(a, b, rtol=1e-5)
  assert a[2] != a[0]  # the steps train
