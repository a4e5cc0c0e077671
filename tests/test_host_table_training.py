"""Training with Engram tables in host memory (engram_jax.host_training, engram_jax.host_optim): the numpy table
update follows the device update, host-table training follows device-table training over 10 steps, stop-and-resume
is bit-exact, a host-trained run directory loads like any other, and configurations that cannot work fail early."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from engram_jax import checkpoint as ckpt_lib
from engram_jax import host_optim, host_training, optim, sharding, sparse_tables, steps
from test_sparse_tables import CFG, ENGRAM, _batch, _on  # tests/ is on sys.path (the tiny one-block model)

HOST_CFG = dataclasses.replace(CFG, engram=dataclasses.replace(ENGRAM, table_placement="host"))
TABLE = ("blocks", 0, "engram", "table")
N = 10
# XLA:CPU contracts a * b + c into one fused multiply-add and divides by a broadcast scalar through its reciprocal;
# numpy rounds every operation. The two updates agree to ~1 ulp per step (measured), hence these tolerances.
RTOL, ATOL = 2e-6, 1e-7


def _opt(kind):
  return optim.OptimizerConfig(learning_rate=1e-2, warmup_steps=3, table_optimizer=kind, grad_clip_norm=0.5)


def _mesh():
  return sharding.make_mesh("data=1", jax.devices()[:1])


# ------------------------------------------------------------------------------------------------ the update


@pytest.mark.parametrize("kind", host_optim.HOST_OPTIMIZERS)
def test_host_update_equals_the_device_update(kind):
  """host_optim.apply on (unique ids, summed gradients) == sparse_tables.apply_rows (adam_lazy, adagrad_rowwise)
  or optax.sgd on the dense gradient (sgd), over three steps; untouched rows keep their values and state."""
  rng = np.random.default_rng(0)
  v, d, b1, b2, eps = 64, 8, 0.9, 0.95, 1e-8
  table = rng.normal(size=(v, d)).astype(np.float32)
  host_table, host_state = table.copy(), host_optim.init_state(kind, table)
  dev_table = jnp.asarray(table)
  dev_state = sparse_tables.init_state(kind, dev_table) if kind != "sgd" else optax.sgd(0.1).init(dev_table)
  touched = np.zeros(v, bool)
  for step in range(3):
    ids = np.unique(rng.integers(0, v, 20)).astype(np.int32)
    touched[ids] = True
    g = rng.normal(size=(ids.size, d)).astype(np.float32)
    lr = np.float32(0.05 * (step + 1))
    t = np.float32(step + 1)
    scalars = host_optim.StepScalars(np.float32(-lr), np.float32(1 - b1 ** t), np.float32(1 - b2 ** t))
    host_optim.apply(kind, host_table, host_state, ids, g, scalars, b1=b1, b2=b2, eps=eps)
    host_optim.finish_step(host_state)
    if kind == "sgd":
      dense = jnp.zeros((v, d)).at[ids].set(g)
      upd, dev_state = optax.sgd(float(lr)).update(dense, dev_state)
      dev_table = optax.apply_updates(dev_table, upd)
    else:
      grad = sparse_tables.RowGrads(jnp.asarray(ids)[None], jnp.asarray(g)[None])
      dev_table, dev_state = sparse_tables.apply_rows(kind, dev_table, dev_state, grad, jnp.float32(lr), b1=b1,
                                                      b2=b2, eps=eps)
  np.testing.assert_allclose(host_table, np.asarray(dev_table), rtol=RTOL, atol=ATOL)
  np.testing.assert_array_equal(host_table[~touched], table[~touched])
  assert int(host_state["count"]) == 3
  for k in set(host_state) - {"count"}:
    np.testing.assert_allclose(host_state[k], np.asarray(dev_state[k]), rtol=RTOL, atol=1e-12)
    assert not host_state[k][~touched].any()


def test_update_applied_in_parts_equals_one_update():
  """Rows update independently: applying a step's rows in two parts (as training does) gives the same bits."""
  rng = np.random.default_rng(1)
  table = rng.normal(size=(32, 4)).astype(np.float32)
  ids = np.arange(0, 32, 3, dtype=np.int32)
  g = rng.normal(size=(ids.size, 4)).astype(np.float32)
  scalars = host_optim.StepScalars(np.float32(-0.1), np.float32(0.1), np.float32(0.05))
  out = []
  for parts in ([slice(None)], [slice(0, 4), slice(4, None)]):
    t, s = table.copy(), host_optim.init_state("adam_lazy", table)
    for p in parts:
      host_optim.apply("adam_lazy", t, s, ids[p], g[p], scalars, b1=0.9, b2=0.95, eps=1e-8)
    out.append((t, s["moments"]))
  for a, b in zip(*out):
    np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------------------------ training


def _device_run(kind, n):
  setup = steps.make_setup(CFG, _opt(kind), 20, _mesh())
  state, losses = setup.init(jnp.int32(0)), []
  for i in range(n):
    state, metrics = setup.train_step(state, _on(_mesh(), _batch(i)))
    losses.append(float(metrics["loss"]))
  return state, losses


def _host_run(kind, n, state=None, first=0):
  setup = host_training.make_host_setup(HOST_CFG, _opt(kind), 20, _mesh())
  state = setup.init(jnp.int32(0)) if state is None else setup.adopt(state)
  feed = setup.feed(iter([_batch(i) for i in range(first, first + n)]))
  losses = []
  for _ in range(n):
    state, metrics = setup.train_step(state, next(feed))
    losses.append(float(metrics["loss"]))
  setup.close()
  return state, losses, setup


class _Runs(dict):
  def __missing__(self, kind):  # each optimizer's 10 host steps, computed on first use
    self[kind] = _host_run(kind, N)
    return self[kind]


@pytest.fixture(scope="module")
def host_runs():
  return _Runs()


# Compilation dominates (4 setups); the CI default runs adam_lazy, adagrad_rowwise shares the path (-m slow).
@pytest.mark.parametrize("kind", ["adam_lazy", pytest.param("adagrad_rowwise", marks=pytest.mark.slow)])
def test_host_table_training_equals_device_table_training(host_runs, kind):
  """10 steps: same losses, same table rows and table optimizer state, same backbone; part of every update
  was applied while the next step ran (the rows the next batch did not read)."""
  dev, dev_losses = _device_run(kind, N)
  host, host_losses, setup = host_runs[kind]
  np.testing.assert_allclose(host_losses, dev_losses, rtol=1e-6)
  np.testing.assert_allclose(sparse_tables.get_path(host["params"], TABLE),
                             np.asarray(sparse_tables.get_path(dev["params"], TABLE)), rtol=RTOL, atol=2e-6)
  dev_state = sparse_tables.get_path(dev["opt"]["tables"], TABLE)
  host_state = sparse_tables.get_path(host["opt"]["tables"], TABLE)
  assert set(host_state) == set(dev_state) and int(host_state["count"]) == int(dev_state["count"]) == N
  for k in set(dev_state) - {"count"}:  # moments near 0 (cancelling gradients): an absolute tolerance
    want = np.asarray(dev_state[k])
    np.testing.assert_allclose(host_state[k], want, rtol=1e-4, atol=1e-3 * np.abs(want).max())
  for a, b in zip(jax.tree.leaves(sparse_tables.without(host["params"], [TABLE])),
                  jax.tree.leaves(sparse_tables.without(dev["params"], [TABLE]))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  t = setup.times
  assert t.steps == N and 0 < t.rows_updated_main < t.rows_updated  # both halves of the split update ran


def test_host_stop_and_resume_is_bit_exact(host_runs, tmp_path):
  """4 steps, checkpoint (host tables saved with the state), restore, 6 more == 10 straight steps, every leaf."""
  first, _, setup = _host_run("adam_lazy", 4)
  ckpt = ckpt_lib.Checkpointer(tmp_path)
  ckpt.save(4, setup.checkpoint_state(first, 4), {"position": 0})
  ckpt.wait()
  restored, _ = ckpt.restore(4, setup.abstract)
  ckpt.close()
  resumed, _, _ = _host_run("adam_lazy", N - 4, restored, first=4)
  straight = host_runs["adam_lazy"][0]
  assert jax.tree.structure(resumed) == jax.tree.structure(straight)
  for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_host_checkpoint_is_the_device_row_sparse_layout(host_runs, tmp_path):
  """A host-table checkpoint restores into device-resident row-sparse training (same tree, same values), so
  load_model / eval / decode read it as any other run."""
  state, _, setup = host_runs["adam_lazy"]
  dev_setup = steps.make_setup(CFG, _opt("adam_lazy"), 20, _mesh())
  ckpt = ckpt_lib.Checkpointer(tmp_path)
  ckpt.save(N, setup.checkpoint_state(state, N), {"position": 0})
  ckpt.wait()
  restored, _ = ckpt.restore(N, dev_setup.abstract)
  ckpt.close()
  np.testing.assert_array_equal(np.asarray(sparse_tables.get_path(restored["params"], TABLE)),
                                sparse_tables.get_path(state["params"], TABLE))
  np.testing.assert_array_equal(np.asarray(sparse_tables.get_path(restored["opt"]["tables"], TABLE)["moments"]),
                                sparse_tables.get_path(state["opt"]["tables"], TABLE)["moments"])


# ------------------------------------------------------------------------------------------------ bad config


def test_adam_dense_with_host_tables_is_refused():
  with pytest.raises(ValueError, match=r"table_optimizer='adam_dense' with EngramConfig.table_placement='host'"):
    host_training.check_config(HOST_CFG, _opt("adam_dense"), _mesh())


def test_host_tables_on_a_mesh_and_inloop_evals_are_refused():
  with pytest.raises(ValueError, match=r"RunConfig.mesh='data=1'"):
    host_training.check_config(HOST_CFG, _opt("adam_lazy"), sharding.make_mesh("data=8"))
  with pytest.raises(ValueError, match="inloop_tasks"):
    host_training.check_config(HOST_CFG, _opt("adam_lazy"), _mesh(), inloop_tasks=("arc_easy",))


def test_train_refuses_host_adam_dense_before_writing(tmp_path):
  from engram_jax import train
  from engram_jax.run_config import RunConfig
  run = RunConfig(steps=2, batch_size=8, seq_len=16, data_dir=str(tmp_path / "no_corpus"), optimizer=_opt("adam_dense"))
  with pytest.raises(ValueError, match="table_optimizer='adam_dense'"):
    train.train_and_evaluate(HOST_CFG, run, tmp_path / "run")
  assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_train_and_evaluate_with_host_tables_resumes_and_loads(corpus, tmp_path):
  """train_and_evaluate with host tables: stop half way and resume; the checkpoints verify and load_model
  reads the host-trained tables (the decode engine then keeps them on the host, the record's placement)."""
  from engram_jax import run_dir, train
  from tiny_run import STEPS, tiny_model, tiny_run
  cfg = tiny_model()
  cfg = dataclasses.replace(cfg, engram=dataclasses.replace(cfg.engram, table_placement="host"))
  run = dataclasses.replace(tiny_run(corpus), mesh="data=1", optimizer=dataclasses.replace(tiny_run(corpus).optimizer,
                                                                             table_optimizer="adam_lazy"))
  first = train.train_and_evaluate(cfg, dataclasses.replace(run, stop_after=STEPS // 2), tmp_path)
  second = train.train_and_evaluate(cfg, run, tmp_path)
  assert first["steps"] == STEPS // 2 and second["start_step"] == STEPS // 2 and second["steps"] == STEPS
  vals = dict(second["val_curve"])
  assert np.isfinite(vals[STEPS]) and vals[STEPS] < vals[0]
  model, record = run_dir.load_model(tmp_path)
  assert record.step == STEPS and record.model_config.engram.table_placement == "host"
  setup = host_training.make_host_setup(cfg, run.optimizer, STEPS, sharding.make_mesh("data=1", jax.devices()[:1]),
                                        record.compression)
  saved, _ = ckpt_lib.Checkpointer(tmp_path / "checkpoints").restore(STEPS, setup.abstract)
  setup.close()
  np.testing.assert_array_equal(np.asarray(model.blocks[1].engram.table[...]),
                                np.asarray(sparse_tables.get_path(saved["params"], ("blocks", 1, "engram", "table"))))
