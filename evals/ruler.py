"""RULER-style synthetic long-context retrieval (Hsieh et al. 2024, arXiv 2404.06654), sized in tokens.

A haystack of filler sentences ("The grass is green. The sky is blue. ...") hides needles
"One of the special magic numbers for <key> is: <7 digits>." at random depths; the question follows the haystack:
  ruler_niah_single      one needle; asked for its number
  ruler_niah_multikey    four needles with different keys; asked for one key (the other keys' numbers distract)
  ruler_niah_multivalue  one key with four numbers; one document per number (the other true numbers are not
                         among its candidates)
  ruler_niah_multiquery  four needles; one document per key
  ruler_vt               variable tracking: VAR A = 12345, VAR B = A, ... (a chain of 4) beside 2 distractor chains
                         of other values; asked for every variable holding the value
Scoring: the log-likelihood rank of the gold answer among 8 candidates (acc; chance 1/8), and exact match of greedy
decoding (acc_greedy: every gold token is the model's argmax given the context and the gold prefix, which is
exactly "greedy generation starts with the answer"). Each task runs at several context lengths; a document is
context + answer and never exceeds its length, so nothing is left-truncated.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from evals.benchmarks import TaskData, TaskSpec, subsample_docs

FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
TASKS = ("ruler_niah_single", "ruler_niah_multikey", "ruler_niah_multivalue", "ruler_niah_multiquery", "ruler_vt")
CANDIDATES = 8  # answers ranked per question (gold + distractors)
NEEDLES = 4  # needles of the multi-* tasks, and the variable-tracking chain length
VT_CHAINS = 3  # variable-tracking chains: the asked one and two distractors with other values
DEFAULT_EXAMPLES = 100  # haystacks per task and length when no limit is given
_LETTERS = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ"))
_KEYS = ("amber", "basil", "cobalt", "delta", "ember", "falcon", "garnet", "harbor", "indigo", "juniper", "kestrel",
         "lantern", "meadow", "nectar", "onyx", "pepper", "quartz", "raven", "saffron", "thistle", "umber", "velvet",
         "willow", "yarrow", "zephyr")

Encode = Callable[[list[str]], list[list[int]]]


class TooShortError(ValueError):
  """A RULER context length that cannot hold the task's needles and question."""


def _number(rng, taken: set) -> str:
  while True:
    v = str(int(rng.integers(1_000_000, 10_000_000)))
    if v not in taken:
      taken.add(v)
      return v


def _needle(key: str, value: str) -> str:
  return f"One of the special magic numbers for {key} is: {value}."


def _question(key: str) -> str:
  return (f"What is the special magic number for {key} mentioned in the provided text? "
          f"The special magic number for {key} mentioned in the provided text is")


def _haystack(rng, needles: list[str], n_filler: int) -> str:
  """n_filler filler sentences (cycled) with the needles at random depths, in their given order."""
  sentences = [FILLER[i % len(FILLER)] for i in range(n_filler)]
  depths = np.sort(rng.integers(0, n_filler + 1, len(needles)))
  for offset, (d, needle) in enumerate(zip(depths, needles)):
    sentences.insert(int(d) + offset, needle)
  return " ".join(sentences)


def _fit(make: Callable[[int], str], answer_tokens: int, length: int, encode: Encode) -> str:
  """The context make(n) with the most filler whose tokens + answer_tokens fit `length` (binary search)."""
  lo, hi = 0, max(length, 1)
  fits = lambda n: len(encode([make(n)])[0]) + answer_tokens <= length  # noqa: E731
  if not fits(0):
    raise TooShortError(f"RULER length {length} is too short for the needles and the question; use a longer one")
  while lo < hi:
    mid = (lo + hi + 1) // 2
    lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
  return make(lo)


def examples(task: str, length: int, n: int, encode: Encode, seed: int = 0) -> list[tuple[str, str, list[str]]]:
  """(context, gold answer, distractor answers) for n haystacks of `length` tokens (multi-value / multi-query
  haystacks give one entry per asked number / key)."""
  if task not in TASKS:
    raise ValueError(f"unknown RULER task {task!r}; use one of {TASKS}")
  rng = np.random.default_rng([seed, TASKS.index(task), length])
  out = []
  for _ in range(n):
    taken: set = set()
    keys = [str(k) for k in rng.choice(_KEYS, NEEDLES, replace=False)]
    randoms = lambda k: [" " + _number(rng, taken) for _ in range(k)]  # noqa: E731
    if task == "ruler_vt":
      names = [["".join(rng.choice(_LETTERS, 4)) for _ in range(NEEDLES)] for _ in range(VT_CHAINS)]
      values = [str(v) for v in rng.choice(np.arange(10_000, 100_000), VT_CHAINS, replace=False)]
      chains = [[f"VAR {c[0]} = {v}."] + [f"VAR {b} = {a}." for a, b in zip(c, c[1:])] for c, v in zip(names, values)]
      turn = rng.permutation(np.repeat(np.arange(len(chains)), NEEDLES))  # interleave, each chain in its order
      needles = [chains[c].pop(0) for c in turn]
      question = (f"Find all variables that are assigned the value {values[0]} in the text above. Answer: "
                  f"According to the chain of variable assignments in the text above, the variables assigned the "
                  f"value {values[0]} are:")
      gold = " " + " ".join(names[0])
      wrong = [" " + " ".join(c) for c in names[1:]]
      wrong += [" " + " ".join("".join(rng.choice(_LETTERS, 4)) for _ in range(NEEDLES))
                for _ in range(CANDIDATES - 1 - len(wrong))]
      asks = [(question, gold, wrong)]
    elif task == "ruler_niah_multivalue":
      values = [_number(rng, taken) for _ in range(NEEDLES)]
      needles = [_needle(keys[0], v) for v in values]
      question = (f"What are all the special magic numbers for {keys[0]} mentioned in the provided text? One of the "
                  f"special magic numbers for {keys[0]} mentioned in the provided text is")
      asks = [(question, " " + v, randoms(CANDIDATES - 1)) for v in values]
    else:
      count = 1 if task == "ruler_niah_single" else NEEDLES
      values = [_number(rng, taken) for _ in range(count)]
      needles = [_needle(k, v) for k, v in zip(keys, values)]
      asked = range(count) if task == "ruler_niah_multiquery" else [0]
      asks = [(_question(keys[i]), " " + values[i],
               [" " + v for j, v in enumerate(values) if j != i] + randoms(CANDIDATES - count)) for i in asked]
    order = rng.permutation(len(needles)) if task != "ruler_vt" else np.arange(len(needles))
    needles = [needles[i] for i in order]
    answer_tokens = max(len(t) for t in encode([a[1] for a in asks] + [w for a in asks for w in a[2]]))
    hay_seed = int(rng.integers(1 << 62))  # every ask of one haystack sees the same haystack
    for question, gold, wrong in asks:
      make = lambda k, q=question: _haystack(np.random.default_rng(hay_seed), needles, k) + " " + q  # noqa: E731
      out.append((_fit(make, answer_tokens, length, encode), gold, wrong))
  return out


def build_task(task: str, length: int, limit: int | None, encode: Encode, seed: int = 0) -> TaskData:
  """A RULER task at one context length as TaskData (name '<task>@<length>', family reading)."""
  n = DEFAULT_EXAMPLES if limit is None else limit
  rows = examples(task, length, n, encode, seed)
  keep = subsample_docs(len(rows), limit)
  doc, choice, ctx, cont, gold = [], [], [], [], []
  rng = np.random.default_rng([seed, 99, length, TASKS.index(task)])
  for d, k in enumerate(keep):
    context, answer, wrong = rows[k]
    cands = [answer] + list(wrong)
    perm = rng.permutation(len(cands))
    for c, i in enumerate(perm):
      doc.append(d)
      choice.append(c)
      ctx.append(context)
      cont.append(cands[i])
    gold.append(int(np.argmax(perm == 0)))
  spec = TaskSpec(f"{task}@{length}", "reading", "ruler", "", "acc", greedy=True)
  return TaskData(spec, np.asarray(doc), np.asarray(choice), np.zeros(len(doc), bool), ctx, cont, np.asarray(gold),
                  {"source": f"synthetic RULER-style (seed {seed})", "length": length, "docs_total": len(rows)})


def documents(task: str, length: int, n: int, encode: Encode, seed: int) -> list[str]:
  """Training documents in the task's format: context + gold answer (for a training mixture; another seed than
  the evaluation's)."""
  return [context + answer for context, answer, _ in examples(task, length, n, encode, seed)]


def build_default_lengths(task: str, seq_len: int, limit: int | None, encode: Encode) -> list:
  """The task at a quarter, half and all of seq_len, leaving out (with a printed note) the lengths too short to hold
  its needles and question; an error only when none fits."""
  out = []
  for length in (seq_len // 4, seq_len // 2, seq_len):
    try:
      out.append(build_task(task, length, limit, encode))
    except TooShortError:
      print(f"{task}: length {length} is too short for the needles and the question; left out", flush=True)
  if not out:
    raise TooShortError(f"{task}: the scoring window SEQ_LEN={seq_len} is too short for its needles and question; "
                        "score at a longer SEQ_LEN or set SuiteConfig.ruler_lengths")
  return out
