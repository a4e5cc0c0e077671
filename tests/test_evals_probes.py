"""Synthetic probes: the facts world (deterministic, parses back, probes ask what the documents state) and the
RULER-style tasks (sized in tokens, the answer is in the haystack, distractors as specified)."""

import re

import numpy as np
import pytest

from evals import facts, ruler

SMALL = facts.FactsConfig(seed=3, num_entities=40, num_heldout=10, docs_per_entity=2)


def word_encode(texts):
  """A whitespace tokenizer (ids are irrelevant here: only lengths matter)."""
  return [[len(w) for w in t.split()] for t in texts]


def test_fact_world_is_deterministic_and_seeded():
  a, b, c = facts.FactWorld(SMALL), facts.FactWorld(SMALL), facts.FactWorld(facts.FactsConfig(seed=4))
  assert a.documents("train") == b.documents("train") and a.facts == b.facts
  assert a.names != c.names
  assert facts.probe_task("facts_open", 5, SMALL).contexts == facts.probe_task("facts_open", 5, SMALL).contexts


def test_training_documents_parse_back_to_the_facts():
  world = facts.FactWorld(SMALL)
  docs = world.documents("train")
  assert len(docs) == 40 * 2
  seen = set()
  for doc in docs:
    parsed = world.parse_document(doc)
    assert len(parsed) == len(SMALL.attributes) and None not in parsed
    (name,) = {p[0] for p in parsed}
    for _, attr, value in parsed:
      assert world.facts[name][attr] == value
      seen.add((name, attr))
  assert seen == {(n, a) for n in world.names for a in SMALL.attributes}  # every fact is stated somewhere
  assert not any(h in doc for h in world.heldout for doc in docs)  # held-out people never appear
  assert world.documents("validation") != docs[:40] and len(world.documents("validation")) == 40


def test_closed_book_probe_asks_training_facts_without_context():
  world = facts.FactWorld(SMALL)
  task = facts.probe_task("facts_closed", None, SMALL)
  assert task.num_docs == 40 * len(SMALL.attributes) and task.spec.family == "knowledge"
  for d in range(task.num_docs):
    rows = np.flatnonzero(task.doc == d)
    gold_row = rows[task.choice[rows] == task.gold[d]][0]
    name, attr, value = world.parse_sentence(task.contexts[gold_row] + task.continuations[gold_row] + ".")
    assert name in world.names and world.facts[name][attr] == value
    assert len(rows) == len(facts.ATTRIBUTES[attr][0])  # ranked among every value of the attribute


def test_open_book_probe_states_the_fact_of_a_held_out_person_then_asks_it():
  world = facts.FactWorld(SMALL)
  task = facts.probe_task("facts_open", None, SMALL)
  assert task.spec.family == "reading" and task.num_docs == 10 * len(SMALL.attributes)
  for d in range(task.num_docs):
    rows = np.flatnonzero(task.doc == d)
    gold_row = rows[task.choice[rows] == task.gold[d]][0]
    context = task.contexts[gold_row]
    stated = [world.parse_sentence(s) for s in re.findall(r"[^.]+\.", context)]
    assert len(stated) == 2 and all(p is not None and p[0] in world.heldout for p in stated)
    question = context.split(".")[-1].strip()
    name, attr, value = world.parse_sentence(question + task.continuations[gold_row] + ".")
    assert (name, attr, value) in stated  # the answer is in the context


def test_unknown_probe_and_bad_config_fail_clearly():
  with pytest.raises(ValueError, match="use 'facts_closed' or 'facts_open'"):
    facts.probe_task("facts_middle")
  with pytest.raises(ValueError, match="unknown \\['height'\\]"):
    facts.FactsConfig(attributes=("height",))


@pytest.mark.parametrize("task", ruler.TASKS)
def test_ruler_documents_fit_their_length_and_hide_the_answer(task):
  length = 300
  data = ruler.build_task(task, length, 6, word_encode)
  assert data.spec.name == f"{task}@{length}" and data.spec.greedy and data.num_docs == 6
  for d in range(data.num_docs):
    rows = np.flatnonzero(data.doc == d)
    assert len(rows) == ruler.CANDIDATES
    gold_row = rows[data.choice[rows] == data.gold[d]][0]
    context, answer = data.contexts[gold_row], data.continuations[gold_row]
    longest = max(len(word_encode([data.continuations[r]])[0]) for r in rows)
    n = len(word_encode([context])[0])
    assert n + longest <= length and n + longest > length - 10  # filled up to the length
    if task == "ruler_vt":
      value = re.search(r"assigned the value (\d+) in", context).group(1)
      holding = {value}
      for a, b in re.findall(r"VAR (\w+) = (\w+)\.", context):
        if b in holding:
          holding.add(a)
      assert set(answer.split()) == holding - {value}
    else:
      key = re.search(r"magic numbers? for (\w+) mentioned", context).group(1)
      assert f"One of the special magic numbers for {key} is: {answer.strip()}." in context
      others = [data.continuations[r].strip() for r in rows if r != gold_row]
      in_haystack = [v for v in others if f"is: {v}." in context]
      if task == "ruler_niah_multikey":
        assert len(in_haystack) == ruler.NEEDLES - 1  # the other keys' numbers distract
      if task == "ruler_niah_multivalue":
        assert not in_haystack  # the other true numbers are not candidates


def test_ruler_is_deterministic_and_too_short_lengths_fail():
  a = ruler.build_task("ruler_niah_multiquery", 200, 4, word_encode)
  b = ruler.build_task("ruler_niah_multiquery", 200, 4, word_encode)
  assert a.contexts == b.contexts and np.array_equal(a.gold, b.gold)
  with pytest.raises(ValueError, match="too short"):
    ruler.build_task("ruler_vt", 40, 2, word_encode)
  docs = ruler.documents("ruler_niah_single", 120, 3, word_encode, seed=7)
  assert len(docs) == 3 and all("special magic number" in d for d in docs)


def test_default_ruler_lengths_leave_out_the_ones_too_short_and_fail_only_when_none_fits(capsys):
  tasks = ruler.build_default_lengths("ruler_vt", 200, 2, word_encode)  # lengths 50, 100, 200: 50 cannot hold it
  lengths = [max(len(word_encode([c])[0]) for c in t.contexts) for t in tasks]
  assert len(tasks) == 2 and max(lengths) <= 200
  assert "length 50 is too short" in capsys.readouterr().out
  with pytest.raises(ruler.TooShortError, match="SEQ_LEN=40"):
    ruler.build_default_lengths("ruler_vt", 40, 2, word_encode)
