"""Analyses: CKA properties, LogitLens's last layer, the decoder's hidden streams and gate maps, gated n-grams."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from engram_jax.layers.engram_config import EngramConfig
from engram_jax.models.config import ModelConfig
from engram_jax.models.decoder import Decoder
from evals import analysis

V = 50
CFG = ModelConfig(vocab_size=V, d_model=16, num_layers=3, num_heads=2, num_kv_heads=1, head_dim=8, dense_hidden=32,
                  num_dense_layers=3, hc_expansion=2, engram_layers=(1,),
                  engram=EngramConfig(heads_per_order=2, head_dim=4, table_base_sizes=(53, 59), num_branches=2,
                                      table_row_multiple=8))


@pytest.fixture(scope="module")
def model():
  return Decoder(CFG, rngs=nnx.Rngs(1))


def test_cka_of_a_representation_with_itself_is_one_and_invariant():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(200, 12))
  q, _ = np.linalg.qr(rng.normal(size=(12, 12)))  # orthogonal
  assert analysis.linear_cka(x, x) == pytest.approx(1.0)
  assert analysis.linear_cka(x, x @ q) == pytest.approx(1.0)
  assert analysis.linear_cka(x, 7.5 * x) == pytest.approx(1.0)
  y = rng.normal(size=(200, 9))
  assert analysis.linear_cka(x, y) < 0.2  # unrelated representations
  assert analysis.linear_cka(x, y) == pytest.approx(analysis.linear_cka(x @ q * 3.0, y))


def test_cka_matrix_and_best_matches():
  rng = np.random.default_rng(1)
  a = rng.normal(size=(3, 100, 8))
  b = np.stack([a[2] @ np.linalg.qr(rng.normal(size=(8, 8)))[0], rng.normal(size=(100, 8)), 2 * a[0]])
  m = analysis.cka_matrix(a, b)
  assert m.shape == (3, 3)
  assert m[0, 2] == pytest.approx(1.0) and m[2, 0] == pytest.approx(1.0)
  assert analysis.best_matches(m)[0] == 2 and analysis.best_matches(m)[2] == 0
  with pytest.raises(ValueError, match="same tokens"):
    analysis.cka_matrix(a, b[:, :50])


def test_hidden_streams_end_in_the_logits_and_gates_match_the_engram_module(model):
  tokens = jnp.asarray(np.random.default_rng(2).integers(1, V, (2, 10)), jnp.int32)
  seg = jnp.asarray([[1] * 6 + [2] * 4, [1] * 10], jnp.int32)
  logits, aux = model(tokens, segment_ids=seg, return_hidden=True)
  plain, _ = model(tokens, segment_ids=seg)
  np.testing.assert_allclose(logits, plain, rtol=1e-6, atol=1e-6)  # return_hidden changes nothing
  assert aux["hidden"].shape == (CFG.num_layers + 1, 2, 10, CFG.d_model)
  np.testing.assert_allclose(model.head(aux["hidden"][-1]), logits, rtol=1e-5, atol=1e-5)
  # the gate map of layer 1 equals Engram.gates on the stream entering block 1 (recomputed here by hand)
  h = model._embed(tokens)
  pos = jnp.asarray([list(range(6)) + list(range(4)), list(range(10))], jnp.int32)
  h, _ = model.blocks[0](h, tokens, pos, seg, seg != 0, None, None)
  want = model.blocks[1].engram.gates(h, tokens, seg)
  np.testing.assert_allclose(aux["engram_gates"][1], want, rtol=1e-5, atol=1e-6)
  assert aux["engram_gates"][1].shape == (2, 10, 2)


def test_logit_lens_last_layer_has_kl_zero_and_full_agreement(model):
  rng = np.random.default_rng(3)
  rows = {"targets": rng.integers(1, V, (3, 12)).astype(np.int32),
          "segment_ids": np.repeat([[1] * 5 + [2] * 5 + [0] * 2], 3, axis=0).astype(np.int32)}
  out = analysis.run_streams(analysis.make_stream_fn(model), rows, batch_size=2)
  assert out["tokens"] == 30 and out["hidden"].shape == (4, 30, 16)
  assert out["kl"][-1] == pytest.approx(0.0, abs=1e-5) and out["agreement"][-1] == 1.0
  assert np.all(out["kl"][:-1] > 0) and np.all(out["agreement"] <= 1.0)
  assert out["gates"][1].shape == (30, 2)
  assert out["starts"].sum() == 6 and np.all(out["inputs"][out["starts"]] == 0)  # BOS at each document piece


def test_gate_map_aligns_each_gate_with_the_token_ending_its_ngram(model):
  ids = [5, 6, 7, 8, 9]
  g = analysis.gate_map(model, ids)[1]  # [S, G]
  inputs = jnp.asarray([[0] + ids], jnp.int32)
  _, aux = model(inputs, segment_ids=jnp.ones_like(inputs), return_hidden=True)
  np.testing.assert_allclose(g, np.asarray(aux["engram_gates"][1][0, 1:]), rtol=1e-6)
  assert g.shape == (5, 2)


def test_gated_ngrams_by_hand():
  ids = np.array([0, 4, 5, 6, 0, 4, 5, 4, 5])
  starts = np.array([1, 0, 0, 0, 1, 0, 0, 0, 0], bool)
  gate = np.array([0.0, 0.1, 0.9, 0.3, 0.0, 0.2, 0.7, 0.4, 0.5])
  out = analysis.gated_ngrams(ids, starts, gate, 2, lambda t: "-".join(map(str, t)), min_count=1, top=3)
  # bigrams after each BOS: (4,5)@2 0.9, (5,6)@3 0.3, (4,5)@6 0.7, (5,4)@7 0.4, (4,5)@8 0.5; (0,4) never counts
  assert out["most"][0] == ("4-5", pytest.approx((0.9 + 0.7 + 0.5) / 3, abs=1e-4), 3)
  assert out["least"][0] == ("5-6", 0.3, 1) and out["ngrams"] == 3
  assert analysis.gated_ngrams(ids, starts, gate, 2, str, min_count=2)["ngrams"] == 1
