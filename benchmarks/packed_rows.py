"""Packed-row layout for the benchmarks' random batches: documents of 32..seq tokens, as the data pipeline packs
them (segment ids from 1, positions restarting per document)."""

from __future__ import annotations

import numpy as np


def packed_layout(rng: np.random.Generator, batch: int, seq: int) -> tuple[np.ndarray, np.ndarray]:
  """-> (segment_ids [B, S], positions [B, S]) int32, drawn from `rng`."""
  seg, pos = np.zeros((batch, seq), np.int32), np.zeros((batch, seq), np.int32)
  for r in range(batch):
    i, doc = 0, 1
    while i < seq:
      n = min(int(rng.integers(32, seq + 1)), seq - i)
      seg[r, i:i + n], pos[r, i:i + n] = doc, np.arange(n)
      i, doc = i + n, doc + 1
  return seg, pos
