"""Batches for a run: the resumable train iterator and fixed validation batches of a task, placed on the mesh.

Letters: B batch, S sequence.
"""

from __future__ import annotations

import math

import jax
import numpy as np

from engram_jax import fileio, sharding
from engram_jax.run_config import RunConfig

Batch = dict[str, np.ndarray]


def data_parallel_size(mesh) -> int:
  return math.prod(mesh.shape[a] for a in sharding.mesh_axes("batch") if a in mesh.shape)


def make_mesh(spec: str, devices=None):
  """sharding.make_mesh (over `devices`, default all) with errors that name RunConfig.mesh."""
  try:
    return sharding.make_mesh(spec, devices)
  except ValueError as e:
    raise ValueError(f"RunConfig.mesh={spec!r}: {e}") from None


def check_batch_size(batch_size: int, mesh, spec: str) -> None:
  n = data_parallel_size(mesh)
  if batch_size % n or batch_size % jax.process_count():
    raise ValueError(
        f"RunConfig.batch_size={batch_size} (BATCH_SIZE) is not divisible by the {n} data-parallel devices of mesh "
        f"{spec!r} (data x expert axes) or by the {jax.process_count()} processes; use a multiple of {n}, or change "
        "RunConfig.mesh.")


def task_vocabulary(run: RunConfig):
  """The seqio vocabulary of `run.task` (the corpus is prepared on first use)."""
  from engram_jax.data import tasks  # imports TensorFlow (CPU only): never at library import time
  return tasks.get_vocabulary(run.task, run.data_dir)


def resolved_data_dir(run: RunConfig) -> str | None:
  """The corpus directory `run.task` reads (absolute), or None for tasks without a local corpus (C4 on TFDS)."""
  from engram_jax.data import prepare, tasks
  if run.task == tasks.CORPUS_TASK:
    return str(fileio.as_path(run.data_dir or prepare.default_data_dir()))  # absolute, or gs://
  return run.data_dir


def open_data(run: RunConfig, vocab_size: int):
  """(resumable train iterator of this process's rows, the fixed list of validation batches) for `run.task`.

  The corpus is prepared on first use (engram_jax.data.prepare.ensure_corpus); its errors pass through unchanged.
  """
  from engram_jax.data import tasks  # imports TensorFlow (CPU only): never at library import time
  data_vocab = tasks.get_vocabulary(run.task, run.data_dir).vocab_size
  if data_vocab > vocab_size:
    raise ValueError(f"task {run.task!r} has a vocabulary of {data_vocab} ids but ModelConfig.vocab_size="
                     f"{vocab_size}; set ModelConfig.vocab_size >= {data_vocab}")
  local_batch = run.batch_size // jax.process_count()
  common = dict(task_name=run.task, seq_len=run.seq_len, batch_size=local_batch, data_dir=run.data_dir,
                shard_index=jax.process_index(), num_shards=jax.process_count())
  train_iter = tasks.get_dataset(split="train", seed=run.seed, **common)
  val_iter = tasks.get_dataset(split="validation", seed=0, num_epochs=1, drop_remainder=False, **common)
  val_batches = [b for _, b in zip(range(run.eval_batches), val_iter)]
  if jax.process_count() > 1:  # every process must run the same number of (collective) eval steps
    from jax.experimental import multihost_utils
    counts = multihost_utils.process_allgather(np.int32(len(val_batches)))
    val_batches = val_batches[:int(np.min(counts))]
  if not val_batches:
    raise ValueError(f"task {run.task!r}: the validation split yields no batch of {local_batch} x {run.seq_len} "
                     "tokens per process; lower RunConfig.batch_size / seq_len or use a larger validation split")
  if jax.process_index() == 0:
    print(data_summary(run, train_iter.info), flush=True)
  return train_iter, val_batches


def data_summary(run: RunConfig, info: dict) -> str:
  """'data engram_corpus_en at DIR | documents {...}; input lines skipped/repaired/split: ...' for the run log."""
  from engram_jax.data import prepare
  text = f"data {run.task}"
  directory = resolved_data_dir(run)
  manifest = prepare.verify_manifest(directory, check_hashes=False) if directory else None
  if manifest is not None:
    text += f" at {directory} | {prepare.corpus_summary(manifest)}"
  skipped = {k: v for k, v in info.get("skipped_lines", prepare.SkipCounts()).as_dict().items() if v}
  return text + (f" | shard lines skipped while reading: {skipped}" if skipped else "")


def to_global(batch: Batch, mesh) -> dict[str, jax.Array]:
  """This process's rows [B / processes, S] -> global arrays [B, S] sharded over the data axes."""
  sh = sharding.batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sh, np.asarray(v, np.int32)) for k, v in batch.items()}

