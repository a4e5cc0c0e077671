"""Every test runs on a fake 8-device CPU mesh; the flag must be set before jax is imported. Shared fixtures: the
toy corpus and one finished tiny training run (built once per test process, only by the tests that ask)."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import pytest  # noqa: E402

assert jax.device_count() == 8, "tests expect 8 fake CPU devices; was jax imported before conftest set XLA_FLAGS?"


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
  """~400 short documents of a 26-word language with a 300-piece SentencePiece vocabulary."""
  from toy_corpus import build_toy_corpus  # tests/ is on sys.path (pytest rootdir-relative import)
  data_dir = tmp_path_factory.mktemp("corpus")
  manifest = build_toy_corpus(data_dir, num_docs=400, seed=0)
  assert manifest["vocab"]["vocab_size"] <= 320
  return str(data_dir)


@pytest.fixture(scope="session")
def straight(corpus, tmp_path_factory):
  """STEPS uninterrupted steps of the tiny Engram+MoE model: (model_dir, result)."""
  from engram_jax import train
  from tiny_run import tiny_model, tiny_run
  model_dir = tmp_path_factory.mktemp("straight")
  return model_dir, train.train_and_evaluate(tiny_model(), tiny_run(corpus), model_dir)
