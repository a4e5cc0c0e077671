"""Data: offline corpus building (prepare), numpy packing (packing), seqio tasks (tasks, imports TensorFlow).

`get_dataset` and the task registrations live in `engram_jax.data.tasks`; they are reachable from here lazily so
that importing `engram_jax.data` (or packing/prepare) never imports TensorFlow.
"""

from engram_jax.data.packing import PackedBatches, pack_documents, packing_efficiency, shuffled_documents
from engram_jax.data.prepare import default_data_dir, ensure_corpus

_LAZY = ("get_dataset", "register_corpus_task", "register_c4_task", "CORPUS_TASK", "C4_TASK")


def __getattr__(name):
    if name in _LAZY:
        from engram_jax.data import tasks

        return getattr(tasks, name)
    raise AttributeError(f"module 'engram_jax.data' has no attribute {name!r}")


__all__ = ["PackedBatches", "pack_documents", "packing_efficiency", "shuffled_documents", "default_data_dir",
           "ensure_corpus", *_LAZY]
