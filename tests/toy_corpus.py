"""A tiny offline corpus for training tests: short documents of a 26-word language, a 300-piece vocabulary."""

import numpy as np

from engram_jax.data import prepare

WORDS = ("the cat sat on a mat and a dog ran far away from the big red house with a green door in the small "
         "town by the river").split()


def build_toy_corpus(data_dir, num_docs: int, seed: int) -> dict:
  """Writes shards, manifest and a 300-piece SentencePiece model to data_dir; returns the manifest."""
  rng = np.random.default_rng(seed)
  docs = [" ".join(rng.choice(WORDS, size=int(rng.integers(20, 80)))) + "." for _ in range(num_docs)]
  return prepare.build_corpus(data_dir, {"toy": docs}, {"toy": {"license": "test"}}, vocab_size=300,
                              num_train_shards=2, validation_fraction=0.05)
