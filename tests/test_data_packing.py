"""Packing: document separation, exact reconstruction, efficiency, determinism and resumable iteration."""

import numpy as np
import pytest

from engram_jax.data import packing

EOS = 1


def _corpus(n_docs=300, seed=0, max_len=700):
  """Synthetic documents of random lengths; doc i is all token 2 + i, so any leak between documents shows."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(1, max_len, size=n_docs)
  return [np.full(n, 2 + i, np.int32) for i, n in enumerate(lengths)]


def _reference_rows(docs, seq_len, eos_id):
  """Plain-loop packer the vectorised one must equal."""
  targets, segs, poss = [], [], []
  row_t, row_s, row_p, seg, pos = [], [], [], 0, 0
  for doc in docs:
    doc = list(doc) + ([eos_id] if eos_id is not None else [])
    seg += 1
    pos = 0
    for tok in doc:
      if len(row_t) == seq_len:
        targets.append(row_t), segs.append(row_s), poss.append(row_p)
        row_t, row_s, row_p, seg, pos = [], [], [], 1, 0
      row_t.append(tok), row_s.append(seg), row_p.append(pos)
      pos += 1
  pad = seq_len - len(row_t)
  targets.append(row_t + [0] * pad), segs.append(row_s + [0] * pad), poss.append(row_p + [0] * pad)
  return {"targets": np.array(targets), "segment_ids": np.array(segs), "positions": np.array(poss)}


@pytest.mark.parametrize("seq_len", [1, 7, 64, 256])
def test_pack_matches_plain_loop(seq_len):
  docs = _corpus(60, max_len=300)
  got = packing.pack_documents(docs, seq_len, eos_id=EOS)
  want = _reference_rows(docs, seq_len, EOS)
  for k in packing.FEATURES:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert got[k].dtype == np.int32


def test_documents_stay_separate_and_reconstruct_exactly():
  docs = _corpus(300)
  rows = packing.pack_documents(docs, 256, eos_id=EOS)
  t, s, p = rows["targets"], rows["segment_ids"], rows["positions"]
  # Padding only at the very end, and consistently marked.
  flat_s = s.reshape(-1)
  n_real = int((flat_s > 0).sum())
  assert (flat_s[:n_real] > 0).all() and (flat_s[n_real:] == 0).all()
  assert (t.reshape(-1)[n_real:] == 0).all() and (p.reshape(-1)[n_real:] == 0).all()
  # Each segment is one document piece: one doc's tokens (+ maybe its EOS), positions 0..len-1.
  for row_t, row_s, row_p in zip(t, s, p):
    for seg in range(1, row_s.max() + 1):
      m = row_s == seg
      np.testing.assert_array_equal(row_p[m], np.arange(m.sum()))
      assert len(set(row_t[m].tolist()) - {EOS}) <= 1, "tokens of two documents share a segment"
    assert np.all(np.diff(row_s[row_s > 0]) >= 0)
  # Exact reconstruction of the token stream.
  stream = np.concatenate([np.append(d, EOS) for d in docs])
  np.testing.assert_array_equal(np.concatenate(packing.unpack_rows(rows)), stream)
  np.testing.assert_array_equal(t.reshape(-1)[:n_real], stream)


def test_efficiency_above_99_percent():
  docs = _corpus(2000, max_len=600)
  rows = packing.pack_documents(docs, 256, eos_id=EOS)
  assert packing.packing_efficiency(rows) > 0.99


def _batches(docs, seed, n, **kw):
  it = packing.PackedBatches(packing.shuffled_documents(docs, seed), batch_size=4, seq_len=64, eos_id=EOS, **kw)
  return [next(it) for _ in range(n)]


def test_iterator_deterministic_per_seed():
  docs = _corpus(100, max_len=200)
  a, b, c = _batches(docs, 0, 30), _batches(docs, 0, 30), _batches(docs, 1, 30)
  for x, y in zip(a, b):
    for k in packing.FEATURES:
      np.testing.assert_array_equal(x[k], y[k])
  assert any(not np.array_equal(x["targets"], z["targets"]) for x, z in zip(a, c))
  assert all(x[k].shape == (4, 64) and x[k].dtype == np.int32 for x in a for k in packing.FEATURES)


def test_iterator_equals_packing_the_epoch_at_once():
  docs = _corpus(50, max_len=200)
  fn = packing.shuffled_documents(docs, 3)
  rows = packing.pack_documents(fn(0), 64, eos_id=EOS)
  n_batches = int((rows["segment_ids"] > 0).sum()) // (4 * 64)  # full batches only (drop_remainder)
  it = packing.PackedBatches(fn, batch_size=4, seq_len=64, eos_id=EOS)
  for i in range(n_batches):
    batch = next(it)
    for k in packing.FEATURES:
      np.testing.assert_array_equal(batch[k], rows[k][4 * i : 4 * i + 4], err_msg=f"{k} batch {i}")
  assert it.state() == {"epoch": 0, "index": n_batches}


def test_resume_from_state_equals_uninterrupted_stream():
  docs = _corpus(80, max_len=100)
  fn = packing.shuffled_documents(docs, 7)
  full = packing.PackedBatches(fn, batch_size=4, seq_len=64, eos_id=EOS)
  stream = [next(full) for _ in range(60)]  # crosses several epochs
  assert full.state()["epoch"] >= 2
  for cut in (0, 5, 23, 41):
    it = packing.PackedBatches(fn, batch_size=4, seq_len=64, eos_id=EOS)
    for _ in range(cut):
      next(it)
    state = dict(it.state())
    assert all(isinstance(v, int) for v in state.values())
    resumed = packing.PackedBatches(fn, batch_size=4, seq_len=64, eos_id=EOS)
    resumed.restore(state)
    for want in stream[cut : cut + 10]:
      got = next(resumed)
      for k in packing.FEATURES:
        np.testing.assert_array_equal(got[k], want[k])


def test_finite_epochs_and_padded_remainder():
  docs = _corpus(20, max_len=100)
  it = packing.PackedBatches(
    packing.shuffled_documents(docs, 0, shuffle=False),
    batch_size=4,
    seq_len=32,
    eos_id=EOS,
    num_epochs=1,
    drop_remainder=False,
  )
  batches = list(it)
  stream = np.concatenate([np.append(d, EOS) for d in docs])
  got = np.concatenate([b["targets"].reshape(-1) for b in batches])
  np.testing.assert_array_equal(got[: stream.size], stream)
  assert (got[stream.size :] == 0).all() and got.size - stream.size < 4 * 32


def test_shards_partition_documents():
  docs = [np.array([i]) for i in range(10)]
  shards = [list(packing.shuffled_documents(docs, 0, shard_index=i, num_shards=3)(0)) for i in range(3)]
  assert sorted(int(d[0]) for s in shards for d in s) == list(range(10))


def test_errors_name_the_fix():
  with pytest.raises(ValueError, match="too few tokens"):
    next(packing.PackedBatches(lambda e: [np.array([5, 6])], batch_size=4, seq_len=64))
  with pytest.raises(ValueError, match="epoch"):
    packing.PackedBatches(lambda e: [], batch_size=1, seq_len=2).restore({"index": 3})
