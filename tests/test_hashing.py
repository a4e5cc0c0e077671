"""Tokenizer compression and n-gram hashing: numpy/jnp twins, the demo's int64 hash, the uint32 spec, isolation."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engram_jax import hashing
from engram_jax.layers.engram_config import EngramConfig
import reference_engram as ref  # tests/ is on sys.path (pytest rootdir-relative import)

TEXT = (
    "The quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX! Café au lait, cafe au lait.\n"
    "Alexander the Great was a king of the ancient Greek kingdom of Macedon. He succeeded his father Philip II.\n"
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings and arrows.\n"
    "In the beginning God created the heaven and the earth. And the earth was without form, and void.\n"
    "Naïve résumé façade coöperate — ﬁne ﬂour; numbers 12345 and 67890; tabs\tand  double  spaces.\n"
) * 4


def _spec(hash_bits=32, layer_id=3, vocab=500, pad=0, max_ngram=3, heads=4, bases=(101, 211), seed=7):
  return hashing.make_hash_specs(max_ngram=max_ngram, heads_per_order=heads, table_base_sizes=bases, seed=seed,
                                 hash_bits=hash_bits, layer_ids=[layer_id], vocab_size=vocab, pad_id=pad)[layer_id]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
  """A tiny SentencePiece model (byte fallback on) trained on TEXT: real pieces and real ids."""
  spm = pytest.importorskip("sentencepiece")
  d = tmp_path_factory.mktemp("spm")
  (d / "text.txt").write_text(TEXT)
  spm.SentencePieceTrainer.train(input=str(d / "text.txt"), model_prefix=str(d / "m"), vocab_size=360, hard_vocab_limit=False,
                                 model_type="unigram", byte_fallback=True, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                 character_coverage=1.0, minloglevel=2)
  return spm.SentencePieceProcessor(model_file=str(d / "m.model"))


# -- compression -------------------------------------------------------------------------------------------------


def test_compression_merges_by_normal_form():
  pieces = ["<pad>", "\u2581The", "the", "THE", "\u2581", "  ", "caf\u00e9", "cafe", "<0xE2>", "<0x41>", "A",
            "\ufb01", "fi", "\t\n", "x"]
  c = hashing.build_compression(pieces)
  # the/The/THE: 1; lone space: 2; cafe: 3; <0xE2> (not a whole character) keeps its raw piece: 4; A: 5; fi: 6.
  np.testing.assert_array_equal(c, [0, 1, 1, 1, 2, 2, 3, 3, 4, 5, 5, 6, 6, 2, 7])
  assert c.dtype == np.int32
  assert hashing.reduction_ratio(c) == pytest.approx(1 - 8 / 15)
  assert hashing.normalize_text("  A\u0301b  \t C ") == "ab c"
  assert hashing.normalize_text(" ") == " "


def test_compression_of_a_sentencepiece_vocab_roundtrips(sp_model, tmp_path):
  pieces = [sp_model.id_to_piece(i) for i in range(sp_model.get_piece_size())]
  c = hashing.build_compression(pieces)
  assert c.shape == (len(pieces),) and 0 < hashing.reduction_ratio(c) < 0.5
  # Merged pieces really have equal normalised text; distinct ids really differ (surjective, consistent map).
  keys = [hashing.compression_key(p) for p in pieces]
  for i in range(len(pieces)):
    for j in range(i):
      assert (c[i] == c[j]) == (keys[i] == keys[j])
  hashing.save_compression(str(tmp_path / "c.npy"), c)
  np.testing.assert_array_equal(hashing.load_compression(str(tmp_path / "c.npy")), c)


def test_bad_compression_maps_raise():
  with pytest.raises(ValueError, match="surjective"):
    hashing.check_compression(np.array([0, 2, 2]))
  with pytest.raises(ValueError, match="1-D integer"):
    hashing.check_compression(np.zeros((2, 2), np.int32))
  with pytest.raises(ValueError, match="vocab_size"):
    hashing.identity_compression(0)


# -- primes and multipliers ----------------------------------------------------------------------------------------


def test_primes_unique_and_at_or_above_base():
  specs = hashing.make_hash_specs(max_ngram=4, heads_per_order=5, table_base_sizes=(100, 100, 97), seed=0,
                                  hash_bits=32, layer_ids=[1, 4, 9], vocab_size=1000, pad_id=0)
  allp = [p for s in specs.values() for order in s.primes for p in order]
  assert len(allp) == len(set(allp)) == 3 * 3 * 5
  assert all(ref.is_prime(p) for p in allp)
  for s in specs.values():
    for base, order in zip((100, 100, 97), s.primes):
      assert min(order) >= base
  assert specs[1].primes[2][0] == 97 and specs[1].primes[0][0] == 101  # at or above the base
  np.testing.assert_array_equal(specs[1].offsets, np.concatenate([[0], np.cumsum(specs[1].head_sizes)[:-1]]))
  assert all(m % 2 == 1 and 0 < m < 2**32 for s in specs.values() for m in s.multipliers)
  assert specs[1].multipliers != specs[4].multipliers


# -- the demo's int64 hash, bit for bit ----------------------------------------------------------------------------


def test_int64_mode_matches_demo_transcription():
  layer_ids, vocab, pad = [2, 15], 6000, 5
  bases, heads, max_ngram, seed = (1009, 1013, 997), 3, 4, 11
  specs = hashing.make_hash_specs(max_ngram=max_ngram, heads_per_order=heads, table_base_sizes=bases, seed=seed,
                                  hash_bits=64, layer_ids=layer_ids, vocab_size=vocab, pad_id=pad)
  demo_primes = ref.demo_primes(layer_ids, max_ngram, heads, bases)
  ids = np.random.default_rng(0).integers(0, vocab, (3, 40))
  ids[:, -1] = vocab - 1  # the largest id: products at their bound must not wrap
  for layer in layer_ids:
    mult = ref.demo_multipliers(seed, layer, max_ngram, vocab)
    assert specs[layer].multipliers == tuple(int(m) for m in mult)
    assert [list(o) for o in specs[layer].primes] == demo_primes[layer]
    want = ref.demo_ngram_hashes(ids, mult, demo_primes[layer], pad)
    np.testing.assert_array_equal(hashing.hash_ngrams_np(ids, None, specs[layer]), want)
    with jax.enable_x64(True):
      got = jax.jit(lambda x, s=specs[layer]: hashing.hash_ngrams_jnp(x, None, s))(jnp.asarray(ids, jnp.int64))
      np.testing.assert_array_equal(np.asarray(got), want)


def test_int64_mode_without_x64_raises():
  with pytest.raises(ValueError, match="x64"):
    hashing.hash_ngrams_jnp(jnp.zeros((1, 4), jnp.int32), None, _spec(hash_bits=64))


# -- the uint32 spec -----------------------------------------------------------------------------------------------


def test_uint32_mode_matches_python_int_reference():
  spec = _spec(hash_bits=32, vocab=70000, pad=3)
  assert list(spec.multipliers) == ref.uint32_multipliers(7, 3, 3)
  rng = np.random.default_rng(1)
  ids = rng.integers(0, 70000, (2, 25))
  seg = np.sort(rng.integers(0, 4, (2, 25)), axis=1)
  want = ref.hash32_python(ids, seg, list(spec.multipliers), spec.primes, 3)
  np.testing.assert_array_equal(hashing.hash_ngrams_np(ids, seg, spec), want)
  assert (want < np.asarray(spec.head_sizes)).all()


@pytest.mark.parametrize("hash_bits", [32, 64])
def test_numpy_and_jnp_bit_identical_random_and_real_ids(sp_model, hash_bits):
  real = np.asarray(sp_model.encode(TEXT.splitlines()[:4], out_type=int), dtype=object)
  comp = hashing.build_compression([sp_model.id_to_piece(i) for i in range(sp_model.get_piece_size())])
  vocab = hashing.compressed_vocab_size(comp)
  spec = _spec(hash_bits=hash_bits, vocab=vocab, pad=int(comp[0]), max_ngram=4, heads=3, bases=(50_000, 7, 300))
  # Real ids: documents of one text packed into rows of 64 with segment ids.
  flat = np.concatenate([comp[np.asarray(r)] for r in real])
  segs = np.concatenate([np.full(len(r), i + 1) for i, r in enumerate(real)])
  n = len(flat) // 64 * 64
  real_ids, real_seg = flat[:n].reshape(-1, 64), segs[:n].reshape(-1, 64)
  rng = np.random.default_rng(2)
  rand_ids = rng.integers(0, vocab, (4, 64))
  rand_seg = np.sort(rng.integers(0, 3, (4, 64)), axis=1)
  ctx = jax.enable_x64(True) if hash_bits == 64 else jax.enable_x64(False)
  with ctx:
    f = jax.jit(lambda x, s: hashing.hash_ngrams_jnp(x, s, spec))
    for ids, seg in ((real_ids, real_seg), (rand_ids, rand_seg), (rand_ids, None)):
      want = hashing.hash_ngrams_np(ids, seg, spec)
      got = f(jnp.asarray(ids, jnp.int32), None if seg is None else jnp.asarray(seg, jnp.int32))
      np.testing.assert_array_equal(np.asarray(got), want)


def test_document_isolation_packed_equals_separate():
  spec = _spec()
  rng = np.random.default_rng(3)
  docs = [rng.integers(0, 500, n) for n in (5, 1, 9, 3)]
  packed = np.concatenate(docs)[None]
  seg = np.concatenate([np.full(len(d), i + 1) for i, d in enumerate(docs)])[None]
  got = hashing.hash_ngrams_np(packed, seg, spec)
  want = np.concatenate([hashing.hash_ngrams_np(d[None], None, spec) for d in docs], axis=1)
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(np.asarray(hashing.hash_ngrams_jnp(packed, seg, spec)), want)


def test_causality_and_history_chunks_equal_full_pass():
  spec = _spec(max_ngram=4, bases=(101, 211, 307))
  ids = np.random.default_rng(4).integers(0, 500, (2, 17))
  full = hashing.hash_ngrams_np(ids, None, spec)
  changed = ids.copy()
  changed[:, 9] = (changed[:, 9] + 1) % 500
  other = hashing.hash_ngrams_np(changed, None, spec)
  np.testing.assert_array_equal(other[:, :9], full[:, :9])
  assert (other[:, 9] != full[:, 9]).any()
  # Decode: chunks of 1, 3, ... with the last N-1 ids as history reproduce the full pass.
  hist = jnp.full((2, 3), spec.pad_id, jnp.int32)
  outs, t = [], 0
  for size in (1, 3, 1, 5, 7):
    chunk = jnp.asarray(ids[:, t:t + size], jnp.int32)
    outs.append(hashing.hash_ngrams_jnp(chunk, None, spec, history=hist))
    np.testing.assert_array_equal(hashing.hash_ngrams_np(np.asarray(chunk), None, spec, history=np.asarray(hist)),
                                  np.asarray(outs[-1]))
    hist = jnp.concatenate([hist, chunk], axis=1)[:, -3:]
    t += size
  np.testing.assert_array_equal(np.concatenate([np.asarray(o) for o in outs], axis=1), full)


@pytest.mark.parametrize("hash_bits", [32, 64])
@pytest.mark.parametrize("max_ngram, heads", [(2, 1), (3, 4), (4, 2)])
def test_window_fast_path_equals_hash_with_history(hash_bits, max_ngram, heads):
  spec = _spec(hash_bits=hash_bits, max_ngram=max_ngram, heads=heads, bases=(101, 211, 307)[:max_ngram - 1])
  rng = np.random.default_rng(max_ngram * 10 + heads)
  for t in (1, 2, 9):
    hist = rng.integers(0, 500, (3, max_ngram - 1))
    hist[0] = spec.pad_id  # a row at its sequence start
    chunk = rng.integers(0, 500, (3, t))
    want = hashing.hash_ngrams_np(chunk, None, spec, history=hist)
    got = hashing.hash_window_np(np.concatenate([hist, chunk], axis=1), spec)
    assert got.dtype == np.int32 and got.shape == (3, t, spec.num_heads)
    np.testing.assert_array_equal(got, want)
  with pytest.raises(ValueError, match="window must be"):
    hashing.hash_window_np(np.zeros((2, max_ngram - 1), np.int32), spec)
  with pytest.raises(ValueError, match="compressed ids must lie"):
    hashing.hash_window_np(np.full((2, max_ngram), 500), spec)


# -- configuration errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, field", [
    (dict(max_ngram=1, table_base_sizes=()), "max_ngram"),
    (dict(heads_per_order=0), "heads_per_order"),
    (dict(table_base_sizes=(100,)), "table_base_sizes"),
    (dict(table_base_sizes=(100, 1)), "table_base_sizes"),
    (dict(head_dim=0), "head_dim"),
    (dict(head_dim=16, memory_dim=500), "memory_dim"),
    (dict(hash_bits=16), "hash_bits"),
    (dict(lookup="gather"), "lookup"),
    (dict(num_branches=0), "num_branches"),
    (dict(table_base_sizes=(2**31, 5)), "table_base_sizes"),
])
def test_bad_config_raises_naming_the_field(kwargs, field):
  with pytest.raises(ValueError, match=field):
    EngramConfig(**kwargs)


def test_bad_hash_inputs_raise():
  spec = _spec(vocab=500)
  with pytest.raises(ValueError, match=r"\[0, 500\)"):
    hashing.hash_ngrams_np(np.array([[1, 500]]), None, spec)
  with pytest.raises(ValueError, match="pad_id"):
    _spec(vocab=500, pad=500)
  with pytest.raises(ValueError, match="table_base_sizes"):
    hashing.make_hash_specs(max_ngram=3, heads_per_order=2, table_base_sizes=(10,), seed=0, hash_bits=32,
                            layer_ids=[0], vocab_size=10, pad_id=0)


# -- hash quality --------------------------------------------------------------------------------------------------


def collision_stats(ids: np.ndarray, spec: hashing.HashSpec) -> list[dict]:
  """Per head: distinct n-grams, distinct rows they land in, and the rows an ideal random function would fill
  in expectation (p * (1 - (1 - 1/p)^u)). Collision rate = 1 - rows / distinct n-grams."""
  rows = hashing.hash_ngrams_np(ids[None], None, spec)[0]  # [S, H]
  out, h = [], 0
  for n in range(2, spec.max_ngram + 1):
    grams = np.stack([np.concatenate([np.full(i, spec.pad_id), ids[:len(ids) - i]]) for i in range(n)], axis=1)
    uniq, first = np.unique(grams, axis=0, return_index=True)
    for p in spec.primes[n - 2]:
      u, used = len(uniq), len(np.unique(rows[first, h]))
      ideal = p * (1 - (1 - 1 / p) ** u)
      out.append(dict(order=n, prime=p, ngrams=u, collision=1 - used / u, ideal=1 - ideal / u))
      h += 1
  return out


@pytest.mark.slow
def test_hash_collision_rate_near_random_function():
  path = os.path.expanduser("~/.cache/engram_jax/corpus/spm.model")
  if not os.path.exists(path):
    pytest.skip("no corpus tokenizer (python -m engram_jax.data.prepare)")
  import sentencepiece as spm
  sp = spm.SentencePieceProcessor(model_file=path)
  text = open(os.path.join(os.path.dirname(path), "validation-00000-of-00001.txt")).read()
  comp = hashing.build_compression([sp.id_to_piece(i) for i in range(sp.get_piece_size())])
  ids = comp[np.asarray(sp.encode(text[:400_000]))]
  for bits in (32, 64):
    spec = _spec(hash_bits=bits, vocab=hashing.compressed_vocab_size(comp), pad=int(comp[0]),
                 heads=4, bases=(20_011, 20_011))
    for st in collision_stats(ids, spec):
      assert st["collision"] < st["ideal"] * 1.1 + 0.005, st
