"""Engram tables in host memory: storage, host hashing with decode history, gather, transfer with prefetch, a
device-resident hot-row cache, and offline row-frequency counting.

Engram's addresses depend only on the token ids (arXiv 2601.07372, section 2.5), so the rows a step needs are known
as soon as its tokens are: hash and gather them on the host and send them while the device runs the blocks before
the Engram layer. The pieces here are plain numpy plus `jax.device_put` and know nothing of serving:
  HostTable      a flat table [V, d] in host memory; `gather(rows [..., H]) -> [..., H, d]`
  HostHasher     raw token ids -> rows of the flat table, with the decode history (last N-1 compressed ids)
  HotRowCache    the most frequent rows resident on the device; misses are gathered on the host, deduplicated
  HostRows       one step for every Engram layer of a model: hash, gather (or split through the cache), transfer
  prefetch       runs a function over items on a background thread, `depth` items ahead of the consumer
  count_rows     offline row frequencies over a corpus (same hashing spec), for choosing the hot rows
Training with host tables uses HostTable / HostHasher / prefetch the same way (rows forward; row gradients come
back as (row ids, gradients) for a sparse update of `HostTable.table`).

Letters: B batch, T tokens per step (1 when decoding, a chunk in prefill), N max n-gram order, H hash heads,
d row width, V table rows, C cache slots, U distinct rows missing from the cache in one step (padded to a bucket).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from engram_jax import hashing, sharding

MIN_MISS_BUCKET = 8  # The miss buffer is padded to a power of two >= this (a few shapes, so few compilations).


class HostTable:
  """A flat Engram table [V, d] in host memory (a C-contiguous numpy array; updated in place by training)."""

  def __init__(self, table: np.ndarray):
    table = np.asarray(table)
    if table.ndim != 2 or table.shape[0] < 1 or not np.issubdtype(table.dtype, np.floating):
      raise ValueError(f"HostTable: expected a float table [V, d] with V >= 1, got {table.dtype} {table.shape}")
    self.table = np.ascontiguousarray(table)

  @property
  def num_rows(self) -> int:
    return self.table.shape[0]

  @property
  def dim(self) -> int:
    return self.table.shape[1]

  @property
  def nbytes(self) -> int:
    return self.table.nbytes

  def gather(self, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """rows [...] int (rows of the flat table) -> [..., d]; out (optional) receives the rows."""
    rows = np.asarray(rows)
    if rows.size and (rows.min() < 0 or rows.max() >= self.num_rows):
      raise ValueError(f"HostTable.gather: rows must lie in [0, {self.num_rows}), got [{rows.min()}, {rows.max()}]")
    return np.take(self.table, rows, axis=0, out=out)


@dataclasses.dataclass(frozen=True)
class HostHasher:
  """Raw token ids -> rows of one layer's flat table, bit-identical to the layer's in-graph hashing."""

  compression: np.ndarray  # [V_raw] int32 raw id -> compressed id (the layer's EngramCompression).
  spec: hashing.HashSpec  # The layer's hash spec (primes, multipliers, pad id).

  @classmethod
  def from_engram(cls, engram) -> HostHasher:
    """The host hasher of an `engram_jax.layers.engram.Engram` module."""
    return cls(np.asarray(engram.compression[...], np.int32), engram.spec)

  @property
  def history_len(self) -> int:
    return self.spec.max_ngram - 1

  def init_history(self, batch: int) -> np.ndarray:
    """[B, N-1] compressed pad ids: the history before a sequence start."""
    return np.full((batch, self.history_len), self.spec.pad_id, np.int32)

  def compress(self, tokens: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Raw ids [B, T] -> compressed ids [B, T]; masked-out positions (mask False) read the compressed pad id."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= self.compression.size):
      raise ValueError(f"HostHasher: token ids must lie in [0, {self.compression.size}), got "
                       f"[{tokens.min()}, {tokens.max()}]")
    cids = self.compression[tokens]
    return cids if mask is None else np.where(mask, cids, np.int32(self.spec.pad_id))

  @functools.cached_property
  def offsets(self) -> np.ndarray:
    """[H] int32 first row of each head in the flat table."""
    return self.spec.offsets.astype(np.int32)

  def flat_rows(self, tokens: np.ndarray, *, history: np.ndarray | None = None, mask: np.ndarray | None = None,
                segment_ids: np.ndarray | None = None) -> np.ndarray:
    """Rows of the flat table, int32 [B, T, H]. Decode: history [B, N-1] (compressed ids before this chunk) and
    mask [B, T] (False = padding, hashed as the pad id). Packed training rows: segment_ids [B, T] instead."""
    if history is not None and segment_ids is None:
      return self.advance(tokens, history, mask)[0]
    local = hashing.hash_ngrams_np(self.compress(tokens, mask), segment_ids, self.spec, history=history)
    return local + self.offsets  # [B, T, H]

  def advance(self, tokens: np.ndarray, history: np.ndarray, mask: np.ndarray | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
    """Decode: tokens [B, T] after history [B, N-1] -> (rows of the flat table int32 [B, T, H], the history after
    the chunk [B, N-1]); one compression and one windowed hash (hashing.hash_window_np)."""
    window = self._window(tokens, history, mask)
    return hashing.hash_window_np(window, self.spec) + self.offsets, self._tail(window)

  def next_history(self, history: np.ndarray, tokens: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """The history after feeding tokens [B, T] (with the same mask): [B, N-1]; no hashing."""
    return self._tail(self._window(tokens, history, mask))

  def _window(self, tokens: np.ndarray, history: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    return np.concatenate([history, self.compress(tokens, mask)], axis=1)  # [B, N-1+T] compressed ids

  def _tail(self, window: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(window[:, window.shape[1] - self.history_len:])  # [B, N-1]


def _bucket(n: int) -> int:
  """The smallest power of two >= max(n, MIN_MISS_BUCKET)."""
  return max(MIN_MISS_BUCKET, 1 << max(0, int(n) - 1).bit_length())


class HotRowCache:
  """The `capacity` most frequent rows of a HostTable, resident on the device.

  `split(rows)` maps a step's rows to indices into [cache rows | miss rows] and gathers the distinct missing rows
  on the host (padded to a power-of-two bucket); `assemble` rebuilds [..., H, d] on the device. Outputs are
  identical to gathering every row from the table. Counts lookups and hits (`hit_rate`).
  """

  def __init__(self, table: HostTable, counts: np.ndarray, capacity: int, *, sharding=None):
    counts = np.asarray(counts)
    if counts.shape != (table.num_rows,):
      raise ValueError(f"HotRowCache: counts must have one entry per table row ({table.num_rows}), got "
                       f"{counts.shape}; count with count_rows over the same model's hash specs")
    if capacity < 1:
      raise ValueError(f"HotRowCache: capacity={capacity} must be >= 1 row")
    order = np.argsort(-counts.astype(np.int64), kind="stable")  # most frequent first, ties by row id
    hot = np.sort(order[:min(capacity, int(np.count_nonzero(counts)) or 1)])
    self.table = table
    self.slot_of = np.full(table.num_rows, -1, np.int32)  # [V] row -> cache slot, -1 = not cached
    self.slot_of[hot] = np.arange(hot.size, dtype=np.int32)
    self.rows = jax.device_put(table.gather(hot), sharding)  # [C, d] on the device
    self.lookups = 0
    self.hits = 0

  @property
  def capacity(self) -> int:
    return self.rows.shape[0]

  @property
  def hit_rate(self) -> float:
    return self.hits / max(self.lookups, 1)

  def split(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """rows [..., H] -> (index [..., H] int32 into [cache | misses], miss rows [U, d] gathered on the host)."""
    slot = self.slot_of[rows]  # [..., H]
    miss = slot < 0
    n_miss = int(np.count_nonzero(miss))
    self.lookups += rows.size
    self.hits += rows.size - n_miss
    uniq, inverse = np.unique(rows[miss], return_inverse=True)
    misses = np.zeros((_bucket(uniq.size), self.table.dim), self.table.table.dtype)  # [U, d]
    self.table.gather(uniq, out=misses[:uniq.size])
    index = slot.copy()
    index[miss] = self.capacity + inverse.reshape(-1).astype(np.int32)
    return index, misses

  @staticmethod
  @jax.jit
  def assemble(cache_rows: jax.Array, index: jax.Array, misses: jax.Array) -> jax.Array:
    """[C, d], index [..., H], misses [U, d] -> rows [..., H, d] (on the device; one compilation per U bucket)."""
    c = cache_rows.shape[0]
    hit = cache_rows[jnp.minimum(index, c - 1)]
    missed = misses[jnp.clip(index - c, 0, misses.shape[0] - 1)]
    return jnp.where((index < c)[..., None], hit, missed)


@dataclasses.dataclass
class HostLayer:
  """The host side of one Engram layer."""

  hasher: HostHasher
  table: HostTable
  cache: HotRowCache | None = None


@dataclasses.dataclass
class StepTimes:
  """Accumulated host-side time of HostRows calls (seconds) and bytes sent."""

  hash_s: float = 0.0
  gather_s: float = 0.0
  transfer_s: float = 0.0
  calls: int = 0
  bytes_sent: int = 0

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


class HostRows:
  """Rows of every Engram layer for one step, from host tables: hash with the per-row history, gather (through the
  hot-row cache where there is one), send to the device.

  Call `reset(batch)` before a new batch of sequences, then once per fed chunk in order:
  `rows = host_rows(tokens [B, T], mask [B, T])` -> {layer: rows [B, T, H, d]} for the compiled step.
  `mesh`: rows go batch-sharded over its data axes (misses of the cache replicated); None: the default device.
  `sync_timing=True` waits for each transfer so `times.transfer_s` measures it (benchmarks only: it serialises).
  Returned rows are device arrays, except on one device without sync_timing, where uncached rows stay numpy
  [B, T, H, d] and travel as the compiled step's argument (cheaper than a separate transfer).
  """

  def __init__(self, layers: Mapping[int, HostLayer], *, mesh=None, sync_timing: bool = False):
    if not layers:
      raise ValueError("HostRows: no Engram layers")
    self.layers = dict(sorted(layers.items()))
    self.mesh = mesh
    self.replicated = None if mesh is None else NamedSharding(mesh, PartitionSpec())
    self.sync_timing = sync_timing
    self.history: dict[int, np.ndarray] = {}
    self.times = StepTimes()

  def reset(self, batch: int) -> None:
    self.history = {l: layer.hasher.init_history(batch) for l, layer in self.layers.items()}

  def _batch(self, x: np.ndarray):
    return None if self.mesh is None else sharding.batch_sharding(self.mesh, x.ndim)

  def flat_rows(self, tokens: np.ndarray, mask: np.ndarray | None = None) -> dict[int, np.ndarray]:
    """Hashes a chunk for every layer (advancing the histories): {layer: rows of the flat table [B, T, H]}."""
    t0 = time.perf_counter()
    out = {}
    for l, layer in self.layers.items():
      out[l], self.history[l] = layer.hasher.advance(tokens, self.history[l], mask)
    self.times.hash_s += time.perf_counter() - t0
    return out

  def __call__(self, tokens: np.ndarray, mask: np.ndarray | None = None) -> dict[int, jax.Array]:
    rows = self.flat_rows(np.asarray(tokens), None if mask is None else np.asarray(mask))
    out = {}
    for l, layer in self.layers.items():
      t0 = time.perf_counter()
      if layer.cache is None:
        payload = (layer.table.gather(rows[l]),)  # [B, T, H, d]
      else:
        payload = layer.cache.split(rows[l])  # index [B, T, H], misses [U, d]
      t1 = time.perf_counter()
      if self.mesh is None and not self.sync_timing:
        # One device: hand the numpy arrays to the compiled call, whose argument transfer costs a few microseconds
        # where a separate jax.device_put costs ~0.1 ms (measured on CPU) on the decode step's critical path.
        dev = payload[0] if layer.cache is None else HotRowCache.assemble(layer.cache.rows, *payload)
      elif layer.cache is None:
        dev = jax.device_put(payload[0], self._batch(payload[0]))
      else:
        index = jax.device_put(payload[0], self._batch(payload[0]))
        misses = jax.device_put(payload[1], self.replicated)
        dev = HotRowCache.assemble(layer.cache.rows, index, misses)
      if self.sync_timing:
        dev.block_until_ready()
      t2 = time.perf_counter()
      self.times.gather_s += t1 - t0
      self.times.transfer_s += t2 - t1
      self.times.bytes_sent += sum(int(p.nbytes) for p in payload)
      out[l] = dev
    self.times.calls += 1
    return out

  def hit_rates(self) -> dict[int, float]:
    """Cache hit rate per cached layer since construction."""
    return {l: layer.cache.hit_rate for l, layer in self.layers.items() if layer.cache is not None}


def prefetch(fn: Callable, items: Iterable, depth: int = 2) -> Iterator:
  """Yields fn(item) for each item in order, computing up to `depth` results ahead on one background thread (so
  host work for step t+1 runs while the caller's device computes step t). fn runs on the items sequentially, in
  order (it may carry state, such as a decode history). Exceptions are re-raised at the item that raised."""
  if depth < 1:
    raise ValueError(f"prefetch: depth={depth} must be >= 1")
  with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="engram-prefetch") as pool:
    pending: collections.deque = collections.deque()
    it = iter(items)
    try:
      for item in it:
        pending.append(pool.submit(fn, item))
        if len(pending) > depth:
          yield pending.popleft().result()
      while pending:
        yield pending.popleft().result()
    finally:
      for f in pending:
        f.cancel()


# ----------------------------------------------------------------------------------------------------------------
# Offline row frequencies
# ----------------------------------------------------------------------------------------------------------------


def count_rows(documents: Iterable[np.ndarray], hashers: Mapping[int, HostHasher], num_rows: Mapping[int, int], *,
               chunk_tokens: int = 1 << 16, progress: Callable[[int], None] | None = None) -> dict[int, np.ndarray]:
  """How often each table row is read over a corpus: {layer: int64 [V]}.

  documents: 1-D arrays of raw token ids, each hashed as its own sequence (n-grams never cross documents, as in
  training). They are packed into rows of about `chunk_tokens` with segment ids, so hashing runs in large numpy
  calls. progress(tokens so far) is called after each chunk.
  """
  counts = {l: np.zeros(int(num_rows[l]), np.int64) for l in hashers}
  buf: list[np.ndarray] = []
  total = 0

  def flush():
    nonlocal total
    if not buf:
      return
    tokens = np.concatenate(buf)[None]  # [1, S]
    seg = np.concatenate([np.full(d.size, i + 1, np.int32) for i, d in enumerate(buf)])[None]  # [1, S]
    for l, hasher in hashers.items():
      rows = hasher.flat_rows(tokens, segment_ids=seg)  # [1, S, H]
      counts[l] += np.bincount(rows.reshape(-1), minlength=counts[l].size)[:counts[l].size]
    total += tokens.size
    buf.clear()
    if progress is not None:
      progress(total)

  pending = 0
  for doc in documents:
    doc = np.asarray(doc).reshape(-1)
    if doc.size:
      buf.append(doc)
      pending += doc.size
    if pending >= chunk_tokens:
      flush()
      pending = 0
  flush()
  return counts


def save_row_counts(path: str | os.PathLike, counts: Mapping[int, np.ndarray], **meta) -> Path:
  """Writes {layer: counts} (+ scalar metadata) to an .npz, atomically."""
  path = Path(path)
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  with open(tmp, "wb") as f:
    np.savez(f, **{f"layer_{l}": np.asarray(c, np.int64) for l, c in counts.items()},
             **{f"meta_{k}": np.asarray(v) for k, v in meta.items()})
  tmp.replace(path)
  return path


def load_row_counts(path: str | os.PathLike) -> dict[int, np.ndarray]:
  """{layer: int64 counts [V]} from `save_row_counts`."""
  with np.load(path) as z:
    return {int(k[len("layer_"):]): z[k] for k in z.files if k.startswith("layer_")}
