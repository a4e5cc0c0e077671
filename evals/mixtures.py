"""Training mixtures of the default corpus with synthetic documents, so small models can learn the probes' facts
and formats. Importing this module (a gin file does it with `import evals.mixtures`) registers task factories:

  engram_corpus_facts_<P>        the corpus mixed with synthetic-facts biographies (evals.facts, seed 0), P% of the
                                 documents (e.g. engram_corpus_facts_10); the facts_closed probe asks about them
  engram_corpus_ruler_<P>_<S>    the corpus mixed with RULER-style documents (haystack + question + answer) of at
                                 most S tokens (lengths S/4, S/2, S; every task; another seed than the eval's), P%

The synthetic documents are tokenized with the corpus's own SentencePiece model. Rates are document rates:
synthetic documents are shorter than corpus documents, so their share of tokens is smaller.
"""

from __future__ import annotations

import dataclasses
import re

from engram_jax.data import tasks
from evals import facts, ruler

FACTS_PREFIX = "engram_corpus_facts_"
RULER_PREFIX = "engram_corpus_ruler_"
RULER_TRAIN_SEED = 1  # evaluation haystacks use seed 0
RULER_DOCS = {"train": 300, "validation": 20}  # haystacks per task and length


def _percent(name: str, text: str) -> float:
  pct = float(text)
  if not 0 < pct < 100:
    raise ValueError(f"task {name!r}: the synthetic share must be a percentage in (0, 100), got {text}")
  return pct


def _corpus_vocab(data_dir) -> str:
  """The corpus task (registered, the corpus built if missing) -> its SentencePiece model file."""
  return tasks.register_corpus_task(data_dir).output_features["targets"].vocabulary.sentencepiece_model_file


def facts_mixture(name: str, data_dir=None, config: facts.FactsConfig = facts.FactsConfig()) -> None:
  """Registers 'synthetic_facts' and the mixture `name` = engram_corpus_facts_<P>."""
  m = re.fullmatch(re.escape(FACTS_PREFIX) + r"(\d+(?:\.\d+)?)", name)
  if not m:
    raise ValueError(f"task {name!r}: expected {FACTS_PREFIX}<percent>, e.g. {FACTS_PREFIX}10")
  pct = _percent(name, m.group(1))
  vocab = _corpus_vocab(data_dir)
  world = facts.FactWorld(config)
  tasks.register_documents_task("synthetic_facts", world.documents, vocab,
                                key=("facts",) + tuple(sorted(dataclasses.asdict(config).items())))
  tasks.register_mixture(name, [(tasks.CORPUS_TASK, 100 - pct), ("synthetic_facts", pct)])


def ruler_mixture(name: str, data_dir=None) -> None:
  """Registers 'synthetic_ruler_<S>' and the mixture `name` = engram_corpus_ruler_<P>_<S>."""
  m = re.fullmatch(re.escape(RULER_PREFIX) + r"(\d+(?:\.\d+)?)_(\d+)", name)
  if not m:
    raise ValueError(f"task {name!r}: expected {RULER_PREFIX}<percent>_<max tokens>, e.g. {RULER_PREFIX}10_256")
  pct, length = _percent(name, m.group(1)), int(m.group(2))
  vocab = _corpus_vocab(data_dir)
  import sentencepiece as spm
  sp = spm.SentencePieceProcessor(model_file=vocab)
  encode = lambda texts: sp.encode(list(texts))  # noqa: E731
  cache: dict[str, list[str]] = {}

  def documents(split):
    if split not in cache:
      n = RULER_DOCS[split]
      seed = RULER_TRAIN_SEED if split == "train" else RULER_TRAIN_SEED + 1
      cache[split] = [d for t in ruler.TASKS for n_tok in (length // 4, length // 2, length)
                      for d in ruler.documents(t, n_tok, n, encode, seed)]
    return cache[split]

  task = f"synthetic_ruler_{length}"
  tasks.register_documents_task(task, documents, vocab, key=("ruler", length, RULER_TRAIN_SEED))
  tasks.register_mixture(name, [(tasks.CORPUS_TASK, 100 - pct), (task, pct)])


tasks.register_task_factory(FACTS_PREFIX, facts_mixture)
tasks.register_task_factory(RULER_PREFIX, ruler_mixture)
