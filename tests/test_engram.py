"""The Engram layer: NumPy reference of the paper's equations, causality, document isolation, decode, API."""

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from engram_jax import hashing, sharding
from engram_jax.layers.engram import Engram, EngramCompression, EngramTable, build_engram_layers
from engram_jax.layers.engram_config import EngramConfig
import reference_engram as ref  # tests/ is on sys.path (pytest rootdir-relative import)

CFG = EngramConfig(max_ngram=3, heads_per_order=2, head_dim=4, table_base_sizes=(31, 37), num_branches=2,
                   seed=5, table_row_multiple=16)
D, V_RAW = 8, 40
COMP = (np.arange(V_RAW) % 25).astype(np.int32)  # surjective: ids i and i + 25 merge
LAYERS = (1, 4)


def _randomise(layer: Engram, seed: int = 0) -> Engram:
  """Non-trivial conv weights and norm scales, so the conv and the norms are exercised (init: conv = 0)."""
  rng = np.random.default_rng(seed)
  for name in ("conv_weight", "gate_norm_h", "gate_norm_k", "conv_norm"):
    var = getattr(layer, name)
    shape = var[...].shape
    val = rng.normal(size=shape) * 0.5 + (1.0 if name != "conv_weight" else 0.0)
    var.set_value(jnp.asarray(val, jnp.float32))
  return layer


@pytest.fixture(scope="module")
def layers():
  out = build_engram_layers(CFG, LAYERS, D, COMP, rngs=nnx.Rngs(0))
  return {l: _randomise(m, l) for l, m in out.items()}


@pytest.fixture(scope="module")
def fwd():
  """One jitted forward shared by the tests (graph and state passed explicitly)."""

  @jax.jit
  def run(graphdef, state, h, ids, seg):
    layer = nnx.merge(graphdef, state)
    return layer(h, ids, seg)

  return lambda layer, h, ids, seg=None: run(*nnx.split(layer), h, ids, seg)


def _inputs(b=2, s=14, seed=0):
  rng = np.random.default_rng(seed)
  h = jnp.asarray(rng.normal(size=(b, s, CFG.num_branches, D)), jnp.float32)
  ids = jnp.asarray(rng.integers(0, V_RAW, (b, s)), jnp.int32)
  return h, ids


def _reference(layer: Engram, layer_id: int, h, ids, seg, hash_bits=32):
  """The layer's output recomputed by tests/reference_engram.py from the raw parameters."""
  primes = ref.demo_primes(LAYERS, CFG.max_ngram, CFG.heads_per_order, CFG.table_base_sizes)[layer_id]
  pad = int(COMP[CFG.pad_id])
  if hash_bits == 32:
    mult = ref.uint32_multipliers(CFG.seed, layer_id, CFG.max_ngram)
    local = ref.hash32_python(COMP[np.asarray(ids)], seg, mult, primes, pad)
  else:  # the demo's int64 hash (no segment ids in the demo)
    mult = ref.demo_multipliers(CFG.seed, layer_id, CFG.max_ngram, int(COMP.max()) + 1)
    local = ref.demo_ngram_hashes(COMP[np.asarray(ids)], mult, primes, pad)
  sizes = [p for order in primes for p in order]
  rows = local + np.concatenate([[0], np.cumsum(sizes)[:-1]])
  p = {k: np.asarray(getattr(layer, k)[...], np.float64) for k in
       ("table", "value_proj", "key_proj", "gate_norm_h", "gate_norm_k", "conv_norm", "conv_weight")}
  return ref.engram_forward(np.asarray(h), rows, seg, p["table"], p["value_proj"], p["key_proj"], p["gate_norm_h"],
                            p["gate_norm_k"], p["conv_norm"], p["conv_weight"], CFG.max_ngram, CFG.norm_eps)


@pytest.mark.parametrize("layer_id", LAYERS)
def test_forward_matches_numpy_reference(layers, fwd, layer_id):
  h, ids = _inputs()
  seg = np.array([[1] * 5 + [2] * 6 + [0] * 3, [1] * 14])
  got = fwd(layers[layer_id], h, ids, jnp.asarray(seg, jnp.int32))
  want = _reference(layers[layer_id], layer_id, h, ids, seg)
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)
  got1 = fwd(layers[layer_id], h, ids)
  np.testing.assert_allclose(np.asarray(got1), _reference(layers[layer_id], layer_id, h, ids, None),
                             rtol=2e-5, atol=2e-5)


def test_int64_hash_mode_layer_matches_demo_hashing_reference():
  """hash_bits=64 (jax x64 on, only here): the layer reads the rows of the demo's int64 hash; params stay f32."""
  cfg = EngramConfig(**{**CFG.__dict__, "hash_bits": 64})
  h, ids = _inputs(seed=8)
  with jax.enable_x64(True):
    layer = _randomise(build_engram_layers(cfg, LAYERS, D, COMP, rngs=nnx.Rngs(0))[4])
    assert layer.table[...].dtype == jnp.float32
    got = np.asarray(layer(h, ids))
  np.testing.assert_allclose(got, _reference(layer, 4, h, ids, None, hash_bits=64), rtol=2e-5, atol=2e-5)


def test_primes_unique_across_layers_and_table_padded(layers):
  primes = [p for m in layers.values() for o in m.spec.primes for p in o]
  assert len(primes) == len(set(primes)) == 8
  for m in layers.values():
    assert m.num_rows % 16 == 0 and m.num_rows >= m.spec.total_rows
    assert m.table[...].shape == (m.num_rows, CFG.head_dim)


def test_causality(layers, fwd):
  layer = layers[1]
  h, ids = _inputs(b=1, s=16, seed=1)
  base = np.asarray(fwd(layer, h, ids))
  t = 9
  ids2 = ids.at[0, t].set((ids[0, t] + 1) % 25)
  h2 = h.at[0, t].add(1.0)
  for hh, ii in ((h, ids2), (h2, ids), (h2, ids2)):
    out = np.asarray(fwd(layer, hh, ii))
    np.testing.assert_array_equal(out[:, :t], base[:, :t])
    assert np.abs(out[:, t:] - base[:, t:]).max() > 1e-4


def test_document_isolation_packed_equals_separate(layers, fwd):
  layer = layers[4]
  h, ids = _inputs(b=1, s=15, seed=2)
  bounds = [(0, 4), (4, 5), (5, 13), (13, 15)]
  seg = np.concatenate([np.full(e - s, i + 1) for i, (s, e) in enumerate(bounds)])[None]
  packed = np.asarray(fwd(layer, h, ids, jnp.asarray(seg, jnp.int32)))
  for s, e in bounds:
    alone = np.asarray(fwd(layer, h[:, s:e], ids[:, s:e]))
    np.testing.assert_allclose(packed[:, s:e], alone, rtol=1e-5, atol=1e-6)


def test_decode_steps_equal_full_pass(layers, fwd):
  layer = layers[1]
  h, ids = _inputs(b=2, s=12, seed=3)
  full = np.asarray(fwd(layer, h, ids))
  step = nnx.jit(lambda m, hh, ii, c: m.decode_step(hh, ii, c))
  cache = layer.init_decode_cache(2)
  outs = []
  for t in range(12):
    y, cache = step(layer, h[:, t:t + 1], ids[:, t:t + 1], cache)
    outs.append(np.asarray(y))
  np.testing.assert_allclose(np.concatenate(outs, axis=1), full, rtol=1e-5, atol=1e-6)
  # Prefill a chunk of 7, then 5 single steps.
  y0, cache = layer.decode_step(h[:, :7], ids[:, :7], layer.init_decode_cache(2))
  ys = [np.asarray(y0)]
  for t in range(7, 12):
    y, cache = layer.decode_step(h[:, t:t + 1], ids[:, t:t + 1], cache)
    ys.append(np.asarray(y))
  np.testing.assert_allclose(np.concatenate(ys, axis=1), full, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(cache.ids), COMP[np.asarray(ids[:, -2:])])
  # A step with rows hashed on the host (prefetch path) equals the in-graph step.
  nxt_h, nxt_ids = h[:, :1] * 0.5, ids[:, :1]
  host = hashing.hash_ngrams_np(COMP[np.asarray(nxt_ids)], None, layer.spec, history=np.asarray(cache.ids))
  y_host, c_host = layer.decode_step(nxt_h, nxt_ids, cache, hash_ids=jnp.asarray(host))
  y_dev, c_dev = layer.decode_step(nxt_h, nxt_ids, cache)
  np.testing.assert_array_equal(np.asarray(y_host), np.asarray(y_dev))
  np.testing.assert_array_equal(np.asarray(c_host.conv), np.asarray(c_dev.conv))


def test_host_hash_ids_equal_in_graph_hashing(layers, fwd):
  layer = layers[4]
  h, ids = _inputs(seed=4)
  seg = jnp.asarray(np.sort(np.random.default_rng(0).integers(1, 3, (2, 14)), axis=1), jnp.int32)
  host = hashing.hash_ngrams_np(COMP[np.asarray(ids)], np.asarray(seg), layer.spec)
  np.testing.assert_array_equal(np.asarray(layer.hash(ids, seg)), host)
  with_host = layer(h, ids, seg, hash_ids=jnp.asarray(host))
  np.testing.assert_allclose(np.asarray(with_host), np.asarray(fwd(layer, h, ids, seg)), rtol=1e-6, atol=1e-6)


def test_init_is_identity_conv_and_gate_statistics():
  layer = build_engram_layers(CFG, [0], D, COMP, rngs=nnx.Rngs(1))[0]
  h, ids = _inputs(seed=5)
  y = layer(h, ids)
  e = layer.table[...][layer.hash(ids) + jnp.asarray(layer.offsets)].reshape(2, 14, -1)
  v = e @ layer.value_proj[...]  # [B, S, D]
  ratio = np.asarray(y) / np.asarray(v)[:, :, None, :]  # zero conv: Y = alpha * v, the same alpha for every channel
  np.testing.assert_allclose(ratio, np.broadcast_to(ratio[..., :1], ratio.shape), rtol=1e-4)
  np.testing.assert_allclose(np.asarray(layer.gates(h, ids)), ratio[..., 0], rtol=1e-4)  # per-token gates
  gate = np.asarray(layer.last_gate[...])
  np.testing.assert_allclose(gate, ratio[..., 0].mean(axis=(0, 1)), rtol=1e-4)
  assert gate.shape == (2,) and ((0 < gate) & (gate < 1)).all()


def test_param_types_and_optimizer_groups(layers):
  layer = build_engram_layers(CFG, [2], D, COMP, rngs=nnx.Rngs(2))[2]
  _randomise(layer)
  assert isinstance(layer.table, EngramTable) and isinstance(layer.compression, EngramCompression)
  assert not isinstance(layer.compression, nnx.Param)
  assert layer.table.get_metadata()["out_sharding"] == ("table_rows", "table_dim")
  tables = nnx.state(layer, EngramTable)
  assert len(jax.tree.leaves(tables)) == 1
  h, ids = _inputs(seed=6)
  opt = nnx.Optimizer(layer, optax.sgd(0.1), wrt=nnx.Param)
  before = np.asarray(layer.table[...]).copy()
  grads = nnx.grad(lambda m: jnp.sum(m(h, ids) ** 2))(layer)
  opt.update(layer, grads)
  touched = np.unique(np.asarray(layer.hash(ids) + jnp.asarray(layer.offsets)))
  changed = np.flatnonzero(np.abs(np.asarray(layer.table[...]) - before).sum(-1) > 0)
  np.testing.assert_array_equal(changed, touched)  # sparse rows only; compression untouched
  np.testing.assert_array_equal(np.asarray(layer.compression[...]), COMP)


def test_bfloat16_activations(layers):
  layer = layers[1]
  h, ids = _inputs(seed=7)
  y32 = layer(h, ids)
  y16 = layer(h.astype(jnp.bfloat16), ids)
  assert y16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y16, np.float32), np.asarray(y32), rtol=0.1, atol=0.1)


def test_bad_construction_raises(layers):
  with pytest.raises(ValueError, match="num_branches"):
    layers[1](jnp.zeros((1, 4, 3, D)), jnp.zeros((1, 4), jnp.int32))
  with pytest.raises(ValueError, match="pad_id"):
    build_engram_layers(EngramConfig(table_base_sizes=(31, 37), pad_id=V_RAW), [0], D, COMP, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="surjective"):
    build_engram_layers(CFG, [0], D, COMP * 2, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="layer_ids"):
    build_engram_layers(CFG, [1, 1], D, COMP, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="hash_ids"):
    layers[1](jnp.zeros((1, 4, 2, D)), jnp.zeros((1, 4), jnp.int32), hash_ids=jnp.zeros((1, 4, 3), jnp.int32))
  with pytest.raises(ValueError, match="raw vocabulary"):
    layers[1](jnp.zeros((1, 4, 2, D)), jnp.full((1, 4), V_RAW, jnp.int32))
  flat_rows = jnp.full((1, 4, 4), layers[1].spec.total_rows - 1, jnp.int32)
  with pytest.raises(ValueError, match="local rows"):
    layers[1](jnp.zeros((1, 4, 2, D)), jnp.zeros((1, 4), jnp.int32), hash_ids=flat_rows)
  mesh = sharding.make_mesh("data=2,expert=2,model=2")
  rules = tuple((k, "data" if k == "table_rows" else v) for k, v in sharding.DEFAULT_RULES)
  with pytest.raises(ValueError, match="lookup='shard_map'"):
    Engram(EngramConfig(table_base_sizes=(31, 37), lookup="shard_map"), D, COMP, mesh=mesh, rules=rules,
           rngs=nnx.Rngs(0))


def test_docs_example_runs():
  """The README section's example (docs/engram_layer.md) runs as written and trains."""
  text = (Path(__file__).resolve().parents[1] / "docs" / "engram_layer.md").read_text()
  code = "\n".join(re.findall(r"```python\n(.*?)```", text, flags=re.S))
  scope: dict = {}
  exec(compile(code, "docs/engram_layer.md", "exec"), scope)
  losses = scope["losses"]
  assert np.isfinite(losses).all() and losses[-1] < losses[0]


def test_paper_size_layer_builds_abstractly():
  """Engram-27B's module (d_mem 1280 = 16 heads x 80, per-head tables of ~2.26M rows, 4 branches, layers 2
  and 15) builds under nnx.eval_shape without allocating its 2 x 2.9 GB tables."""
  cfg = EngramConfig(max_ngram=3, heads_per_order=8, head_dim=80, table_base_sizes=(2_262_400, 2_262_400),
                     num_branches=4, memory_dim=1280)
  abstract = nnx.eval_shape(lambda: build_engram_layers(cfg, [2, 15], 2560, hashing.identity_compression(129_280),
                                                        rngs=nnx.Rngs(0)))
  rows = {l: m.table.get_value().shape[0] for l, m in abstract.items()}
  for l, m in abstract.items():
    assert min(p for o in m.spec.primes for p in o) >= 2_262_400
    assert rows[l] % 1024 == 0 and 0 <= rows[l] - m.spec.total_rows < 1024
    assert m.key_proj.get_value().shape == (4, 1280, 2560) and m.value_proj.get_value().shape == (1280, 2560)
  assert 2 * 16 * 2_262_400 <= sum(rows.values()) < 2 * 16 * 2_263_000


def test_pregathered_rows_equal_table_lookup_and_their_gradient_is_the_table_gradient(layers):
  """rows = table[flat_rows(hash ids)] fed in gives the in-graph output; d/d rows scattered back = d/d table."""
  layer = layers[4]
  h, ids = _inputs(seed=3)
  seg = jnp.asarray(np.repeat([[1] * 6 + [2] * 8], 2, axis=0), jnp.int32)
  graphdef, table_state, rest = nnx.split(layer, EngramTable, ...)
  table_state, rest = nnx.to_pure_dict(table_state), nnx.to_pure_dict(rest)
  flat = layer.flat_rows(layer.hash(ids, seg))  # [B, S, H]

  def via_table(table):
    m = nnx.merge(graphdef, jax.tree.map(lambda _: table, table_state), rest)
    return jnp.sum(jnp.sin(m(h, ids, seg)))

  def via_rows(rows):
    return jnp.sum(jnp.sin(nnx.merge(graphdef, table_state, rest)(h, ids, seg, rows=rows)))

  table = layer.table[...]
  rows = table[flat]  # [B, S, H, d]
  np.testing.assert_allclose(via_rows(rows), via_table(table), rtol=1e-6)
  g_table = jax.grad(via_table)(table)
  g_rows = jax.grad(via_rows)(rows)
  scattered = jnp.zeros_like(table).at[flat.reshape(-1)].add(g_rows.reshape(-1, table.shape[1]))
  np.testing.assert_allclose(scattered, g_table, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="rows"):
    layer(h, ids, seg, rows=rows[..., :-1])
