"""The corpus format: shard lines, seeded train/validation shards and the SentencePiece vocabulary.

Shard format (`{split}-{i:05d}-of-{n:05d}.txt`, UTF-8): ONE DOCUMENT PER LINE. A newline inside a document is
stored as the two characters backslash + 'n'; the cleaners remove every backslash from the text, so
`line.replace('\\n', '\n')` (see `decode_line`) restores the document exactly. Documents are deduplicated,
shuffled with `seed` and dealt round-robin to shards, so any shard or prefix is a random sample.
Shards are read line by line as bytes: empty and non-UTF-8 lines are skipped and counted, never fatal.
"""

from __future__ import annotations

import contextlib
import io
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from engram_jax.data.progress import Heartbeat
from engram_jax.data.sources import SkipCounts, _sha256, clean_text
from engram_jax.vocab import sentencepiece_fingerprint

SP_MB_PER_S_PER_THREAD = 0.35  # SentencePiece unigram training here: about 20 MB in 30 s on 2 cores

VOCAB_PREFIX = "spm"  # -> spm.model, spm.vocab
SPLITS = ("train", "validation")


# ----------------------------------------------------------------------------------------------- line I/O


def encode_line(doc: str) -> str:
  """Document -> one shard line (no trailing newline). The document must contain no backslash or CR."""
  if "\\" in doc or "\r" in doc:
    raise ValueError("encode_line: document contains a backslash or CR; run it through clean_text first")
  return doc.replace("\n", "\\n")


def decode_line(line: str) -> str:
  """Shard line -> document (inverse of `encode_line`)."""
  return line.replace("\\n", "\n")


def read_lines(path: str | os.PathLike, skipped: SkipCounts | None = None) -> Iterator[str]:
  """Yields the decoded documents of a shard file; empty/whitespace and non-UTF-8 lines are counted in `skipped`."""
  skipped = skipped if skipped is not None else SkipCounts()
  with open(path, "rb") as f:
    for raw in f:
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError:
        skipped.non_utf8 += 1
        continue
      line = line.rstrip("\r\n")
      if not line.strip():
        skipped.empty += 1
        continue
      yield decode_line(line)


# ----------------------------------------------------------------------------------------------- shards


def write_shards(
  docs_by_source: dict[str, Sequence[str]],
  out_dir: Path,
  *,
  seed: int = 0,
  num_train_shards: int = 8,
  validation_fraction: float = 0.02,
) -> dict:
  """Dedups, shuffles (seeded) and writes train/validation shards. Returns the manifest's 'splits' entry.

  Every source contributes `validation_fraction` of its documents (at least one) to validation.
  """
  rng = np.random.default_rng(seed)
  split_docs: dict[str, list[str]] = {s: [] for s in SPLITS}
  seen: set[str] = set()
  for name in sorted(docs_by_source):
    docs = [d for d in (clean_text(d) for d in docs_by_source[name]) if d and not (d in seen or seen.add(d))]
    order = rng.permutation(len(docs))
    n_val = min(len(docs) - 1, max(1, round(validation_fraction * len(docs)))) if len(docs) > 1 else 0
    split_docs["validation"] += [docs[i] for i in order[:n_val]]
    split_docs["train"] += [docs[i] for i in order[n_val:]]
  out_dir.mkdir(parents=True, exist_ok=True)
  splits = {}
  for split, n_shards in (("train", num_train_shards), ("validation", 1)):
    docs = split_docs[split]
    docs = [docs[i] for i in rng.permutation(len(docs))]
    shards = []
    for k in range(n_shards):
      path = out_dir / f"{split}-{k:05d}-of-{n_shards:05d}.txt"
      part = docs[k::n_shards]
      path.write_text("".join(encode_line(d) + "\n" for d in part), encoding="utf-8")  # a directory being built
      shards.append({"file": path.name, "docs": len(part), "bytes": path.stat().st_size, "sha256": _sha256(path)})
    splits[split] = {"docs": len(docs), "bytes": sum(s["bytes"] for s in shards), "shards": shards}
  return splits


def split_files(data_dir: str | os.PathLike, manifest: dict, split: str) -> list[str]:
  """Absolute shard paths of `split` ('train' | 'validation') listed in a manifest."""
  if split not in manifest["splits"]:
    raise ValueError(f"split={split!r} not in the corpus manifest; choose one of {sorted(manifest['splits'])}")
  from engram_jax import fileio  # local or gs:// corpus directories
  return [str(fileio.as_path(data_dir) / s["file"]) for s in manifest["splits"][split]["shards"]]


# ----------------------------------------------------------------------------------------------- vocabulary


def _sentences(paths: Iterable[str], skipped: SkipCounts, max_chars: int) -> Iterator[str]:
  """Training sentences for SentencePiece: the lines of each document, long ones cut at spaces."""
  for path in paths:
    for doc in read_lines(path, skipped):
      for line in doc.split("\n"):
        while len(line) > max_chars:
          cut = line.rfind(" ", 0, max_chars)
          cut = cut if cut > 0 else max_chars
          yield line[:cut]
          line = line[cut:].lstrip()
        if line:
          yield line


def train_sentencepiece(
  paths: Sequence[str],
  model_prefix: Path,
  *,
  vocab_size: int = 8192,
  model_type: str = "unigram",
  input_sentence_size: int = 300_000,
  seed: int = 0,
  num_threads: int = 2,
  log: Callable[[str], None] | None = None,
) -> dict:
  """Trains a seqio-compatible SentencePiece model (pad=0, eos=1, unk=2, no bos, byte fallback).

  Returns the manifest's 'vocab' entry. `input_sentence_size` sentences are sampled (bounds time and memory).
  With `log`, a heartbeat line (elapsed, MB, ETA) is logged every few seconds while SentencePiece trains.
  """
  import sentencepiece as spm  # no TensorFlow

  skipped = SkipCounts()
  t0 = time.perf_counter()
  sentences = list(_sentences(paths, skipped, max_chars=4000))
  if len(sentences) > input_sentence_size:  # our own seeded sample: SentencePiece's sampler is not reproducible
    keep = np.sort(np.random.default_rng(seed).choice(len(sentences), input_sentence_size, replace=False))
    sentences = [sentences[i] for i in keep]
  spm.set_random_generator_seed(seed)
  size_mb = sum(len(x) for x in sentences) / 1e6
  expected_s = 2.0 + size_mb / (SP_MB_PER_S_PER_THREAD * max(num_threads, 1))
  beat = (Heartbeat(log, f"corpus: SentencePiece {vocab_size}-piece {model_type}", size_mb=size_mb,
                    expected_s=expected_s) if log else contextlib.nullcontext())
  with beat:
    _train_spm(spm, sentences, model_prefix, vocab_size, model_type, num_threads)
  seconds = time.perf_counter() - t0
  model = Path(f"{model_prefix}.model")
  sp = spm.SentencePieceProcessor(model_file=str(model))
  return {
    "file": model.name,
    "sha256": _sha256(model),  # reproducible: the file records no path (see _train_spm)
    "vocab_size": sp.get_piece_size(),
    "pieces_sha256": sentencepiece_fingerprint(model.read_bytes()),
    "requested_vocab_size": vocab_size,
    "model_type": model_type,
    "pad_id": 0,
    "eos_id": 1,
    "unk_id": 2,
    "bos_id": -1,
    "byte_fallback": True,
    "input_sentence_size": input_sentence_size,
    "train_seconds": round(seconds, 2),
    "skipped_lines": skipped.as_dict(),
  }


def _train_spm(spm, sentences: list[str], model_prefix: Path, vocab_size: int, model_type: str,
               num_threads: int) -> None:
  """Writes `<model_prefix>.model` and `.vocab`. The model is serialised through `model_writer`, so it records no
  training path: the same sentences give the same bytes in any directory (the corpus is built in a temporary one)."""
  writer = io.BytesIO()
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(sentences),
    model_writer=writer,
    vocab_size=vocab_size,
    model_type=model_type,
    character_coverage=0.9999,
    byte_fallback=True,
    pad_id=0,
    eos_id=1,
    unk_id=2,
    bos_id=-1,
    input_sentence_size=0,
    shuffle_input_sentence=False,
    max_sentence_length=16384,
    num_threads=num_threads,
    minloglevel=2,
    hard_vocab_limit=False,
  )
  Path(f"{model_prefix}.model").write_bytes(writer.getvalue())
  sp = spm.SentencePieceProcessor(model_proto=writer.getvalue())
  Path(f"{model_prefix}.vocab").write_text(
    "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.get_piece_size())), encoding="utf-8")
