"""Row frequencies of a run's Engram tables over its training corpus (for the hot-row cache of host tables).

    python -m engram_jax.count_rows --gin.CHECKPOINT_PATH=DIR [--max_tokens 20000000] [--out FILE.npz]

Hashes the run's training split with the model's own hash specs and compression (documents never share n-grams,
as in training) and writes {layer: counts [rows]} to DIR/row_counts.npz (default), atomically. Serve with
`--gin.ROW_COUNTS="'DIR/row_counts.npz'" --gin.DecodeConfig.hot_rows=N --gin.DecodeConfig.table_placement="'host'"`.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from engram_jax import host_table


def documents(batches, max_tokens: int) -> Iterator[np.ndarray]:
  """Packed batches {'targets', 'segment_ids'} [B, S] -> their documents (1-D), until max_tokens."""
  seen = 0
  for batch in batches:
    for row, seg in zip(np.asarray(batch["targets"]), np.asarray(batch["segment_ids"])):
      for s in np.unique(seg[seg > 0]):
        doc = row[seg == s]
        yield doc
        seen += doc.size
        if seen >= max_tokens:
          return


def main(argv: Sequence[str] | None = None) -> Path:
  from engram_jax import cli, generate
  from engram_jax.data import tasks
  from engram_jax.run_dir import load_model

  (checkpoint_path, *_), rest = generate.resolve(sys.argv[1:] if argv is None else argv, cli.COUNT_ROWS)
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--max_tokens", type=int, default=20_000_000, help="tokens of the training split to count")
  p.add_argument("--out", default=None, help="output .npz (default: MODEL_DIR/row_counts.npz)")
  args = p.parse_args(rest)
  model, record = load_model(checkpoint_path)
  layers = {i: b.engram for i, b in enumerate(model.blocks) if b.engram is not None}
  if not layers:
    raise ValueError(f"CHECKPOINT_PATH={checkpoint_path!r}: the model has no Engram layer; nothing to count")
  hashers = {i: host_table.HostHasher.from_engram(e) for i, e in layers.items()}
  batches = tasks.get_dataset(task_name=record.task, split="train", seq_len=record.seq_len, batch_size=64,
                              data_dir=record.data_dir, num_epochs=1, drop_remainder=False)
  t0 = time.perf_counter()

  def progress(n):
    print(f"\r{n:,} tokens, {n / (time.perf_counter() - t0):,.0f} tokens/s", end="", file=sys.stderr, flush=True)

  counts = host_table.count_rows(documents(batches, args.max_tokens), hashers,
                                 {i: e.num_rows for i, e in layers.items()}, progress=progress)
  print(file=sys.stderr)
  out = Path(args.out) if args.out else Path(record.model_dir) / "row_counts.npz"
  tokens = int(next(iter(counts.values())).sum() // next(iter(hashers.values())).spec.num_heads)
  host_table.save_row_counts(out, counts, tokens=tokens, step=record.step)
  for i, c in counts.items():
    top = np.sort(c)[::-1]
    share = top[:max(1, c.size // 10)].sum() / max(c.sum(), 1)
    print(f"layer {i}: {tokens:,} tokens, {np.count_nonzero(c):,} of {c.size:,} rows read; the top 10% of rows take "
          f"{100 * share:.1f}% of the reads")
  print(f"wrote {out}")
  return out


if __name__ == "__main__":
  from engram_jax import count_rows as _entry
  _entry.main()
