"""Data: offline corpus building (prepare), numpy packing (packing), seqio tasks (tasks, imports TensorFlow).

Names are resolved lazily, so `import engram_jax.data` imports nothing heavy and never TensorFlow; only the
names from `engram_jax.data.tasks` (get_dataset, register_*_task, ...) import TensorFlow, on first use.
"""

import importlib

_EXPORTS = {
  "PackedBatches": "packing",
  "pack_documents": "packing",
  "packing_efficiency": "packing",
  "shuffled_documents": "packing",
  "default_data_dir": "prepare",
  "ensure_corpus": "prepare",
  "get_dataset": "tasks",
  "get_vocabulary": "tasks",
  "register_corpus_task": "tasks",
  "register_c4_task": "tasks",
  "CORPUS_TASK": "tasks",
  "C4_TASK": "tasks",
}


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(f"engram_jax.data.{_EXPORTS[name]}"), name)
  raise AttributeError(f"module 'engram_jax.data' has no attribute {name!r}")


__all__ = list(_EXPORTS)
