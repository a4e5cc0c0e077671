"""Parameter groups: Engram tables (only they) under their own optimizer at 5x lr and no weight decay; the schedule;
global-norm clipping across groups; optimizer-state shardings."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from engram_jax import optim, sharding
from engram_jax.layers.engram import EngramTable
from engram_jax.layers.engram_config import EngramConfig
from engram_jax.layers.moe_config import MoEConfig
from engram_jax.models.config import ModelConfig
from engram_jax.models.decoder import Decoder

CONFIG = ModelConfig(vocab_size=64, d_model=16, num_layers=3, num_heads=2, num_kv_heads=1, head_dim=8,
                     dense_hidden=32, num_dense_layers=1, moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=16),
                     engram_layers=(0, 2), engram=EngramConfig(heads_per_order=2, head_dim=4,
                                                               table_base_sizes=(31, 37)))


@pytest.fixture(scope="module")
def model_state():
  """(nnx.Param state with Variable leaves, pure params) of a small Engram+MoE decoder with two Engram layers."""
  model = Decoder(CONFIG, rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  return params, nnx.to_pure_dict(params)


def flat(tree):
  return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_labels_select_exactly_the_engram_tables(model_state):
  params, pure = model_state
  labels = flat(optim.param_labels(params))
  tables = {jax.tree_util.keystr(tuple(jax.tree_util.DictKey(k) for k in path))
            for path, var in nnx.to_flat_state(params) if type(var) is EngramTable}
  assert len(tables) == 2  # one per Engram layer
  assert {k for k, v in labels.items() if v == optim.TABLE} == tables
  assert all(v == optim.BACKBONE for k, v in labels.items() if k not in tables)
  assert all("engram" in k and k.endswith("['table']") for k in tables)
  sizes = optim.group_sizes(optim.param_labels(params), pure)
  assert sizes[optim.TABLE] == sum(np.size(v) for k, v in flat(pure).items() if k in tables)
  assert sizes[optim.BACKBONE] + sizes[optim.TABLE] == sum(np.size(v) for v in jax.tree.leaves(pure))


def test_tables_get_no_weight_decay_and_five_times_the_learning_rate(model_state):
  params, pure = model_state
  labels = optim.param_labels(params)
  cfg = optim.OptimizerConfig(learning_rate=0.01, warmup_steps=0, weight_decay=0.1, grad_clip_norm=0.0)
  tx = optim.make_optimizer(cfg, total_steps=10, labels=labels)
  lr = 0.01  # step 0 of a cosine without warmup is the peak
  is_table = {k: v == optim.TABLE for k, v in flat(labels).items()}

  # Zero gradient: Adam's moment term is 0, so only decoupled weight decay moves a parameter.
  zeros = jax.tree.map(jnp.zeros_like, pure)
  updates, _ = tx.update(zeros, tx.init(pure), pure)
  for k, u in flat(updates).items():
    p = flat(pure)[k]
    expected = np.zeros_like(p) if is_table[k] or p.ndim < 2 else -lr * 0.1 * np.asarray(p)
    np.testing.assert_allclose(u, expected, rtol=1e-6, atol=1e-9, err_msg=k)

  # A unit gradient: Adam's first step is lr * g / (|g| + eps) ~ lr; tables move 5x as far (and decay nothing).
  ones = jax.tree.map(jnp.ones_like, pure)
  updates, _ = tx.update(ones, tx.init(pure), pure)
  for k, u in flat(updates).items():
    p = np.asarray(flat(pure)[k])
    decay = 0.0 if is_table[k] or p.ndim < 2 else 0.1 * p
    step = (5 * lr if is_table[k] else lr) / (1 + 1e-8)
    np.testing.assert_allclose(u, -step - lr * decay, rtol=1e-5, err_msg=k)


def test_schedule_matches_warmup_cosine_formula():
  cfg = optim.OptimizerConfig(learning_rate=2e-3, warmup_steps=10, min_lr_ratio=0.1)
  total = 110
  sched = optim.learning_rate_schedule(cfg, total)
  for t in [0, 4, 9, 10, 30, 60, 109, 200]:
    if t < 10:
      ref = 2e-3 * (t + 1) / 10
    else:
      frac = min((t - 10) / (total - 1 - 10), 1.0)
      ref = 2e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
    np.testing.assert_allclose(float(sched(t)), ref, rtol=1e-5, err_msg=str(t))
  assert float(sched(109)) == pytest.approx(2e-4)


def test_clipping_is_global_across_groups(model_state):
  """With SGD on the tables, a table's update shrinks when the BACKBONE gradient grows: the norm is global."""
  params, pure = model_state
  labels = optim.param_labels(params)
  cfg = optim.OptimizerConfig(learning_rate=0.1, warmup_steps=0, grad_clip_norm=1.0, table_optimizer="sgd")
  tx = optim.make_optimizer(cfg, total_steps=10, labels=labels)
  is_table = flat(jax.tree.map(lambda l: l == optim.TABLE, labels))
  rng = np.random.default_rng(0)
  for backbone_scale in (0.0, 1.0, 10.0):
    grads = {k: rng.normal(size=np.shape(v)).astype(np.float32) * (1.0 if is_table[k] else backbone_scale)
             for k, v in flat(pure).items()}
    tree = jax.tree_util.tree_unflatten(jax.tree.structure(pure), [grads[k] for k in flat(pure)])
    total_norm = math.sqrt(sum(float(np.sum(g * g)) for g in grads.values()))
    scale = min(1.0, 1.0 / total_norm)
    updates, _ = tx.update(tree, tx.init(pure), pure)
    for k, u in flat(updates).items():
      if is_table[k]:
        np.testing.assert_allclose(u, -5 * 0.1 * scale * grads[k], rtol=1e-5, atol=1e-8)


def test_optimizer_moments_follow_parameter_shardings():
  mesh = sharding.make_mesh("data=2,expert=2,model=2")
  config = dataclasses.replace(CONFIG, num_kv_heads=2, moe=dataclasses.replace(CONFIG.moe, dispatch="capacity"))
  abstract = nnx.eval_shape(lambda: Decoder(config, mesh, rngs=nnx.Rngs(0)))
  params = nnx.state(abstract, nnx.Param)
  pure = nnx.to_pure_dict(params)
  labels = optim.param_labels(params)
  tx = optim.make_optimizer(optim.OptimizerConfig(), 10, labels)
  param_sh = nnx.to_pure_dict(sharding.state_shardings(params, mesh))
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  opt_sh = optim.opt_state_shardings(tx, pure, param_sh, rep)
  table_state = opt_sh[1].inner_states[optim.TABLE].inner_state[0]  # ScaleByAdamState of the table group
  for key, sh in flat(table_state.mu).items():
    assert sh == flat(param_sh)[key]
    assert sh.spec[0] == ("data", "expert", "model")  # rows over every device
  assert table_state.count == rep
  concrete = jax.jit(tx.init, out_shardings=opt_sh)(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), pure))
  mu = concrete[1].inner_states[optim.TABLE].inner_state[0].mu
  assert all(x.sharding == flat(param_sh)[k] for k, x in flat(mu).items())


@pytest.mark.parametrize("field,value,match", [
    ("learning_rate", 0.0, "learning_rate"),
    ("table_optimizer", "adagrad", "table_optimizer"),
    ("min_lr_ratio", 2.0, "min_lr_ratio"),
])
def test_bad_optimizer_config_names_the_field(field, value, match):
  with pytest.raises(ValueError, match=f"OptimizerConfig.{match}"):
    optim.OptimizerConfig(**{field: value})
