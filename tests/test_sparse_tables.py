"""Row-sparse table gradients and the sparse table optimizers (engram_jax.sparse_tables): sparse gradients equal the
dense gradient on the touched rows, adam_lazy touching every row is dense Adam, adagrad_rowwise follows its NumPy
reference, the sharded sparse step equals the single-device one with collectives that do not grow with the table,
and stop-and-resume is bit-exact."""

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from engram_jax import checkpoint as ckpt_lib
from engram_jax import guard, optim, sharding, sparse_tables, steps
from engram_jax.layers.engram_config import EngramConfig
from engram_jax.losses import lm_terms, shift_right
from engram_jax.models.config import ModelConfig

B, S, V_TOK = 8, 16, 64
ENGRAM = EngramConfig(max_ngram=3, heads_per_order=2, head_dim=4, table_base_sizes=(31, 37), table_row_multiple=8,
                      lookup="shard_map")
# One block with Engram: small enough to compile in seconds; the table (~136 rows) is read 512 times per step,
# so rows repeat within a batch.
CFG = ModelConfig(vocab_size=V_TOK, d_model=16, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=8,
                  dense_hidden=32, engram_layers=(0,), engram=ENGRAM)


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  pos = np.arange(S)
  lengths = rng.integers(6, S + 1, (B, 1))
  seg = np.where(pos < lengths, 1 + (pos >= 8), 0).astype(np.int32)  # two documents, then padding
  targets = np.where(seg > 0, rng.integers(1, V_TOK, (B, S)), 0).astype(np.int32)
  positions = np.where(seg == 2, pos - 8, pos).astype(np.int32)
  return {"targets": targets, "segment_ids": seg, "positions": positions}


# ------------------------------------------------------------------------------------------------ pure pieces


def test_dedup_rows_sums_duplicates_like_numpy():
  rng = np.random.default_rng(1)
  fill = 50
  ids = rng.integers(0, 12, 40).astype(np.int32)
  ids[::7] = fill  # masked entries carry a zero gradient
  grads = rng.normal(size=(40, 3)).astype(np.float32)
  grads[ids == fill] = 0
  uids, sums = jax.jit(sparse_tables.dedup_rows, static_argnums=2)(jnp.asarray(ids), jnp.asarray(grads), fill)
  want_ids = np.unique(ids)
  want = np.zeros((fill + 1, 3), np.float32)
  np.add.at(want, ids, grads)
  np.testing.assert_array_equal(np.asarray(uids)[:want_ids.size], want_ids)
  assert (np.asarray(uids)[want_ids.size:] == fill).all()
  np.testing.assert_allclose(np.asarray(sums)[:want_ids.size], want[want_ids], rtol=1e-6, atol=1e-6)
  assert not np.asarray(sums)[want_ids.size:].any()


def _scatter(rg: sparse_tables.RowGrads, num_rows: int) -> np.ndarray:
  """RowGrads -> the dense [V, d] gradient it stands for (fill slots dropped)."""
  ids, g = np.asarray(rg.ids).reshape(-1), np.asarray(rg.grads).reshape(-1, rg.grads.shape[-1])
  out = np.zeros((num_rows + 1, g.shape[-1]), np.float32)
  np.add.at(out, np.minimum(ids, num_rows), g)
  return out[:num_rows]


def test_sparse_gradient_equals_dense_gradient_on_touched_rows():
  """Differentiating w.r.t. the gathered rows, then summing duplicates, gives the table gradient of the dense
  path; padding tokens touch no row (their rows' dense gradient is zero too)."""
  model = Decoder(CFG)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  batch = jax.tree.map(jnp.asarray, _batch())
  plan = sparse_tables.Plan.of(model, "adam_lazy", 0.9, 0.95, 1e-8, None)
  table = params["blocks"][0]["engram"]["table"][...]
  num_rows = table.shape[0]

  def loss(p, rows=None):
    nll, count, _ = lm_terms(nnx.merge(graphdef, p, rest, copy=True), batch, engram_rows=rows)
    return nll / count

  dense = np.asarray(jax.jit(jax.grad(loss))(params)["blocks"][0]["engram"]["table"][...])

  @jax.jit
  def sparse(p):
    inputs = shift_right(batch["targets"], batch["segment_ids"])
    ids, rows = plan.gather(nnx.merge(graphdef, p, rest, copy=True), inputs, batch["segment_ids"])
    g_rows = jax.grad(lambda r: loss(p, r))(rows)
    return ids, plan.row_grads(ids, g_rows, batch["segment_ids"] > 0, [table])[0]

  ids, rg = sparse(params)
  assert rg.ids.shape == (1, B * S * 4) and rg.grads.shape == (1, B * S * 4, ENGRAM.head_dim)  # H = 2 orders x 2
  touched = np.unique(np.asarray(ids[0])[np.asarray(batch["segment_ids"]) > 0])
  got_ids = np.asarray(rg.ids[0])
  np.testing.assert_array_equal(got_ids[got_ids < num_rows], touched)  # pads add no row of their own
  assert touched.size < (np.asarray(batch["segment_ids"]) > 0).sum() * 4  # duplicates were summed
  np.testing.assert_allclose(_scatter(rg, num_rows), dense, rtol=1e-5, atol=1e-7)
  assert not dense[np.setdiff1d(np.arange(num_rows), touched)].any()


def Decoder(cfg, mesh=None):
  from engram_jax.models.decoder import Decoder as _Decoder
  return _Decoder(cfg, mesh, rngs=nnx.Rngs(0))


def _row_grads_touching(v: int, d: int, m: int, rng, every_row: bool) -> tuple[np.ndarray, np.ndarray]:
  ids = rng.integers(0, v, m).astype(np.int32)
  if every_row:
    ids[:v] = np.arange(v)
  return ids, rng.normal(size=(m, d)).astype(np.float32)


def _apply(kind, table, state, ids, g, lr, keep=None, **hp):
  v = table.shape[0]
  uids, sums = sparse_tables.dedup_rows(jnp.asarray(ids), jnp.asarray(g), v)
  return sparse_tables.apply_rows(kind, table, state, sparse_tables.RowGrads(uids[None], sums[None]),
                                  jnp.float32(lr), keep=keep, **hp)


def test_adam_lazy_touching_every_row_equals_dense_adam_and_leaves_untouched_rows_alone():
  rng = np.random.default_rng(2)
  v, d, lr, hp = 12, 3, 0.05, dict(b1=0.9, b2=0.95, eps=1e-8)
  table = jnp.asarray(rng.normal(size=(v, d)), jnp.float32)
  tx = optax.adam(lr, **hp)
  dense, opt = table, tx.init(table)
  state = sparse_tables.init_state("adam_lazy", table)
  apply = jax.jit(lambda t, s, i, g: _apply("adam_lazy", t, s, i, g, lr, **hp))
  for _ in range(3):
    ids, g = _row_grads_touching(v, d, 30, rng, every_row=True)
    dense_g = jnp.zeros((v, d)).at[ids].add(g)
    upd, opt = tx.update(dense_g, opt, dense)
    dense = optax.apply_updates(dense, upd)
    table, state = apply(table, state, ids, g)
  np.testing.assert_allclose(np.asarray(table), np.asarray(dense), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(np.asarray(state["moments"][:, 0]), np.asarray(opt[0].mu), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(np.asarray(state["moments"][:, 1]), np.asarray(opt[0].nu), rtol=1e-6, atol=1e-8)
  # A step that touches rows 0..3 only: other rows and their moments stay as they were (LazyAdam).
  ids, g = rng.integers(0, 4, 10).astype(np.int32), rng.normal(size=(10, d)).astype(np.float32)
  new_table, new_state = apply(table, state, ids, g)
  np.testing.assert_array_equal(np.asarray(new_table)[4:], np.asarray(table)[4:])
  np.testing.assert_array_equal(np.asarray(new_state["moments"])[4:], np.asarray(state["moments"])[4:])
  assert not np.allclose(np.asarray(new_table)[:4], np.asarray(table)[:4])
  assert int(new_state["count"]) == 4


def test_adagrad_rowwise_equals_numpy_reference():
  rng = np.random.default_rng(3)
  v, d, eps = 10, 4, 1e-8
  table = rng.normal(size=(v, d)).astype(np.float32)
  ref_table, ref_acc = table.astype(np.float64), np.zeros(v)
  state = sparse_tables.init_state("adagrad_rowwise", jnp.asarray(table))
  got = jnp.asarray(table)
  for step, lr in enumerate((0.1, 0.05, 0.2)):
    ids, g = _row_grads_touching(v, d, 14, rng, every_row=False)
    got, state = jax.jit(lambda t, s, i, g, lr: _apply("adagrad_rowwise", t, s, i, g, lr, b1=0.9, b2=0.95, eps=eps)
                         )(got, state, ids, g, lr)
    summed = np.zeros((v, d))
    np.add.at(summed, ids, g)
    for r in np.unique(ids):  # the plain loop over touched rows
      ref_acc[r] += np.mean(summed[r] ** 2)
      ref_table[r] -= lr * summed[r] / (np.sqrt(ref_acc[r]) + eps)
  np.testing.assert_allclose(np.asarray(got), ref_table, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(state["acc"]), ref_acc, rtol=1e-5)
  assert state["acc"].shape == (v,) and int(state["count"]) == 3


def test_sparse_sgd_equals_dense_sgd():
  """Row-sparse SGD (touched rows only) equals optax SGD on the dense gradient, untouched rows bit-identical."""
  rng = np.random.default_rng(4)
  v, d = 20, 3
  table = jnp.asarray(rng.normal(size=(v, d)), jnp.float32)
  dense, state = table, sparse_tables.init_state("sgd", table)
  apply = jax.jit(lambda t, s, i, g, lr: _apply("sgd", t, s, i, g, lr, b1=0.9, b2=0.95, eps=1e-8))
  for lr in (0.1, 0.03):
    ids, g = _row_grads_touching(v, d, 12, rng, every_row=False)
    upd, _ = optax.sgd(lr).update(jnp.zeros((v, d)).at[ids].add(g), optax.sgd(lr).init(dense))
    before = table
    dense = optax.apply_updates(dense, upd)
    table, state = apply(table, state, ids, g, lr)
    untouched = np.setdiff1d(np.arange(v), ids)
    np.testing.assert_array_equal(np.asarray(table)[untouched], np.asarray(before)[untouched])
  np.testing.assert_allclose(np.asarray(table), np.asarray(dense), rtol=1e-6, atol=1e-7)
  assert set(state) == {"count"} and int(state["count"]) == 2


@pytest.mark.parametrize("kind", ["adam_lazy", "adagrad_rowwise", "sgd"])
def test_keep_false_leaves_table_and_state_bit_identical(kind):
  """apply_rows(keep=False) (a skipped step) returns every bit as it was, even with NaN gradients and -0.0 rows;
  keep=True is the plain update (within float rounding: XLA fuses a traced and a constant flag differently)."""
  rng = np.random.default_rng(5)
  v, d = 16, 4
  table = jnp.asarray(rng.normal(size=(v, d)), jnp.float32).at[3].set(-0.0)
  state = sparse_tables.init_state(kind, table)
  apply = jax.jit(lambda t, s, i, g, keep: _apply(kind, t, s, i, g, 0.1, b1=0.9, b2=0.95, eps=1e-8, keep=keep))
  ids, g = _row_grads_touching(v, d, 24, rng, every_row=True)
  table, state = apply(table, state, ids, g, True)  # a state that is not all zeros
  g_nan = g.copy()
  g_nan[0] = np.nan
  for grads in (g, g_nan):
    new_table, new_state = apply(table, state, ids, grads, False)
    np.testing.assert_array_equal(np.asarray(new_table).view(np.uint32), np.asarray(table).view(np.uint32))
    for k in state:
      np.testing.assert_array_equal(np.asarray(new_state[k]), np.asarray(state[k]))
  plain = jax.jit(lambda t, s, i, g: _apply(kind, t, s, i, g, 0.1, b1=0.9, b2=0.95, eps=1e-8))(table, state, ids, g)
  kept = apply(table, state, ids, g, True)
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(kept)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
  assert not np.array_equal(np.asarray(kept[0]), np.asarray(table))


def test_older_adam_lazy_state_layout_is_named():
  table = jnp.zeros((8, 2))
  old = {"mu": jnp.zeros((8, 2)), "nu": jnp.zeros((8, 2)), "count": jnp.zeros((), jnp.int32)}
  rg = sparse_tables.RowGrads(jnp.full((1, 4), 8, jnp.int32), jnp.zeros((1, 4, 2)))
  with pytest.raises(ValueError, match="'moments'.*new MODEL_DIR"):
    sparse_tables.apply_rows("adam_lazy", table, old, rg, jnp.float32(0.1), b1=0.9, b2=0.95, eps=1e-8)


def test_state_bytes_per_row():
  assert sparse_tables.state_bytes_per_row("adam_dense", 32) == sparse_tables.state_bytes_per_row("adam_lazy", 32)
  assert sparse_tables.state_bytes_per_row("adam_lazy", 32) == 2 * 32 * 4
  assert sparse_tables.state_bytes_per_row("adagrad_rowwise", 32) == 4
  with pytest.raises(ValueError, match="table optimizer 'lamb'"):
    sparse_tables.state_bytes_per_row("lamb", 32)


# ------------------------------------------------------------------------------------------------ train steps


def _setup(kind, mesh_spec="data=1", cfg=CFG):
  mesh = sharding.make_mesh(mesh_spec, jax.devices()[:1] if mesh_spec == "data=1" else None)
  opt = optim.OptimizerConfig(learning_rate=1e-2, warmup_steps=0, table_optimizer=kind, grad_clip_norm=0.5)
  return steps.make_setup(cfg, opt, 20, mesh), mesh


def _on(mesh, batch):
  return {k: jax.device_put(v, sharding.batch_sharding(mesh)) for k, v in batch.items()}


def _run(setup, mesh, n, state=None, first=0):
  state = setup.init(jnp.int32(0)) if state is None else state
  for i in range(first, first + n):
    state, metrics = setup.train_step(state, _on(mesh, _batch(i)))
  return state, metrics


@pytest.fixture(scope="module")
def single():
  """Two steps of each optimizer on one device."""
  return {kind: _run(*_setup(kind), 2) for kind in ("adam_dense", "adam_lazy", "adagrad_rowwise")}


def test_sparse_step_clips_and_trains_like_the_dense_step(single):
  """Same loss and gradient norm (clipped over both groups); the backbone sees the same clipped gradients, so
  with adam_lazy the non-table parameters stay close to adam_dense's (the tables' updates differ only on rows
  untouched in some step)."""
  (dense, m_dense), (lazy, m_lazy) = single["adam_dense"], single["adam_lazy"]
  np.testing.assert_allclose(float(m_lazy["loss"]), float(m_dense["loss"]), rtol=1e-3)
  np.testing.assert_allclose(float(m_lazy["grad_norm"]), float(m_dense["grad_norm"]), rtol=1e-3)
  assert set(lazy["opt"]) == {"backbone", "tables"}
  v, d = dense["params"]["blocks"][0]["engram"]["table"].shape
  assert lazy["opt"]["tables"]["blocks"][0]["engram"]["table"]["moments"].shape == (v, 2, d)
  grow = single["adagrad_rowwise"][0]["opt"]["tables"]["blocks"][0]["engram"]["table"]["acc"]
  assert grow.ndim == 1 and (np.asarray(grow) > 0).any()


# The CI default runs adam_lazy; adagrad_rowwise shares the sharded row path (run with -m slow).
@pytest.mark.parametrize("spec", ["data=8", "data=2,expert=2,model=2"])
@pytest.mark.parametrize("kind", ["adam_lazy", pytest.param("adagrad_rowwise", marks=pytest.mark.slow)])
def test_sharded_sparse_step_equals_single_device(single, spec, kind):
  setup, mesh = _setup(kind, spec)
  state, metrics = _run(setup, mesh, 2)
  want, want_metrics = single[kind]
  np.testing.assert_allclose(float(metrics["loss"]), float(want_metrics["loss"]), rtol=1e-5)
  table = state["params"]["blocks"][0]["engram"]["table"]
  assert len(table.sharding.device_set) == 8  # rows stay sharded over every device
  # Adam divides by sqrt(v): reassociated sums in the sharded gradients move tiny-gradient parameters by up to
  # ~1e-3 of a step (lr 1e-2), hence the absolute tolerance.
  for key in ("params", "opt"):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=5e-5),
                 state[key], want[key])


_COLLECTIVE = re.compile(r"= (.+?) (all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(?:-start)?\(")
_SHAPE = re.compile(r"[a-z]+[0-9]*\[([0-9,]*)\]")


def _collectives(hlo: str) -> list[tuple[str, int]]:
  out = []
  for shapes, op in _COLLECTIVE.findall(hlo):
    for dims in _SHAPE.findall(shapes):
      out.append((op, math.prod(int(d) for d in dims.split(",") if d)))
  return sorted(out)


@pytest.mark.parametrize("kind", ["adam_lazy", pytest.param("adagrad_rowwise", marks=pytest.mark.slow)])
def test_sparse_step_collectives_do_not_grow_with_the_table(kind):
  """The whole compiled train step on data=2,expert=2,model=2 with a table 4x larger: the same collectives on
  the same shapes, none as large as the table."""
  found, rows = [], []
  for base in ((1009, 1013), (4001, 4003)):
    cfg = dataclasses.replace(CFG, engram=dataclasses.replace(ENGRAM, table_base_sizes=base))
    setup, mesh = _setup(kind, "data=2,expert=2,model=2", cfg)
    rows.append(setup.abstract["params"]["blocks"][0]["engram"]["table"].shape[0])
    state = setup.abstract
    found.append(_collectives(setup.train_step.lower(state, _on(mesh, _batch())).compile().as_text()))
  assert rows[1] > 3.9 * rows[0]  # ~4.07k and ~16k rows
  assert found[0] and found[0] == found[1]
  assert max(n for _, n in found[1]) < rows[0], found[1]


@pytest.mark.parametrize("kind", [pytest.param("adam_dense", marks=pytest.mark.slow), "adam_lazy",
                                  pytest.param("adagrad_rowwise", marks=pytest.mark.slow)])
def test_stop_and_resume_is_bit_exact(single, kind, tmp_path):
  """Two steps, checkpoint, restore, two more == four straight steps (every leaf of params and optimizer state)."""
  setup, mesh = _setup(kind)
  first, _ = single[kind]
  ckpt = ckpt_lib.Checkpointer(tmp_path)
  ckpt.save(2, first, {"position": 0})
  ckpt.wait()
  restored, _ = ckpt.restore(2, setup.abstract)
  ckpt.close()
  resumed, _ = _run(setup, mesh, 2, restored, first=2)
  straight, _ = _run(setup, mesh, 4)
  for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sparse_optimizer_with_all_to_all_lookup_fails_before_compiling():
  cfg = dataclasses.replace(CFG, engram=dataclasses.replace(ENGRAM, lookup="all_to_all"))
  with pytest.raises(ValueError, match="lookup='all_to_all'"):
    _setup("adam_lazy", cfg=cfg)


def test_table_optimizer_names():
  assert optim.OptimizerConfig(table_optimizer="adam").table_optimizer == "adam_dense"  # older run directories
  with pytest.raises(ValueError, match="table_weight_decay must be 0 with table_optimizer='adam_lazy'"):
    optim.OptimizerConfig(table_optimizer="adam_lazy", table_weight_decay=0.1)
  with pytest.raises(ValueError, match="row-sparse"):
    optim.make_optimizer(optim.OptimizerConfig(table_optimizer="adagrad_rowwise"), 10, {})


def test_sparse_sgd_train_step_equals_dense_sgd_train_step():
  """Two train steps with table_optimizer='sgd' (row-sparse) == the same steps with optax SGD on the dense table
  gradient (within float reassociation of the summed row gradients); the sparse state is a count only."""
  setup, mesh = _setup("sgd")
  assert set(setup.abstract["opt"]["tables"]["blocks"][0]["engram"]["table"]) == {"count"}
  opt_cfg = optim.OptimizerConfig(learning_rate=1e-2, warmup_steps=0, table_optimizer="sgd", grad_clip_norm=0.5)
  tx = optim.make_optimizer(opt_cfg, 20, setup.labels)
  dense_step = jax.jit(steps.make_train_step(setup.graphdef, tx, None, optim.learning_rate_schedule(opt_cfg, 20)))
  state = setup.init(jnp.int32(0))
  dense = {**jax.tree.map(jnp.copy, state), "opt": tx.init(state["params"])}
  for i in range(2):
    dense, m_dense = dense_step(dense, _on(mesh, _batch(i)))
  sparse, m_sparse = _run(setup, mesh, 2)
  np.testing.assert_allclose(float(m_sparse["loss"]), float(m_dense["loss"]), rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7),
               sparse["params"], dense["params"])


def _selects_over_rows(hlo: str, rows: int) -> list[str]:
  return [line.strip()[:120] for line in hlo.splitlines() if re.search(rf"\[{rows},[0-9,]*\][^=]*select\(", line)]


@pytest.mark.parametrize("kind", ["adam_lazy", pytest.param("sgd", marks=pytest.mark.slow)])
def test_skip_step_keeps_tables_bit_identical_without_touching_every_row(kind):
  """on_nonfinite='skip_step' with a row-sparse table optimizer: a non-finite step leaves the table and its state
  bit-identical, and the compiled step has no select over a table-sized array (adam_dense's has: the control)."""
  opt = optim.OptimizerConfig(learning_rate=1e-2, warmup_steps=0, table_optimizer=kind, grad_clip_norm=0.5)
  mesh = sharding.make_mesh("data=1", jax.devices()[:1])
  setup = steps.make_setup(CFG, opt, 20, mesh, on_nonfinite="skip_step")
  state, _ = _run(setup, mesh, 1)
  path = setup.abstract["params"]["blocks"][0]["engram"]["table"]
  backbone = sparse_tables.without(state["params"], [("blocks", 0, "engram", "table")])
  leaves, treedef = jax.tree.flatten(backbone)
  leaves[0] = leaves[0] * jnp.nan  # a non-finite backbone parameter: loss and gradients go NaN
  poisoned = {**state, "params": sparse_tables.with_leaves(jax.tree.unflatten(treedef, leaves),
                                                           [("blocks", 0, "engram", "table")],
                                                           [state["params"]["blocks"][0]["engram"]["table"]])}
  before = jax.device_get(poisoned)
  after, metrics = setup.train_step(poisoned, _on(mesh, _batch(1)))
  assert not bool(metrics[guard.FINITE]) and int(after["step"]) == int(before["step"]) + 1
  for key in ("params", "opt"):
    for a, b in zip(jax.tree.leaves(jax.device_get(after[key])), jax.tree.leaves(before[key])):
      np.testing.assert_array_equal(np.atleast_1d(a).view(np.uint8), np.atleast_1d(b).view(np.uint8))
  rows = path.shape[0]
  hlo = setup.train_step.lower(setup.abstract, _on(mesh, _batch())).compile().as_text()
  assert not _selects_over_rows(hlo, rows), _selects_over_rows(hlo, rows)[:3]
  dense = steps.make_setup(CFG, dataclasses.replace(opt, table_optimizer="adam_dense"), 20, mesh,
                           on_nonfinite="skip_step")
  assert _selects_over_rows(dense.train_step.lower(dense.abstract, _on(mesh, _batch())).compile().as_text(), rows)


def test_older_adam_lazy_checkpoint_gets_a_clear_error_and_stays_in_place(tmp_path):
  """A run directory of the separate 'mu'/'nu' layout: restore names the differing entries and moves nothing."""
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  old = {"opt": {"mu": jnp.zeros((8, 2)), "nu": jnp.zeros((8, 2)), "count": jnp.zeros((), jnp.int32)}}
  ckpt = ckpt_lib.Checkpointer(tmp_path)
  ckpt.save(3, old, {"position": 0})
  ckpt.wait()
  new = {"opt": {"moments": jax.ShapeDtypeStruct((8, 2, 2), jnp.float32, sharding=dev),
                 "count": jax.ShapeDtypeStruct((), jnp.int32, sharding=dev)}}
  with pytest.raises(ValueError, match=r"another structure.*opt\.moments, opt\.mu, opt\.nu.*new MODEL_DIR"):
    ckpt.restore_latest(new)
  ckpt.close()
  assert (tmp_path / "3").is_dir() and not list(tmp_path.glob("*.corrupt"))
