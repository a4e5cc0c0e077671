"""Tests register seqio tasks and mixtures that point into their tmp directories; this removes them again, so a
later test in the same process that registers the same name (e.g. engram_corpus_facts_30) over another corpus
gets its own."""

import contextlib
import sys


def _names():
  seqio = sys.modules.get("seqio")
  return (set(), set()) if seqio is None else (set(seqio.TaskRegistry.names()), set(seqio.MixtureRegistry.names()))


@contextlib.contextmanager
def registered_tasks_removed():
  """Tasks and mixtures registered inside the block are removed at its end (seqio is not imported for it)."""
  tasks_before, mixtures_before = _names()
  try:
    yield
  finally:
    if "seqio" in sys.modules:
      seqio = sys.modules["seqio"]
      from engram_jax.data import tasks
      tasks_now, mixtures_now = _names()
      for name in mixtures_now - mixtures_before:
        seqio.MixtureRegistry.remove(name)
        tasks._MIXTURES.pop(name, None)
      for name in tasks_now - tasks_before:
        seqio.TaskRegistry.remove(name)
        tasks._REGISTERED.pop(name, None)
        tasks._CORPUS_TASKS.discard(name)
