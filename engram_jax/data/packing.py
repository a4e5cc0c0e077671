"""Concat-then-chunk packing of tokenized documents, and a resumable, deterministic batch iterator. Pure numpy.

Letters: T tokens in a stream, N rows, B batch rows, S sequence length.

Every document (plus EOS when `eos_id` is given) is appended to one token stream that is cut into rows of S tokens:
only the very end of a stream is padded, so rows are >99% full (seqio's LMFeatureConverter(pack=True) fills ~70%
at S=256). Per row:
  targets      token ids, 0 = padding
  segment_ids  1, 2, ... for the document pieces in the row, 0 = padding
  positions    0, 1, ... from each piece's start
A document cut at a row boundary continues at the start of the next row as a new segment whose positions RESTART
at 0. So positions < S always (safe for learned absolute positions), they are a function of segment_ids alone,
and attention / Engram n-grams never cross the cut anyway. Because of that choice, packing a stream in pieces and
carrying the unfinished tail over gives exactly the rows of packing the whole stream at once (`PackedBatches`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np

FEATURES = ("targets", "segment_ids", "positions")


def _stream(docs: Iterable[np.ndarray], eos_id: int | None) -> tuple[np.ndarray, np.ndarray]:
  """Documents -> (tokens [T], doc index per token [T]); empty documents are dropped."""
  pieces, lengths = [], []
  for doc in docs:
    doc = np.asarray(doc).reshape(-1)
    if eos_id is not None:
      doc = np.append(doc, eos_id)
    if doc.size:
      pieces.append(doc)
      lengths.append(doc.size)
  if not pieces:
    return np.zeros(0, np.int32), np.zeros(0, np.int64)
  tokens = np.concatenate(pieces).astype(np.int32)
  return tokens, np.repeat(np.arange(len(lengths)), lengths)


def rows_from_stream(tokens: np.ndarray, doc_ids: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
  """Cuts a token stream into rows. tokens, doc_ids: [T] (doc_ids non-decreasing) -> features [ceil(T/S), S] int32.

  The last row is padded with zeros (targets = segment_ids = positions = 0).
  """
  if seq_len < 1:
    raise ValueError(f"seq_len={seq_len} must be >= 1")
  t = tokens.size
  n = -(-t // seq_len)
  idx = np.arange(t)
  start = idx % seq_len == 0  # [T] a piece starts at every row start ...
  start[1:] |= doc_ids[1:] != doc_ids[:-1]  # ... and at every document start
  piece = np.cumsum(start)  # [T] global piece number, 1-based
  row_first = idx - idx % seq_len
  segment_ids = piece - piece[row_first] + 1 if t else piece
  positions = idx - np.maximum.accumulate(np.where(start, idx, 0))
  out = {}
  for name, values in (("targets", tokens), ("segment_ids", segment_ids), ("positions", positions)):
    row = np.zeros(n * seq_len, np.int32)
    row[:t] = values
    out[name] = row.reshape(n, seq_len)  # [N, S]
  return out


def pack_documents(docs: Iterable[np.ndarray], seq_len: int, *, eos_id: int | None = None) -> dict[str, np.ndarray]:
  """Packs 1-D int token arrays into {'targets', 'segment_ids', 'positions'}: [N, S] int32 (see module doc)."""
  tokens, doc_ids = _stream(docs, eos_id)
  return rows_from_stream(tokens, doc_ids, seq_len)


def packing_efficiency(batch: dict[str, np.ndarray]) -> float:
  """Fraction of non-padding positions."""
  return float(np.mean(batch["segment_ids"] > 0))


def unpack_rows(batch: dict[str, np.ndarray]) -> list[np.ndarray]:
  """Inverse view for checks: the token pieces (one per segment, row-major order) of packed rows."""
  pieces = []
  for tokens, seg in zip(batch["targets"], batch["segment_ids"]):
    for s in range(1, int(seg.max(initial=0)) + 1):
      pieces.append(tokens[seg == s])
  return pieces


def shuffled_documents(
  docs: Sequence[np.ndarray], seed: int, *, shuffle: bool = True, shard_index: int = 0, num_shards: int = 1
) -> Callable[[int], Iterator[np.ndarray]]:
  """In-memory documents -> `documents_fn(epoch)`: a fresh permutation per (seed, epoch), then this shard's slice."""
  if not 0 <= shard_index < num_shards:
    raise ValueError(f"shard_index={shard_index} must be in [0, num_shards={num_shards})")

  def documents_fn(epoch: int) -> Iterator[np.ndarray]:
    order = np.random.default_rng([seed, epoch]).permutation(len(docs)) if shuffle else np.arange(len(docs))
    return (docs[i] for i in order[shard_index::num_shards])

  return documents_fn


def mixed_documents(
  sources: Sequence[Sequence[np.ndarray]], rates: Sequence[float], seed: int, *, shard_index: int = 0,
  num_shards: int = 1
) -> Callable[[int], Iterator[np.ndarray]]:
  """Document-level mixture -> `documents_fn(epoch)`: each document comes from source k with probability
  rates[k] / sum(rates); each source is walked in a fresh permutation, reshuffled when it runs out. An epoch ends
  when the source with the largest rate has been fully used once. Deterministic per (seed, epoch)."""
  if len(sources) != len(rates) or not sources or min(rates) <= 0 or not all(len(s) for s in sources):
    raise ValueError("mixed_documents: one rate > 0 per non-empty source is required")
  if not 0 <= shard_index < num_shards:
    raise ValueError(f"shard_index={shard_index} must be in [0, num_shards={num_shards})")
  p = np.asarray(rates, np.float64) / np.sum(rates)
  main = int(np.argmax(p))

  def documents_fn(epoch: int) -> Iterator[np.ndarray]:
    rng = np.random.default_rng([seed, epoch, 1])
    orders = [rng.permutation(len(s)) for s in sources]
    pos = [0] * len(sources)
    picks = []
    while pos[main] < len(sources[main]):
      k = int(rng.choice(len(sources), p=p))
      if pos[k] == len(sources[k]):
        orders[k], pos[k] = rng.permutation(len(sources[k])), 0
      picks.append((k, int(orders[k][pos[k]])))
      pos[k] += 1
    return (sources[k][i] for k, i in picks[shard_index::num_shards])

  return documents_fn


class PackedBatches:
  """Iterator of packed batches {'targets', 'segment_ids', 'positions'}: [B, S] int32 numpy arrays.

  `documents_fn(epoch)` returns that epoch's documents (1-D int arrays) in a deterministic order, e.g.
  `shuffled_documents(docs, seed)`. Each epoch is packed on its own stream; its last partial batch is dropped
  (< B*S tokens per epoch) unless `drop_remainder=False` (then it is padded, e.g. for evaluation).
  Position: `state()` -> {'epoch': int, 'index': int} (index = batches already taken from that epoch);
  `restore(state)` replays the epoch's packing up to there, so the next batches equal the uninterrupted stream.
  """

  def __init__(
    self,
    documents_fn: Callable[[int], Iterable[np.ndarray]],
    *,
    batch_size: int,
    seq_len: int,
    eos_id: int | None = None,
    num_epochs: int | None = None,
    drop_remainder: bool = True,
  ):
    if batch_size < 1 or seq_len < 1:
      raise ValueError(f"batch_size={batch_size} and seq_len={seq_len} must both be >= 1")
    self.documents_fn, self.batch_size, self.seq_len = documents_fn, batch_size, seq_len
    self.eos_id, self.num_epochs, self.drop_remainder = eos_id, num_epochs, drop_remainder
    self.info: dict = {}  # free-form description set by the producer (task, split, counts, skipped lines)
    self.restore({"epoch": 0, "index": 0})

  def state(self) -> dict[str, int]:
    return {"epoch": self._epoch, "index": self._index}

  def restore(self, state: dict[str, int]) -> None:
    missing = {"epoch", "index"} - set(state)
    if missing:
      raise ValueError(f"iterator state lacks {sorted(missing)}; expected {{'epoch': int, 'index': int}}")
    self._epoch, self._index = int(state["epoch"]), int(state["index"])
    self._batches = self._epoch_batches(self._epoch)
    for _ in range(self._index):
      if next(self._batches, None) is None:
        raise ValueError(f"state {state} is past the end of epoch {self._epoch}")

  def __iter__(self) -> PackedBatches:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    while True:
      if self.num_epochs is not None and self._epoch >= self.num_epochs:
        raise StopIteration
      batch = next(self._batches, None)
      if batch is not None:
        self._index += 1
        return batch
      if self._index == 0:
        raise ValueError(
          f"epoch {self._epoch} has too few tokens for one batch of batch_size*seq_len={self.batch_size * self.seq_len}"
        )
      self._epoch, self._index = self._epoch + 1, 0
      self._batches = self._epoch_batches(self._epoch)

  def _epoch_batches(self, epoch: int) -> Iterator[dict[str, np.ndarray]]:
    """Streams one epoch: buffers documents until B*S tokens, cuts a batch, carries the tail (same doc ids)."""
    need = self.batch_size * self.seq_len
    tokens, doc_ids = np.zeros(0, np.int32), np.zeros(0, np.int64)
    pending, pending_len, next_doc = [], 0, 0
    docs = iter(self.documents_fn(epoch))
    exhausted = False
    while True:
      while tokens.size + pending_len < need and not exhausted:
        doc = next(docs, None)
        if doc is None:
          exhausted = True
          break
        doc = np.asarray(doc).reshape(-1)
        if self.eos_id is not None:
          doc = np.append(doc, self.eos_id)
        if doc.size:
          pending.append((doc.astype(np.int32), next_doc))
          pending_len += doc.size
          next_doc += 1
      if pending:
        tokens = np.concatenate([tokens] + [d for d, _ in pending])
        doc_ids = np.concatenate([doc_ids] + [np.full(d.size, i) for d, i in pending])
        pending, pending_len = [], 0
      if tokens.size >= need or (tokens.size and not self.drop_remainder):
        rows = rows_from_stream(tokens[:need], doc_ids[:need], self.seq_len)
        tokens, doc_ids = tokens[need:], doc_ids[need:]
        yield {k: _pad_rows(v, self.batch_size) for k, v in rows.items()}  # [B, S]
      else:
        return


def _pad_rows(rows: np.ndarray, n: int) -> np.ndarray:
  """[N', S] -> [n, S] with zero rows appended (only the final padded batch of an epoch is short)."""
  return (
    rows if rows.shape[0] == n else np.concatenate([rows, np.zeros((n - rows.shape[0], rows.shape[1]), rows.dtype)])
  )
