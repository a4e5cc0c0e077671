"""Generation: greedy equals the argmax of repeated full passes; a ragged batch equals each prompt alone; host tables
(with and without the hot-row cache) equal device tables; a data=2,expert=2,model=2 mesh equals one device; seeded
sampling is reproducible; prompt log-probs equal the full pass; EOS and stop strings; one compilation per step."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from engram_jax import decode, host_table, sharding
from engram_jax.decode import DecodeConfig, Engine, Request, SamplingParams
from engram_jax.layers.engram_config import EngramConfig
from engram_jax.layers.moe_config import MoEConfig
from engram_jax.models.config import ModelConfig
from engram_jax.models.decoder import Decoder

V = 64
# Engram before block 0 (its rows are needed before the step starts) and before block 2 (its rows arrive while
# blocks 0-1 run); capacity dispatch with capacity_factor = E / k never drops, so it equals dropless and runs on
# an expert-parallel mesh.
CFG = ModelConfig(vocab_size=V, d_model=16, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=4, dense_hidden=32,
                  hc_expansion=2, moe=MoEConfig(num_experts=4, num_shared_experts=1, top_k=2, expert_hidden=8,
                                                dispatch="capacity", capacity_factor=2.0),
                  engram_layers=(0, 2), engram=EngramConfig(heads_per_order=2, head_dim=4, table_base_sizes=(101, 103),
                                                            num_branches=2, table_row_multiple=8))
DCFG = DecodeConfig(batch_size=4, max_len=40, prefill_chunk=8, top_logprobs=3, eos_id=None)
PROMPTS = [[5, 9, 3], list(range(10, 21)), [7, 7, 8, 9, 30, 31, 2]]  # 3, 11 and 7 tokens: two prefill chunks
NEW = 6


class CharTokenizer(decode.Tokenizer):
  """Token i is the letter chr(97 + i % 26): enough text to test stop strings."""

  vocab_size, eos_id = V, None

  def encode(self, text):
    return [ord(ch) - 97 for ch in text]

  def decode(self, ids):
    return "".join(chr(97 + i % 26) for i in ids)

  def token_text(self, i):
    return chr(97 + i % 26)


@pytest.fixture(scope="module")
def model():
  return Decoder(CFG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def engines(model):
  """Engines are built lazily and shared: each one compiles a prefill and a decode step."""
  cache = {}

  def get(name):
    if name not in cache:
      if name == "device":
        cache[name] = Engine(model, DCFG, tokenizer=CharTokenizer())
      elif name == "host":
        cache[name] = Engine(model, dataclasses.replace(DCFG, table_placement="host"))
      elif name == "cache":
        cache[name] = Engine(model, dataclasses.replace(DCFG, table_placement="host", hot_rows=48),
                             row_counts=_corpus_counts(model))
    return cache[name]

  return get


def _corpus_counts(model):
  rng = np.random.default_rng(1)
  docs = [rng.zipf(1.5, size=int(rng.integers(5, 40))) % V for _ in range(200)]  # Zipfian token ids
  hashers = {l: host_table.HostHasher.from_engram(model.blocks[l].engram) for l in CFG.engram_layers}
  rows = {l: model.blocks[l].engram.num_rows for l in CFG.engram_layers}
  return host_table.count_rows(docs, hashers, rows, chunk_tokens=500)


def _requests(sampling=SamplingParams(), **kw):
  return [Request(p, NEW, sampling, **kw) for p in PROMPTS]


@pytest.fixture(scope="module")
def greedy(engines):
  return engines("device").generate(_requests(prompt_logprobs=True))


@pytest.fixture(scope="module")
def forward(model):
  """Full forward pass over right-padded rows [3, 24] (causal: padding after a position does not change it)."""
  f = nnx.jit(lambda m, t: m(t)[0])
  return lambda rows: np.asarray(f(model, jnp.asarray(rows, jnp.int32)))


def test_greedy_equals_argmax_of_repeated_full_forward(greedy, forward):
  seqs = [list(p) for p in PROMPTS]
  for _ in range(NEW):
    logits = forward([s + [0] * (24 - len(s)) for s in seqs])
    for i, s in enumerate(seqs):
      s.append(int(np.argmax(logits[i, len(s) - 1])))
  for s, p, out in zip(seqs, PROMPTS, greedy):
    assert out.tokens == s[len(p):]
    assert out.finish_reason == "length"
  # Log-probs of the generated tokens and of the prompt (echo) equal the full pass's log-softmax.
  logits = forward([s + [0] * (24 - len(s)) for s in seqs])
  lsm = np.asarray(jax.nn.log_softmax(logits, axis=-1))
  for i, (s, p, out) in enumerate(zip(seqs, PROMPTS, greedy)):
    want = lsm[i, np.arange(len(s) - 1), s[1:]]  # log p(s[j+1] | s[:j+1])
    np.testing.assert_allclose(out.prompt_logprobs[1:], want[:len(p) - 1], atol=2e-5)
    np.testing.assert_allclose(out.logprobs, want[len(p) - 1:], atol=2e-5)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(p)
    top = out.prompt_top_logprobs[1]  # the K alternatives after the first prompt token, most likely first
    assert [t for t, _ in top] == list(np.argsort(-lsm[i, 0])[:3])
    assert out.text == CharTokenizer().decode(out.tokens)


def test_ragged_batch_equals_each_prompt_alone(engines):
  eng = engines("device")
  sampling = [SamplingParams(temperature=0.9, top_p=0.95, seed=s) for s in (3, 4, 5)]
  together = eng.generate([Request(p, NEW, s) for p, s in zip(PROMPTS, sampling)])
  for p, s, out in zip(PROMPTS, sampling, together):
    alone = eng.generate([Request(p, NEW, s)])[0]
    assert alone.tokens == out.tokens
    np.testing.assert_allclose(alone.logprobs, out.logprobs, atol=1e-5)


def test_seeded_sampling_is_reproducible(engines):
  eng = engines("device")
  s = SamplingParams(temperature=1.5, top_k=20, seed=7)
  a = eng.generate(_requests(s))
  b = eng.generate(_requests(s))
  c = eng.generate(_requests(dataclasses.replace(s, seed=8)))
  assert [x.tokens for x in a] == [x.tokens for x in b]
  assert [x.tokens for x in a] != [x.tokens for x in c]
  # top_k = 1 and a tiny nucleus both reduce to greedy whatever the temperature.
  g = [x.tokens for x in eng.generate(_requests())]
  assert [x.tokens for x in eng.generate(_requests(SamplingParams(temperature=2.0, top_k=1, seed=1)))] == g
  assert [x.tokens for x in eng.generate(_requests(SamplingParams(temperature=2.0, top_p=1e-6, seed=1)))] == g


def test_host_tables_equal_device_tables(engines, greedy):
  host = engines("host").generate(_requests(prompt_logprobs=True))
  for h, d in zip(host, greedy):
    assert h.tokens == d.tokens
    np.testing.assert_allclose(h.logprobs, d.logprobs, atol=1e-6)
    np.testing.assert_allclose(h.prompt_logprobs[1:], d.prompt_logprobs[1:], atol=1e-6)
  times = engines("host").host_rows.times
  assert times.calls > 0 and times.bytes_sent > 0
  # The compiled steps hold no table: the host copy is the only one they read.
  assert all(t.shape[0] == 0 for t in jax.tree.leaves(engines("host").params[0]))


def test_hot_row_cache_equals_no_cache_and_reports_hits(engines, greedy):
  eng = engines("cache")
  sampling = SamplingParams(temperature=1.0, seed=11)
  cached = eng.generate(_requests(sampling))
  plain = engines("host").generate(_requests(sampling))
  for a, b in zip(cached, plain):
    assert a.tokens == b.tokens
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-6)
  rates = eng.host_rows.hit_rates()
  assert set(rates) == set(CFG.engram_layers)
  assert all(0 < r < 1 for r in rates.values()), rates


def test_hot_row_cache_split_and_assemble_equal_a_plain_gather():
  rng = np.random.default_rng(0)
  table = host_table.HostTable(rng.normal(size=(50, 3)).astype(np.float32))
  counts = np.zeros(50, np.int64)
  counts[[4, 9, 17]] = [5, 3, 1]
  cache = host_table.HotRowCache(table, counts, capacity=2)  # rows 4 and 9
  rows = np.array([[[4, 9, 30], [30, 31, 17]]])  # [B=1, T=2, H=3]
  index, misses = cache.split(rows)
  assert misses.shape == (host_table.MIN_MISS_BUCKET, 3)  # 3 distinct misses, padded to the bucket
  got = np.asarray(host_table.HotRowCache.assemble(cache.rows, jnp.asarray(index), jnp.asarray(misses)))
  np.testing.assert_array_equal(got, table.table[rows])
  assert cache.hits == 2 and cache.lookups == 6


def test_sharded_mesh_equals_one_device(model, greedy):
  mesh = sharding.make_mesh("data=2,expert=2,model=2")
  sharded = sharding.shard_module(Decoder(CFG, mesh, rngs=nnx.Rngs(0)), mesh)
  out = Engine(sharded, DCFG, mesh=mesh).generate(_requests())
  for a, b in zip(out, greedy):
    assert a.tokens == b.tokens
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
  assert sharded.blocks[0].engram.table[...].sharding.spec == jax.P(("data", "expert", "model"), None)


@pytest.mark.slow
def test_sharded_mesh_with_host_tables_and_cache_equals_one_device(model, greedy):
  mesh = sharding.make_mesh("data=2,expert=2,model=2")
  sharded = sharding.shard_module(Decoder(CFG, mesh, rngs=nnx.Rngs(0)), mesh)
  config = dataclasses.replace(DCFG, table_placement="host", hot_rows=48)
  out = Engine(sharded, config, mesh=mesh, row_counts=_corpus_counts(model)).generate(_requests())
  for a, b in zip(out, greedy):
    assert a.tokens == b.tokens
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)


def test_eos_and_stop_strings(engines, greedy):
  eng = engines("device")
  ref = greedy[1]
  eos = ref.tokens[3]
  first = ref.tokens.index(eos)
  eng.config = dataclasses.replace(DCFG, eos_id=eos)  # EOS is host-side bookkeeping: same compiled steps
  try:
    out = eng.generate([Request(PROMPTS[1], NEW)])[0]
  finally:
    eng.config = DCFG
  assert out.tokens == ref.tokens[:first + 1] and out.finish_reason == "stop"  # EOS ends the tokens, not the text
  stop = ref.text[2:4]
  out = eng.generate([Request(PROMPTS[1], NEW, stop=(stop,))])[0]
  assert out.text == ref.text[:ref.text.index(stop)] and out.finish_reason == "stop"
  streamed = []
  eng.generate([Request(PROMPTS[1], NEW)], on_token=lambda i, tok, text: streamed.append((i, tok, text)))
  assert [t for _, t, _ in streamed] == ref.tokens and "".join(s for *_, s in streamed) == ref.text


def test_one_compilation_per_step_across_prompt_lengths_and_batches(engines):
  eng = engines("device")
  eng.generate([Request([1] * 17, 3), Request([2], 9)] + [Request([3, 4], 2)] * 5)  # 2 batches, new lengths
  assert eng._prefill._cache_size() == 1
  assert all(f._cache_size() == 1 for f in eng._decode.values())


def test_bad_requests_name_the_field(engines):
  eng = engines("device")
  for req, match in [(Request([], 3), "prompt"), (Request([V], 3), "prompt"), (Request([1], -1), "max_new_tokens"),
                     (Request([1] * 30, 20), "exceed the context")]:
    with pytest.raises(ValueError, match=match):
      eng.check(req)
  with pytest.raises(ValueError, match="stop strings need a tokenizer"):
    engines("host").check(Request([1], 2, stop=("x",)))
  with pytest.raises(ValueError, match="top_p"):
    SamplingParams(top_p=0.0)
  with pytest.raises(ValueError, match="DecodeConfig.prefill_chunk"):
    DecodeConfig(max_len=8, prefill_chunk=16)


def test_sample_tokens_respects_top_k_and_top_p():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 256))
  state = lambda **kw: decode.RowState(**{**dict(
      token=jnp.zeros(256, jnp.int32), pos=jnp.zeros(256, jnp.int32), step=jnp.zeros(256, jnp.int32),
      seed=jnp.arange(256, dtype=jnp.int32), temperature=jnp.ones(256), top_k=jnp.zeros(256, jnp.int32),
      top_p=jnp.ones(256)), **kw})
  draws = np.asarray(decode.sample_tokens(logits, state()))
  freq = np.bincount(draws, minlength=4) / 256
  np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.1)
  assert set(np.asarray(decode.sample_tokens(logits, state(top_k=jnp.full(256, 2))))) == {0, 1}
  assert set(np.asarray(decode.sample_tokens(logits, state(top_p=jnp.full(256, 0.7))))) == {0, 1}  # 0.5 < 0.7 <= 0.8
  assert set(np.asarray(decode.sample_tokens(logits, state(temperature=jnp.zeros(256))))) == {0}
  # Ids past a tokenizer's vocabulary are never drawn; the log-probs stay the model's.
  masked = decode.mask_vocab(logits[:, ::-1], 3)  # ids 0..2 hold 0.05, 0.15, 0.3; id 3 (0.5) has no text
  assert set(np.asarray(decode.sample_tokens(masked, state(temperature=jnp.zeros(256))))) == {2}
  lp = decode.token_logprobs(logits[:1, ::-1], jnp.asarray([2]), 2, valid=3)
  np.testing.assert_allclose(np.asarray(lp["logprob"]), np.log([0.3]), rtol=1e-6)
  assert np.asarray(lp["top_ids"]).tolist() == [[2, 1]]
