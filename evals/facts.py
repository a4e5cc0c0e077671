"""Synthetic facts: a seeded world of fictional people with attributes, training documents that state the facts,
and two probes over it (the controlled form of the factual-knowledge vs reading-comprehension contrast of the
Engram paper's Engram-off study, arXiv 2601.07372):

  facts_closed  closed-book recall: '<name> was born in' -> ' <city>' ranked among every city; the fact appears
                only in the training documents (parametric knowledge).
  facts_open    open-book recall: the context states the fact (and one about another person) for people who are
                never in the training documents, then asks it the same way (reading).

Every fact is a sentence from a template; `parse_sentence` reads a sentence back into (name, attribute, value).
Training documents (`documents`) are short biographies: all of a person's attributes, each from a randomly chosen
template, in random order; each person gets `docs_per_entity` such documents. Everything is a function of the seed.
"""

from __future__ import annotations

import dataclasses
import re
from functools import cached_property

import numpy as np

from evals.benchmarks import TaskData, TaskSpec

# attribute -> (values, statement templates). Template 0 is also the probe's cloze: its text up to '{value}', which
# ends it (so cloze + ' ' + value + '.' is the statement).
ATTRIBUTES = {
    "city": (("Lisbon", "Oslo", "Cairo", "Lima", "Dublin", "Kyoto", "Prague", "Quito", "Tunis", "Perth"),
             ("{name} was born in {value}.", "The birthplace of {name} is {value}.",
              "{name} grew up in {value}.")),
    "job": (("baker", "sailor", "painter", "farmer", "doctor", "teacher", "miner", "weaver", "judge", "poet"),
            ("{name} works as a {value}.", "By trade, {name} is a {value}.", "{name} earns a living as a {value}.")),
    "colour": (("red", "blue", "green", "yellow", "purple", "orange", "black", "white"),
               ("The favourite colour of {name} is {value}.", "{name} likes the colour {value} best.",
                "Above all colours, {name} prefers {value}.")),
    "pet": (("cat", "dog", "parrot", "horse", "goat", "rabbit", "tortoise", "owl"),
            ("The pet of {name} is a {value}.", "{name} keeps a {value} as a pet.",
             "At home, {name} looks after a {value}.")),
    "instrument": (("harp", "violin", "drum", "flute", "lute", "trumpet", "organ", "cello"),
                   ("{name} plays the {value}.", "The instrument of {name} is the {value}.",
                    "In the evenings {name} practises the {value}.")),
}
assert all(t[0].endswith("{value}.") for _, t in ATTRIBUTES.values())
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kl", "st", "th")
_NUCLEI = ("a", "e", "i", "o", "u", "ai", "ea", "ou")
_CODAS = ("", "", "n", "r", "s", "l", "th", "x")


@dataclasses.dataclass(frozen=True)
class FactsConfig:
  """The synthetic world: who exists and how often training documents state their facts."""

  seed: int = 0  # Everything (names, attributes, phrasings) is a function of the seed.
  num_entities: int = 300  # People in the training documents (closed-book probe subjects).
  num_heldout: int = 100  # People never in training (open-book probe subjects).
  docs_per_entity: int = 4  # Training biographies per person (repetition drives memorisation).
  attributes: tuple[str, ...] = tuple(ATTRIBUTES)  # Which attributes every person has.

  def __post_init__(self):
    if self.num_entities < 1 or self.num_heldout < 2 or self.docs_per_entity < 1:
      raise ValueError("FactsConfig: num_entities >= 1, num_heldout >= 2 and docs_per_entity >= 1 are required")
    bad = [a for a in self.attributes if a not in ATTRIBUTES]
    if bad:
      raise ValueError(f"FactsConfig.attributes: unknown {bad}; choose from {sorted(ATTRIBUTES)}")


def _name(rng: np.random.Generator) -> str:
  word = lambda k: "".join(rng.choice(_ONSETS) + rng.choice(_NUCLEI) + rng.choice(_CODAS)  # noqa: E731
                           for _ in range(k)).capitalize()
  return f"{word(int(rng.integers(1, 3)))} {word(2)}"


class FactWorld:
  """The people and their facts for a FactsConfig (deterministic)."""

  def __init__(self, config: FactsConfig = FactsConfig()):
    self.config = config
    rng = np.random.default_rng([config.seed, 0])
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < config.num_entities + config.num_heldout:
      n = _name(rng)
      if n not in seen:
        seen.add(n)
        names.append(n)
    self.names = names[:config.num_entities]  # in training
    self.heldout = names[config.num_entities:]  # never in training
    self.facts = {n: {a: str(rng.choice(ATTRIBUTES[a][0])) for a in config.attributes} for n in names}

  def biography(self, name: str, rng: np.random.Generator) -> str:
    """One document: every attribute of `name`, each from a random template, in random order."""
    attrs = list(self.config.attributes)
    order = rng.permutation(len(attrs))
    sentences = []
    for i in order:
      a = attrs[i]
      templates = ATTRIBUTES[a][1]
      sentences.append(templates[int(rng.integers(len(templates)))].format(name=name, value=self.facts[name][a]))
    return " ".join(sentences)

  def documents(self, split: str) -> list[str]:
    """'train': docs_per_entity biographies per training person (shuffled); 'validation': one more per person,
    from another random stream (the same facts, new phrasings)."""
    if split not in ("train", "validation"):
      raise ValueError(f"split={split!r}: use 'train' or 'validation'")
    rng = np.random.default_rng([self.config.seed, 1 if split == "train" else 2])
    reps = self.config.docs_per_entity if split == "train" else 1
    docs = [self.biography(n, rng) for _ in range(reps) for n in self.names]
    return [docs[i] for i in rng.permutation(len(docs))]

  @cached_property
  def _patterns(self) -> list[tuple[str, re.Pattern]]:
    out = []
    for a in self.config.attributes:
      values = "|".join(re.escape(v) for v in ATTRIBUTES[a][0])
      for t in ATTRIBUTES[a][1]:
        pat = re.escape(t).replace(re.escape("{name}"), r"(?P<name>[A-Z][a-z]+ [A-Z][a-z]+)").replace(
            re.escape("{value}"), f"(?P<value>{values})")
        out.append((a, re.compile(pat)))
    return out

  def parse_sentence(self, text: str) -> tuple[str, str, str] | None:
    """A statement sentence -> (name, attribute, value), or None if no template matches it."""
    for a, pat in self._patterns:
      m = pat.fullmatch(text.strip())
      if m:
        return m.group("name"), a, m.group("value")
    return None

  def parse_document(self, doc: str) -> list[tuple[str, str, str]]:
    """Every sentence of a document, parsed (sentences end with '.')."""
    return [self.parse_sentence(s) for s in re.split(r"(?<=\.)\s+", doc.strip()) if s]


def cloze(attribute: str, name: str) -> str:
  """The probe's question: template 0 of the attribute up to its value ('<name> was born in')."""
  return ATTRIBUTES[attribute][1][0].split("{value}")[0].format(name=name).rstrip()


def _probe(world: FactWorld, names: list[str], open_book: bool, limit: int | None, name: str) -> TaskData:
  from evals.benchmarks import subsample_docs
  rng = np.random.default_rng([world.config.seed, 3 if open_book else 4])
  docs = [(n, a) for n in names for a in world.config.attributes]
  keep = subsample_docs(len(docs), limit)
  doc, choice, ctx, cont, gold = [], [], [], [], []
  for d, k in enumerate(keep):
    person, attr = docs[k]
    question = cloze(attr, person)
    if open_book:  # the fact, plus one fact of the same attribute about another held-out person, in random order
      other = names[(names.index(person) + 1 + int(rng.integers(len(names) - 1))) % len(names)]
      stated = [ATTRIBUTES[attr][1][0].format(name=p, value=world.facts[p][attr]) for p in (person, other)]
      question = " ".join(stated[::-1] if rng.integers(2) else stated) + " " + question
    values = ATTRIBUTES[attr][0]
    for c, v in enumerate(values):
      doc.append(d)
      choice.append(c)
      ctx.append(question)
      cont.append(" " + v)
    gold.append(values.index(world.facts[person][attr]))
  spec = TaskSpec(name, "reading" if open_book else "knowledge", "facts", "", "acc")
  return TaskData(spec, np.asarray(doc), np.asarray(choice), np.zeros(len(doc), bool), ctx, cont,
                  np.asarray(gold), {"source": f"synthetic facts (seed {world.config.seed})",
                                     "docs_total": len(docs)})


def probe_task(name: str, limit: int | None = None, config: FactsConfig = FactsConfig()) -> TaskData:
  """'facts_closed' (training people, no context) or 'facts_open' (held-out people, the fact in the context)."""
  world = FactWorld(config)
  if name == "facts_closed":
    return _probe(world, world.names, False, limit, name)
  if name == "facts_open":
    return _probe(world, world.heldout, True, limit, name)
  raise ValueError(f"unknown facts probe {name!r}; use 'facts_closed' or 'facts_open'")
