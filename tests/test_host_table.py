"""Host-side Engram pieces: host hashing with history equals the layer's in-graph hashing, masked left padding reads
like a sequence start, offline row counts equal a per-document count, prefetch keeps order and raises, I/O."""

import time

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from engram_jax import host_table
from engram_jax.layers.engram import Engram
from engram_jax.layers.engram_config import EngramConfig

V = 50


@pytest.fixture(scope="module")
def engram():
  compression = np.arange(V, dtype=np.int32) // 2  # 25 compressed ids: a non-trivial map
  cfg = EngramConfig(max_ngram=3, heads_per_order=2, head_dim=4, table_base_sizes=(31, 37), table_row_multiple=8)
  return Engram(cfg, 8, compression, layer_id=3, rngs=nnx.Rngs(0))


def test_chunked_host_hashing_with_history_equals_in_graph_hashing(engram):
  hasher = host_table.HostHasher.from_engram(engram)
  tokens = np.random.default_rng(0).integers(0, V, (3, 11))
  want = np.asarray(engram.flat_rows(engram.hash(jnp.asarray(tokens))))  # [B, S, H], whole sequence in-graph
  history, got = hasher.init_history(3), []
  for lo, hi in ((0, 4), (4, 5), (5, 11)):  # a prompt chunk, one decode step, the rest
    got.append(hasher.flat_rows(tokens[:, lo:hi], history=history))
    history = hasher.next_history(history, tokens[:, lo:hi])
  np.testing.assert_array_equal(np.concatenate(got, axis=1), want)
  assert want.min() >= 0 and want.max() < engram.num_rows


def test_masked_left_padding_hashes_like_a_sequence_start(engram):
  hasher = host_table.HostHasher.from_engram(engram)
  tokens = np.array([[4, 17, 9, 33]])
  padded = np.array([[48, 7, 4, 17, 9, 33]])  # arbitrary ids in the two padding slots
  mask = np.array([[False, False, True, True, True, True]])
  alone = hasher.flat_rows(tokens, history=hasher.init_history(1))
  got = hasher.flat_rows(padded, history=hasher.init_history(1), mask=mask)
  np.testing.assert_array_equal(got[:, 2:], alone)
  np.testing.assert_array_equal(hasher.next_history(hasher.init_history(1), padded, mask),
                                hasher.next_history(hasher.init_history(1), tokens))


def test_count_rows_equals_a_per_document_count(engram):
  hasher = host_table.HostHasher.from_engram(engram)
  rng = np.random.default_rng(1)
  docs = [rng.integers(0, V, int(rng.integers(1, 30))) for _ in range(40)]
  seen = []
  counts = host_table.count_rows(docs, {3: hasher}, {3: engram.num_rows}, chunk_tokens=64, progress=seen.append)
  want = np.zeros(engram.num_rows, np.int64)
  for d in docs:  # each document hashed alone: n-grams never cross documents
    np.add.at(want, hasher.flat_rows(d[None]).reshape(-1), 1)
  np.testing.assert_array_equal(counts[3], want)
  assert seen[-1] == sum(d.size for d in docs) and len(seen) > 1
  assert counts[3].sum() == sum(d.size for d in docs) * engram.spec.num_heads


def test_row_counts_roundtrip(tmp_path):
  counts = {1: np.arange(5, dtype=np.int64), 7: np.ones(3, np.int64)}
  path = host_table.save_row_counts(tmp_path / "counts.npz", counts, tokens=123)
  got = host_table.load_row_counts(path)
  assert set(got) == {1, 7} and all(np.array_equal(got[k], counts[k]) for k in counts)
  assert [p.name for p in tmp_path.iterdir()] == ["counts.npz"]  # no temporary left behind


def test_prefetch_keeps_order_runs_ahead_and_raises():
  started = []

  def work(i):
    started.append(i)
    time.sleep(0.01)
    return i * i

  it = host_table.prefetch(work, range(6), depth=2)
  assert next(it) == 0
  time.sleep(0.05)
  assert len(started) >= 3  # items 1 and 2 were computed while the consumer held item 0
  assert list(it) == [1, 4, 9, 16, 25]

  def fail(i):
    if i == 2:
      raise RuntimeError("boom at 2")
    return i

  got = []
  with pytest.raises(RuntimeError, match="boom at 2"):
    for x in host_table.prefetch(fail, range(5)):
      got.append(x)
  assert got == [0, 1]


def test_host_table_gather_checks_rows():
  table = host_table.HostTable(np.arange(12, dtype=np.float32).reshape(6, 2))
  np.testing.assert_array_equal(table.gather(np.array([[5, 0]])), [[[10, 11], [0, 1]]])
  with pytest.raises(ValueError, match=r"rows must lie in \[0, 6\)"):
    table.gather(np.array([6]))
  with pytest.raises(ValueError, match="HostTable"):
    host_table.HostTable(np.zeros((3,), np.float32))
