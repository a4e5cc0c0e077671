"""Eval scoring and metrics: hand-computed metrics, packed == alone, truncation, tokenisation split, packing."""

import math

import jax
import numpy as np
import pytest
from flax import nnx

from engram_jax.layers.engram_config import EngramConfig
from engram_jax.layers.moe_config import MoEConfig
from engram_jax.models.config import ModelConfig
from engram_jax.models.decoder import Decoder
from evals import metrics, scoring

V = 61
CFG = ModelConfig(vocab_size=V, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, dense_hidden=64,
                  num_dense_layers=1, hc_expansion=2,
                  moe=MoEConfig(num_experts=4, num_shared_experts=1, top_k=2, expert_hidden=16),
                  engram_layers=(0, 1), engram=EngramConfig(heads_per_order=2, head_dim=4, table_base_sizes=(101, 103),
                                                            num_branches=2, table_row_multiple=8))
S = 24


def word_encoder(texts):
  """A deterministic whitespace tokenizer: word -> id in [3, V) (stable hash of its characters)."""
  return [[3 + sum(ord(ch) * 31 ** k for k, ch in enumerate(w)) % (V - 3) for w in t.split()] for t in texts]


@pytest.fixture(scope="module")
def model():
  return Decoder(CFG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def scorer(model):
  return scoring.make_token_scorer(model)


@pytest.fixture(scope="module")
def plain_forward(model):
  """The model's plain call (no segment ids, no packing), jitted once for rows of S tokens."""
  graphdef, state = nnx.split(model)
  f = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x)[0])
  return lambda x: f(state, x)


def reference_loglik(forward, ids, cont_len):
  """The request alone at the start of a row (right padding cannot reach it: the model is causal), scored with a
  numpy log-softmax of the logits."""
  inputs = np.zeros((1, S), np.int32)
  inputs[0, 1:ids.size] = ids[:-1]  # input = previous token, 0 (BOS) first
  z = np.asarray(forward(jax.numpy.asarray(inputs))[0, :ids.size], np.float64)
  logp = z - z.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  pos = np.arange(ids.size - cont_len, ids.size)
  return float(logp[pos, ids[pos]].sum()), bool(np.all(z[pos].argmax(-1) == ids[pos]))


REQS = [("Question: where is the cat ?\nAnswer:", " on the mat"),
        ("Question: where is the cat ?\nAnswer:", " in a big red house"),
        ("Answer:", " on the mat"),
        ("Answer:", " in a big red house"),
        ("the dog ran far away from the small town by the river and the cat sat on a mat", " by the river"),
        ("a", " green door"),
        ("one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
         "seventeen eighteen nineteen twenty twentyone twentytwo", " twentythree twentyfour")]


def _encode(reqs, seq_len=S):
  ctx, cont = scoring.encode_pair(word_encoder, [r[0] for r in reqs], [r[1] for r in reqs])
  return scoring.truncate(ctx, cont, seq_len)


def test_packed_scores_equal_each_request_scored_alone(plain_forward, scorer):
  enc = _encode(REQS)
  packed = scoring.score_requests(scorer, enc, S, batch_size=2, log=None)
  single = scoring.score_requests(scorer, enc, S, batch_size=2, one_per_row=True, log=None)
  assert packed.stats["rows"] < single.stats["rows"] == len(REQS)
  np.testing.assert_allclose(packed.loglik, single.loglik, rtol=1e-5, atol=1e-4)
  np.testing.assert_array_equal(packed.greedy, single.greedy)
  for i, ids in enumerate(enc.tokens):
    ll, greedy = reference_loglik(plain_forward, ids, int(enc.cont_len[i]))
    assert packed.loglik[i] == pytest.approx(ll, rel=1e-5, abs=1e-4)
    assert packed.greedy[i] == greedy
  assert np.all(packed.loglik < 0) and np.all(packed.tokens == enc.cont_len)


def test_long_requests_are_left_truncated_and_counted(model, plain_forward):
  enc = _encode(REQS, seq_len=12)
  lengths = [len(c) + len(k) for c, k in zip(*scoring.encode_pair(word_encoder, *zip(*REQS)))]
  assert enc.context_truncated.tolist() == [n > 12 for n in lengths] and enc.context_truncated.sum() == 2
  assert not enc.continuation_truncated.any()
  assert all(t.size <= 12 for t in enc.tokens)
  full = np.concatenate(scoring.encode_pair(word_encoder, [REQS[4][0]], [REQS[4][1]]), axis=1)[0]
  np.testing.assert_array_equal(enc.tokens[4], full[-12:])  # the last 12 tokens: the left side is cut
  scores = scoring.score_requests(scoring.make_token_scorer(model), enc, 12, batch_size=4, log=None)
  assert scores.context_truncated.sum() == 2
  ll, _ = reference_loglik(plain_forward, enc.tokens[4], int(enc.cont_len[4]))
  assert scores.loglik[4] == pytest.approx(ll, rel=1e-5, abs=1e-4)
  cut = scoring.truncate([[5, 6]], [[7, 8, 9, 10]], 3)
  assert cut.continuation_truncated.tolist() == [True] and cut.cont_len.tolist() == [3]


def test_encode_pair_moves_trailing_space_and_splits_after_the_context():
  calls = []

  def enc(texts):
    calls.append(list(texts))
    return [[ord(ch) for ch in t] for t in texts]  # character tokenizer: every boundary is a token boundary

  ctx, cont = scoring.encode_pair(enc, ["Q: x? A: ", "Q: x? A:"], ["yes", " no"])
  assert cont == [[ord(" "), ord("y"), ord("e"), ord("s")], [ord(" "), ord("n"), ord("o")]]
  assert ctx[0] == ctx[1] == [ord(ch) for ch in "Q: x? A:"]
  with pytest.raises(ValueError, match="non-empty continuation"):
    scoring.encode_pair(enc, ["a"], [""])


def test_pack_places_every_request_once_within_the_row_length():
  rng = np.random.default_rng(0)
  lengths = rng.integers(1, 50, 300).tolist()
  rows = scoring.pack(lengths, 64)
  placed = sorted(i for r in rows for i in r)
  assert placed == list(range(300))
  assert all(sum(lengths[i] for i in r) <= 64 for r in rows)
  assert len(rows) <= math.ceil(sum(lengths) / 64) * 1.1 + 1  # best-fit decreasing is near the bound
  with pytest.raises(ValueError, match="truncate first"):
    scoring.pack([65], 64)


def test_metrics_by_hand():
  # Two documents. Doc 0: choices ' A' (gold) and ' BBBB'; doc 1: ' yes', ' no' (gold), plus unconditional twins.
  doc = np.array([0, 0, 1, 1, 0, 0, 1, 1])
  choice = np.array([0, 1, 0, 1, 0, 1, 0, 1])
  uncond = np.array([0, 0, 0, 0, 1, 1, 1, 1], bool)
  conts = [" A", " BBBB", " yes", " no", " A", " BBBB", " yes", " no"]
  loglik = np.array([-3.0, -4.0, -2.0, -2.5, -1.0, -5.0, -1.0, -3.0])
  tokens = np.array([1, 4, 1, 1, 1, 4, 1, 1])
  gold = np.array([0, 1])
  m = metrics.task_metrics(doc, choice, uncond, conts, gold, loglik, tokens, np.zeros(8, bool))
  # acc: doc0 argmax(-3, -4) = 0 ok; doc1 argmax(-2, -2.5) = 0 wrong -> 0.5, stderr sqrt(0.5 / 2)
  assert m["acc"]["value"] == 0.5 and m["acc"]["stderr"] == pytest.approx(math.sqrt(0.5) / math.sqrt(2))
  # per char: doc0 -3/2 = -1.5 vs -4/5 = -0.8 -> 1 wrong; doc1 -2/4 = -0.5 vs -2.5/3 = -0.83 -> 0 wrong -> 0
  assert m["acc_per_char"]["value"] == 0.0 and m["acc_per_char"]["stderr"] == 0.0
  # per token: doc0 -3 vs -1 -> 1 wrong; doc1 -2 vs -2.5 -> 0 wrong
  assert m["acc_per_token"]["value"] == 0.0
  # uncond (PMI): doc0 -3+1 = -2 vs -4+5 = 1 -> 1 wrong; doc1 -2+1 = -1 vs -2.5+3 = 0.5 -> 1 right
  assert m["acc_uncond"]["value"] == 0.5
  # bpb of the gold continuation: doc0 3 / 2 bytes / ln 2, doc1 2.5 / 3 bytes / ln 2
  want = np.array([3.0 / 2, 2.5 / 3]) / math.log(2)
  assert m["bpb"]["value"] == pytest.approx(want.mean())
  assert m["bpb"]["stderr"] == pytest.approx(np.std(want, ddof=1) / math.sqrt(2))
  assert m["chance"] == 0.5 and m["docs"] == 2
  # per document: the values the means are taken over (doc0 right, doc1 wrong for acc)
  per = metrics.task_metrics(doc, choice, uncond, conts, gold, loglik, tokens, np.zeros(8, bool), per_doc=True)
  np.testing.assert_array_equal(per["per_doc"]["acc"], [1.0, 0.0])
  np.testing.assert_allclose(per["per_doc"]["bpb"], want)
  assert {k: v for k, v in per.items() if k != "per_doc"} == m


def test_paired_difference_is_the_mean_and_se_of_per_document_differences():
  on, off = np.array([1, 1, 0, 1, 0, 1.0]), np.array([0, 1, 0, 0, 0, 1.0])
  d = metrics.paired_difference(on, off)
  assert d["value"] == pytest.approx(off.mean() - on.mean())
  assert d["stderr"] == pytest.approx(np.std(off - on, ddof=1) / math.sqrt(6))
  # tighter than the two means' independent standard errors combined, when the settings agree on most documents
  assert d["stderr"] < math.hypot(metrics.mean_stderr(on)["stderr"], metrics.mean_stderr(off)["stderr"])
  with pytest.raises(ValueError, match="same documents"):
    metrics.paired_difference(on, off[:5])


def test_single_continuation_task_reports_bpb_and_greedy_match():
  m = metrics.task_metrics(np.array([0, 1, 2]), np.zeros(3, int), np.zeros(3, bool), [" signs", " Shane", " é"],
                           np.zeros(3, int), np.array([-2.0, -1.0, -0.5]), np.array([1, 2, 1]),
                           np.array([True, False, True]))
  assert m["chance"] is None and "acc" not in m
  assert m["acc_greedy"]["value"] == pytest.approx(2 / 3)
  assert m["bpb"]["value"] == pytest.approx(np.mean([2 / 6, 1 / 6, 0.5 / 3]) / math.log(2))


def test_metrics_from_model_scores_match_an_independent_computation(plain_forward, scorer):
  """End to end on the tiny model: the metric pipeline's acc equals argmax over independently computed log-probs."""
  reqs = [("Question: where is the cat ?\nAnswer:", c) for c in (" on the mat", " in a big red house", " far")]
  reqs += [("the dog ran far away", c) for c in (" from the town", " by the river")]
  enc = _encode(reqs)
  scores = scoring.score_requests(scorer, enc, S, batch_size=2, log=None)
  doc, choice, gold = np.array([0, 0, 0, 1, 1]), np.array([0, 1, 2, 0, 1]), np.array([2, 0])
  m = metrics.task_metrics(doc, choice, np.zeros(5, bool), [r[1] for r in reqs], gold, scores.loglik,
                           scores.tokens, scores.greedy)
  ref = np.array([reference_loglik(plain_forward, enc.tokens[i], int(enc.cont_len[i]))[0] for i in range(5)])
  want = [float(np.argmax(ref[:3]) == 2), float(np.argmax(ref[3:]) == 0)]
  assert m["acc"]["value"] == pytest.approx(np.mean(want))
  chars = np.array([len(r[1]) for r in reqs])
  want = [float(np.argmax(ref[:3] / chars[:3]) == 2), float(np.argmax(ref[3:] / chars[3:]) == 0)]
  assert m["acc_per_char"]["value"] == pytest.approx(np.mean(want))


def test_retained_fraction_raw_and_above_chance():
  r = metrics.retained(0.6, 0.4, chance=0.25)
  assert r["raw"] == pytest.approx(2 / 3) and r["above_chance"] == pytest.approx(0.15 / 0.35)
  assert metrics.retained(0.2, 0.3, chance=0.25)["above_chance"] is None


def test_engram_off_scorer_equals_zeroed_value_projection(model, scorer):
  """Scoring with Engram off equals scoring a copy whose Engram value projections are zero."""
  enc = _encode(REQS)
  off = scoring.score_requests(scoring.make_token_scorer(model, engram_off=(0, 1)), enc, S, 4, log=None)
  graphdef, state = nnx.split(model)
  zeroed = nnx.merge(graphdef, jax.tree.map(lambda x: x, state))
  for layer in (0, 1):
    proj = zeroed.blocks[layer].engram.value_proj
    proj.set_value(proj[...] * 0)
  ref = scoring.score_requests(scoring.make_token_scorer(zeroed), enc, S, 4, log=None)
  np.testing.assert_allclose(off.loglik, ref.loglik, rtol=1e-6, atol=1e-5)
  on = scoring.score_requests(scorer, enc, S, 4, log=None)
  assert np.abs(on.loglik - off.loglik).max() > 1e-3  # the switch does something on a random model


def test_engram_off_rejects_layers_without_engram(model):
  with pytest.raises(ValueError, match=r"engram_off=\(3,\): \[3\] are not Engram layers"):
    model(jax.numpy.zeros((1, 4), jax.numpy.int32), engram_off=(3,))
