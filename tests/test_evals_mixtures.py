"""Training mixtures of the corpus with synthetic documents: registered by name through a factory, mixed at the
given document rate, deterministic, and usable from a gin file."""

import sys

import numpy as np
import pytest

from engram_jax import configurables
from engram_jax.data import packing
from task_registry import registered_tasks_removed  # tests/ is on sys.path
from toy_corpus import build_toy_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("corpus")
  build_toy_corpus(data_dir, num_docs=300, seed=1)
  return str(data_dir)


@pytest.fixture(autouse=True)
def restore_task_registry():
  """Tasks and mixtures registered here (pointing into tmp dirs) are removed afterwards."""
  with registered_tasks_removed():
    yield


def test_mixed_documents_follow_the_rates_and_are_deterministic():
  a = [np.array([1, i]) for i in range(300)]
  b = [np.array([2, i]) for i in range(10)]
  fn = packing.mixed_documents([a, b], [80, 20], seed=0)
  docs = list(fn(0))
  share = np.mean([d[0] == 2 for d in docs])
  assert 0.15 < share < 0.25  # 20% of the documents
  assert sorted(int(d[1]) for d in docs if d[0] == 1) == list(range(300))  # the main source once per epoch
  assert [d.tolist() for d in fn(0)] == [d.tolist() for d in docs] and [d.tolist() for d in fn(1)] != \
      [d.tolist() for d in docs]
  halves = [list(packing.mixed_documents([a, b], [80, 20], 0, shard_index=i, num_shards=2)(0)) for i in (0, 1)]
  assert len(halves[0]) + len(halves[1]) == len(docs)
  with pytest.raises(ValueError, match="one rate > 0"):
    packing.mixed_documents([a, []], [1, 1], 0)


def test_facts_mixture_batches_contain_the_synthetic_biographies(corpus):
  import evals.mixtures  # noqa: F401  registers the factories
  from engram_jax.data import tasks
  from evals import facts
  it = tasks.get_dataset("engram_corpus_facts_30", "train", seq_len=64, batch_size=4, seed=0, data_dir=corpus)
  assert it.info["rates"] == {"engram_corpus_en": 70.0, "synthetic_facts": 30.0}
  assert it.info["docs"]["synthetic_facts"] == facts.FactsConfig().num_entities * facts.FactsConfig().docs_per_entity
  vocab = tasks.get_vocabulary("engram_corpus_facts_30", corpus)
  text = " ".join(vocab.decode(row.tolist()) for b in [next(it) for _ in range(6)] for row in b["targets"])
  world = facts.FactWorld()
  assert any(n in text for n in world.names)  # some biographies made it into the batches
  again = tasks.get_dataset("engram_corpus_facts_30", "train", seq_len=64, batch_size=4, seed=0, data_dir=corpus)
  np.testing.assert_array_equal(next(again)["targets"], next(tasks.get_dataset(
      "engram_corpus_facts_30", "train", seq_len=64, batch_size=4, seed=0, data_dir=corpus))["targets"])
  with pytest.raises(ValueError, match="percentage in \\(0, 100\\)"):
    tasks.get_dataset("engram_corpus_facts_100", "train", seq_len=64, batch_size=4, data_dir=corpus)


def test_gin_file_imports_the_mixtures_and_names_one():
  sys.modules.pop("evals.mixtures", None)
  model, run, _ = configurables.resolve("train", ["configs/experiments/quickstart_facts.gin"])
  assert run.task == "engram_corpus_facts_10" and "evals.mixtures" in sys.modules
  assert model.engram_layers
