"""Corpus directories are safe: prepare writes only into a directory it created; a shard/manifest mismatch is an
error naming the files (never a rebuild); changed arguments need --force; your own text (.txt / .jsonl) becomes
the same shards, manifest and tokenizer, with bad bytes repaired and counted and huge documents split in bounded
memory. No network: only --text_files corpora are built here."""

import json
import tracemalloc

import pytest

from engram_jax.data import prepare, shards, sources

WORDS = "the old river runs past a quiet mill where seven grey geese sleep under green willow trees".split()


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError(f"test tried to download {args}")
  monkeypatch.setattr(sources, "_pip_download", refuse)


def _text_files(tmp_path):
  txt = tmp_path / "a.txt"
  lines = [f"line {i}: " + " ".join(WORDS[(i + j) % len(WORDS)] for j in range(12 + i % 7)) + "." for i in range(150)]
  txt.write_bytes(("\n".join(lines[:75]) + "\n\n   \n").encode() + b"a bad \xff byte here\n" +
                  ("\n".join(lines[75:]) + "\n").encode())
  jsonl = tmp_path / "b.jsonl"
  records = [json.dumps({"id": i, "text": f"record {i}: " + " ".join(WORDS[i % 5:i % 5 + 8])}) for i in range(40)]
  jsonl.write_text("\n".join(records + ["{not json", json.dumps({"other": "no text field"})]) + "\n")
  return [str(txt), str(jsonl)], lines


def _build(tmp_path, data_dir, **kw):
  files, lines = _text_files(tmp_path)
  return prepare.prepare(data_dir, text_files=files, vocab_size=kw.pop("vocab_size", 400), **kw), files, lines


def _snapshot(directory):
  return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}


def test_text_files_become_a_corpus_with_counts(tmp_path):
  data_dir = tmp_path / "mine"
  manifest, files, lines = _build(tmp_path, data_dir)
  docs = [d for s in shards.SPLITS for f in shards.split_files(data_dir, manifest, s) for d in shards.read_lines(f)]
  assert sorted(docs) == sorted(lines + ["a bad \ufffd byte here"] +
                                [f"record {i}: " + " ".join(WORDS[i % 5:i % 5 + 8]) for i in range(40)])
  assert manifest["skipped_lines"] == {"empty": 2, "non_utf8": 0, "repaired": 1, "split": 0, "invalid_json": 2}
  assert manifest["created_by"] == prepare.CREATED_BY and (data_dir / "spm.model").is_file()
  assert [f["docs"] for f in manifest["sources"]["text_files"]["files"]] == [151, 40]
  assert "repaired" in prepare.corpus_summary(manifest)
  assert prepare.prepare(data_dir, text_files=files, vocab_size=400) == manifest  # same arguments: nothing to do
  assert not list(tmp_path.glob(".mine.*"))  # no build directory left behind


def test_custom_corpus_with_stale_manifest_is_refused_never_overwritten(tmp_path):
  data_dir = tmp_path / "mine"
  manifest, files, _ = _build(tmp_path, data_dir)
  shard = data_dir / manifest["splits"]["train"]["shards"][0]["file"]
  shard.write_text(shard.read_text() + "my own extra line\n")
  before = _snapshot(data_dir)
  for call in (lambda: prepare.ensure_corpus(data_dir), lambda: prepare.prepare(data_dir, text_files=files,
                                                                                vocab_size=400)):
    with pytest.raises(prepare.CorpusError, match=rf"(?s)files do not match manifest.json:\n  {shard}: sha256 "
                                                   r".*Nothing was changed.*--force"):
      call()
  assert _snapshot(data_dir) == before


def test_changed_arguments_need_force_and_force_rebuilds_only_our_corpus(tmp_path):
  data_dir = tmp_path / "mine"
  _, files, _ = _build(tmp_path, data_dir)
  with pytest.raises(prepare.CorpusError, match=r"built with other arguments:\n  vocab_size: 400 -> 350"):
    prepare.prepare(data_dir, text_files=files, vocab_size=350)
  rebuilt = prepare.prepare(data_dir, text_files=files, vocab_size=350, force=True)
  assert rebuilt["args"]["vocab_size"] == 350 and prepare.check_corpus(data_dir) == rebuilt
  # A corpus of an earlier version (no created_by / args): used read-only, never rebuilt.
  manifest = json.loads((data_dir / "manifest.json").read_text())
  del manifest["created_by"], manifest["args"]
  manifest["sources"] = {"wiki": {}, "kjv": {}, "shakespeare": {}}
  (data_dir / "manifest.json").write_text(json.dumps(manifest))
  assert prepare.prepare(data_dir, vocab_size=350) == manifest  # default sources, same derived arguments
  with pytest.raises(prepare.CorpusError, match=r"vocab_size: 350 -> 8192"):
    prepare.prepare(data_dir)
  before = _snapshot(data_dir)
  with pytest.raises(prepare.CorpusError, match=r"--force: .* never rebuilt or deleted"):
    prepare.prepare(data_dir, force=True)
  assert _snapshot(data_dir) == before


def test_directory_without_manifest_is_never_written(tmp_path):
  (tmp_path / "notes.txt").write_text("mine")
  with pytest.raises(prepare.CorpusError, match=r"holds \['notes.txt'\] but no readable manifest.json"):
    prepare.ensure_corpus(tmp_path)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_50mb_document_is_split_in_bounded_memory(tmp_path):
  path = tmp_path / "huge.txt"
  word = b"abcdefghi "
  with open(path, "wb") as f:
    for _ in range(50):
      f.write(word * 100_000)  # 1 MB at a time: 50 MB, one line
    f.write(b"\nsmall doc\n")
  counts = sources.SkipCounts()
  tracemalloc.start()
  n_docs = n_chars = 0
  for doc in sources.text_file_documents(path, counts, max_doc_chars=100_000):
    n_docs += 1
    n_chars += len(doc) + 1
  peak = tracemalloc.get_traced_memory()[1]
  tracemalloc.stop()
  assert peak < 8_000_000, f"peak {peak / 1e6:.1f} MB for a 50 MB line"
  assert 501 <= n_docs <= 503 and counts.split == 1 and abs(n_chars - 50_000_011) < 1000


def test_cli_builds_from_text_files_and_refuses_changed_arguments(tmp_path, capsys):
  files, _ = _text_files(tmp_path)
  data_dir = tmp_path / "cli"
  prepare.main([f"--text_files={','.join(files)}", f"--data_dir={data_dir}", "--vocab_size=400"])
  out = capsys.readouterr().out
  assert "text_files" in out and "repaired" in out and prepare.check_corpus(data_dir) is not None
  with pytest.raises(SystemExit) as e:
    prepare.main([f"--text_files={','.join(files)}", f"--data_dir={data_dir}", "--vocab_size=4096"])
  assert e.value.code == 2 and "vocab_size: 400 -> 4096" in capsys.readouterr().err
