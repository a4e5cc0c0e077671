"""gs:// run directories and corpora go through etils.epath: the same code is exercised here with gs:// paths that
a mocked epath backend maps to a local directory (run record, metrics.jsonl, plots, result JSON, corpus checks).
Orbax arrays (tensorstore) and seqio reads (tf.io.gfile) have their own GCS drivers and are not mocked."""

import contextlib
import os
import shutil
from unittest import mock

import numpy as np
from etils import epath
from etils.epath import gpath
from etils.epath import testing as epath_testing

from engram_jax import fileio, hashing, run_dir
from engram_jax.data import prepare, shards
from engram_jax.metrics_io import Logger, plot_curves, read_records
from engram_jax.run_config import RunConfig
from tiny_run import tiny_model  # tests/ is on sys.path (pytest rootdir-relative import)


@contextlib.contextmanager
def fake_gcs(root):
  """gs://BUCKET/x -> root/BUCKET/x for every epath operation."""
  prefix = f"{root}/"
  to_local = lambda p: os.fspath(p).replace("gs://", prefix, 1) if os.fspath(p).startswith("gs://") else p
  to_gs = lambda p: os.fspath(p).replace(prefix, "gs://", 1)
  one = lambda fn, path, *a, **k: fn(to_local(path), *a, **k)
  two = lambda fn, src, dst, *a, **k: fn(to_local(src), to_local(dst), *a, **k)

  def walk(fn, top, **k):
    for base, dirs, files in fn(to_local(top), **k):
      yield to_gs(base), dirs, files

  # etils picks its TensorFlow backend for gs:// whenever TF is importable: route gs:// to the mocked one instead.
  with mock.patch.object(gpath, "_is_tf_installed", lambda: False), epath_testing.mock_epath(exists=one, isdir=one, listdir=one, makedirs=one, mkdir=one, open=one, remove=one,
                                rmtree=one, stat=one, walk=walk, copy=two, rename=two, replace=two,
                                glob=lambda fn, p: [to_gs(x) for x in fn(to_local(p))]):
    yield


def test_run_directory_files_on_gs(tmp_path):
  with fake_gcs(tmp_path):
    model_dir = fileio.as_path("gs://bucket/run")
    assert fileio.is_remote(model_dir) and str(model_dir) == "gs://bucket/run"
    config = tiny_model()
    compression = hashing.identity_compression(config.vocab_size)
    record = run_dir.new_record(model_dir, config, RunConfig(), compression=compression, tokenizer_sha256="ab" * 32,
                                data_dir="gs://bucket/corpus")
    run_dir.write_record(record, tokenizer_bytes=b"spm")
    back = run_dir.read_record("gs://bucket/run")
    assert back.model_config == config and back.hash_specs == record.hash_specs
    np.testing.assert_array_equal(back.compression, compression)
    assert back.tokenizer_path == "gs://bucket/run/tokenizer.model"
    logger = Logger(model_dir, True)
    logger.write(1, {"loss": 2.5})
    logger.write(2, {"loss": float("inf")})
    logger.close()
    assert read_records("gs://bucket/run/metrics.jsonl") == [{"step": 1, "loss": 2.5}, {"step": 2, "loss": None}]
    plot_curves(model_dir / "loss_curve.png", [(1, 2.5)], [(1, 2.6)], "run")
    assert (model_dir / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
  assert (tmp_path / "bucket" / "run" / "run_record.json").is_file()  # where the fake bucket keeps it
  assert not list(tmp_path.glob("bucket/run/.*.tmp"))  # object stores: written in place, no temp names


def test_corpus_checks_on_gs(corpus, tmp_path):
  shutil.copytree(corpus, tmp_path / "bucket" / "corpus")
  with fake_gcs(tmp_path):
    manifest = prepare.check_corpus("gs://bucket/corpus")
    assert manifest == prepare.check_corpus(corpus)
    files = shards.split_files("gs://bucket/corpus", manifest, "train")
    assert files[0].startswith("gs://bucket/corpus/train-00000-of-")
    assert epath.Path(files[0]).read_bytes() == (tmp_path / "bucket" / "corpus" / os.path.basename(files[0])).read_bytes()
