"""Decoder: shapes and aux, causality, packed rows, remat, bf16, config validation, balance updates."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from engram_jax import hashing
from engram_jax.layers.engram_config import EngramConfig
from engram_jax.layers.moe import MoEBias, apply_balance_updates
from engram_jax.layers.moe_config import MoEConfig
from engram_jax.models.config import ModelConfig
from engram_jax.models.decoder import Decoder, segment_positions

V = 64
DENSE = ModelConfig(vocab_size=V, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, dense_hidden=64)
MOE = dataclasses.replace(DENSE, num_layers=3, hc_expansion=2, moe=MoEConfig(
    num_experts=4, num_shared_experts=1, top_k=2, expert_hidden=16, seq_aux_loss_coef=0.01))
MHC = dataclasses.replace(MOE, hc_variant="mhc", hc_expansion=3)
ENGRAM = dataclasses.replace(MOE, engram_layers=(0, 2), engram=EngramConfig(
    heads_per_order=2, head_dim=4, table_base_sizes=(101, 103), num_branches=2, table_row_multiple=8))


def _forward(model):
  """One jitted forward per model; every call uses tokens and segment ids of shape [2, S] (one compilation)."""
  graphdef, state = nnx.split(model)
  f = jax.jit(lambda state, tokens, seg: nnx.merge(graphdef, state)(tokens, seg))
  return lambda tokens, seg: f(state, tokens, seg)


@pytest.fixture(scope="module", params=["dense", "moe", "mhc", "engram"])
def model_and_fwd(request):
  cfg = {"dense": DENSE, "moe": MOE, "mhc": MHC, "engram": ENGRAM}[request.param]
  model = Decoder(cfg, rngs=nnx.Rngs(0))
  return model, _forward(model)


S = 12
ONES = jnp.ones((2, S), jnp.int32)


def _tokens(b, s, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, V, (b, s)), jnp.int32)


def test_shapes_and_aux(model_and_fwd):
  model, fwd = model_and_fwd
  logits, aux = fwd(_tokens(2, S), ONES)
  assert logits.shape == (2, S, V) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(logits)))
  keys = {"moe_aux_loss", "expert_load", "dropped_fraction", "balance_bias_norm"}
  if model.config.engram_layers:
    keys.add("engram_gate_mean")
    gates = np.asarray(aux["engram_gate_mean"])
    assert gates.shape == (len(model.config.engram_layers), model.config.hc_expansion)
    assert np.all((gates > 0) & (gates < 1))
  assert set(aux) == keys
  n_moe = len(model.moe_layers())
  if n_moe:
    assert aux["expert_load"].shape == (n_moe, model.config.moe.num_experts)
    np.testing.assert_allclose(np.asarray(aux["expert_load"]).sum(axis=1), 1.0, rtol=1e-6)
    assert float(aux["moe_aux_loss"]) > 0 and float(aux["dropped_fraction"]) == 0.0
  else:
    assert aux["expert_load"].shape == (0, 0) and float(aux["moe_aux_loss"]) == 0.0


def test_causal(model_and_fwd):
  _, fwd = model_and_fwd
  tokens = _tokens(2, S)
  changed = tokens.at[:, 6].set((tokens[:, 6] + 1) % V)
  a, _ = fwd(tokens, ONES)
  b, _ = fwd(changed, ONES)
  np.testing.assert_array_equal(np.asarray(a[:, :6]), np.asarray(b[:, :6]))
  assert np.abs(np.asarray(a[:, 6:]) - np.asarray(b[:, 6:])).max() > 1e-4


def test_packed_row_equals_documents_run_separately(model_and_fwd):
  """Row [doc A | doc B | padding] equals A alone and B alone (each followed by padding)."""
  _, fwd = model_and_fwd
  a, b, noise = _tokens(1, 4, seed=1), _tokens(1, 6, seed=2), _tokens(1, S, seed=3)
  pad = lambda x: jnp.concatenate([x, noise[:, x.shape[1]:]], axis=1)  # padding tokens are arbitrary ids
  packed = jnp.concatenate([pad(jnp.concatenate([a, b], axis=1)), pad(a)])
  seg = jnp.array([[1] * 4 + [2] * 6 + [0] * 2, [1] * 4 + [0] * 8])
  got, _ = fwd(packed, seg)
  alone_b, _ = fwd(jnp.concatenate([pad(b), pad(b)]), jnp.array([[7] * 6 + [0] * 6] * 2))
  np.testing.assert_allclose(np.asarray(got[0, :4]), np.asarray(got[1, :4]), atol=2e-5)
  np.testing.assert_allclose(np.asarray(got[0, 4:10]), np.asarray(alone_b[0, :6]), atol=2e-5)


def test_padding_tokens_do_not_change_expert_load(model_and_fwd):
  model, fwd = model_and_fwd
  if not model.moe_layers():
    pytest.skip("dense model has no expert load")
  tokens, other = _tokens(2, S, seed=4), _tokens(2, S, seed=5)
  seg = jnp.array([[1] * 8 + [0] * 4] * 2)
  swapped = jnp.where(seg > 0, tokens, other)  # same documents, different padding ids
  np.testing.assert_array_equal(np.asarray(fwd(tokens, seg)[1]["expert_load"]),
                                np.asarray(fwd(swapped, seg)[1]["expert_load"]))
  assert not np.array_equal(np.asarray(fwd(tokens, ONES)[1]["expert_load"]),
                            np.asarray(fwd(swapped, ONES)[1]["expert_load"]))


def test_precomputed_engram_hash_ids_equal_in_graph_hashing():
  """Hash ids computed on the host (NumPy spec) give the same logits as hashing inside the graph."""
  model = Decoder(ENGRAM, rngs=nnx.Rngs(0))
  tokens = _tokens(2, S, seed=6)
  seg = jnp.array([[1] * 5 + [2] * 7, [1] * 9 + [0] * 3])
  host_ids = {}
  for layer in ENGRAM.engram_layers:
    engram = model.blocks[layer].engram
    compressed = np.asarray(engram.compression[...])[np.asarray(tokens)]
    host_ids[layer] = jnp.asarray(hashing.hash_ngrams_np(compressed, np.asarray(seg), engram.spec))
  fwd = nnx.jit(lambda m, t, s, ids: m(t, s, engram_hash_ids=ids))
  want, _ = fwd(model, tokens, seg, None)
  got, _ = fwd(model, tokens, seg, host_ids)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  # Wrong ids change the output: the precomputed path is really used.
  other, _ = fwd(model, tokens, seg, {l: (v + 1) % 101 for l, v in host_ids.items()})
  assert np.abs(np.asarray(other) - np.asarray(want)).max() > 1e-5
  # Rows gathered outside the model (host tables, row-sparse gradients) give the same logits.
  rows = {l: model.blocks[l].engram.table[...][model.blocks[l].engram.flat_rows(v)] for l, v in host_ids.items()}
  with_rows, _ = nnx.jit(lambda m, t, s, r: m(t, s, engram_rows=r))(model, tokens, seg, rows)
  np.testing.assert_allclose(np.asarray(with_rows), np.asarray(want), rtol=1e-6, atol=1e-6)


def test_segment_positions_restart_per_document():
  seg = jnp.array([[1, 1, 2, 2, 2, 0, 0], [5, 5, 5, 5, 5, 5, 5]])
  np.testing.assert_array_equal(np.asarray(segment_positions(seg)), [[0, 1, 0, 1, 2, 0, 1], list(range(7))])


def test_remat_equals_plain_in_loss_and_grads():
  tokens = _tokens(2, 8)

  def loss_and_grads(cfg):
    model = Decoder(cfg, rngs=nnx.Rngs(0))

    def loss_fn(m):
      logits, aux = m(tokens)
      return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, tokens[..., None], -1)[..., 0]) \
          + aux["moe_aux_loss"]

    return nnx.jit(nnx.value_and_grad(loss_fn))(model)

  small = dataclasses.replace(MOE, num_layers=1, num_dense_layers=0)  # one MoE block
  (l0, g0), (l1, g1) = loss_and_grads(small), loss_and_grads(dataclasses.replace(small, remat=True))
  np.testing.assert_allclose(float(l0), float(l1), rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6), g0, g1)


def test_bfloat16_compute_is_close_to_float32():
  tokens = _tokens(2, 8)
  f32, _ = Decoder(DENSE, rngs=nnx.Rngs(0))(tokens)
  bf16, _ = Decoder(dataclasses.replace(DENSE, compute_dtype="bfloat16"), rngs=nnx.Rngs(0))(tokens)
  assert bf16.dtype == jnp.float32
  rel = np.abs(np.asarray(bf16) - np.asarray(f32)).max() / np.abs(np.asarray(f32)).max()
  assert 0 < rel < 0.05


def test_tied_embeddings_share_the_table():
  model = Decoder(dataclasses.replace(DENSE, tie_embeddings=True), rngs=nnx.Rngs(0))
  assert not hasattr(model, "lm_head")
  n_tied = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  n_untied = sum(x.size for x in jax.tree.leaves(nnx.state(Decoder(DENSE, rngs=nnx.Rngs(0)), nnx.Param)))
  assert n_untied - n_tied == V * DENSE.d_model
  logits, _ = model(_tokens(1, 4))
  assert logits.shape == (1, 4, V)


def test_apply_balance_updates_moves_bias_against_load():
  model = Decoder(MOE, rngs=nnx.Rngs(0))
  _, aux = _forward(model)(_tokens(2, S), ONES)
  load = np.asarray(aux["expert_load"])
  apply_balance_updates(model, aux, rate=0.5)
  biases = np.stack([np.asarray(m.bias[...]) for m in model.moe_layers()])
  np.testing.assert_array_equal(biases, 0.5 * np.sign(load.mean(axis=1, keepdims=True) - load))
  bias = model.moe_layers()[0].bias
  assert isinstance(bias, MoEBias) and not isinstance(bias, nnx.Param)  # never in the gradient
  assert len(jax.tree.leaves(nnx.state(model, MoEBias))) == len(model.moe_layers())


@pytest.mark.parametrize("change, match", [
    (dict(num_heads=3), "num_heads=3 must be a multiple of num_kv_heads=2"),
    (dict(head_dim=7), "head_dim=7 must be even"),
    (dict(num_dense_layers=5), "num_dense_layers=5"),
    (dict(compute_dtype="float16"), "compute_dtype='float16'"),
    (dict(hc_variant="x"), "hc_variant='x'"),
    (dict(hc_expansion=0), "hc_expansion=0"),
    (dict(engram_layers=(2,)), r"engram_layers=\(2,\): \[2\] outside"),
    (dict(engram_layers=(0,)), "engram is None"),
    (dict(engram_layers=(0, 0), engram=EngramConfig()), "duplicates"),
    (dict(engram_layers=(0,), engram=EngramConfig(num_branches=2)), "engram.num_branches=2 must equal hc_expansion=1"),
    (dict(moe=MoEConfig(num_experts=4, top_k=5)), "top_k=5 must be <= num_experts=4"),
    (dict(moe=MoEConfig(score_func="relu")), "score_func='relu'"),
])
def test_bad_config_fails_at_construction(change, match):
  with pytest.raises(ValueError, match=match):
    Decoder(dataclasses.replace(DENSE, **change), rngs=nnx.Rngs(0))


def test_incremental_decode_equals_full_pass():
  """Prefill 5 tokens, then one token per step: the logits equal the full pass (Engram, HC, dropless MoE)."""
  model = Decoder(ENGRAM, rngs=nnx.Rngs(0))
  tokens = _tokens(2, 9, seed=8)
  full, _ = nnx.jit(lambda m, t: m(t))(model, tokens)
  step = nnx.jit(lambda m, t, c: m.decode_step(t, c))
  logits, cache = step(model, tokens[:, :5], model.init_cache(2, 9))
  outs = [logits]
  for i in range(5, 9):
    logits, cache = step(model, tokens[:, i:i + 1], cache)
    outs.append(logits)
  assert int(cache.length) == 9
  np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, axis=1)), np.asarray(full), rtol=1e-5, atol=2e-5)
