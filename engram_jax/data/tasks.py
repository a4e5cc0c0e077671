"""seqio tasks over the prepared corpus (and C4 for pod users), and `get_dataset` -> packed numpy batches.

The only module of engram_jax that imports TensorFlow (through seqio); tf.data runs on the CPU only.

Tasks (features: {'targets': int32 SentencePiece ids + EOS}):
  engram_corpus_en  the offline corpus of `engram_jax.data.prepare` (train / validation), its own 8k vocabulary.
  c4_en_pretrain    TFDS `c4/en:3.1.0` (train / validation), T5's 32k vocabulary by default. Registered here, run
                    on a pod: it needs the prepared TFDS data (or GCS) and is never downloaded by tests.
Tokenized documents are not truncated; `PackedBatches` packs them into [B, S] rows (concat-then-chunk).

Besides: in-memory text tasks (`register_documents_task`, e.g. synthetic documents), document-level mixtures of
in-memory tasks (`register_mixture`: a seqio Mixture; `get_dataset` samples documents by rate in numpy), and
task factories (`register_task_factory`: a name prefix -> a function that registers the task on first use, so a
run config can name e.g. a mixture that a module imported from a gin file knows how to build).
"""

from __future__ import annotations

import functools
import os

import numpy as np

from engram_jax import fileio, platforms

tf = platforms.import_tensorflow()  # before seqio, which imports TensorFlow too
import seqio  # noqa: E402

from engram_jax.data import packing, prepare  # noqa: E402

CORPUS_TASK = "engram_corpus_en"
C4_TASK = "c4_en_pretrain"
C4_TFDS_NAME = "c4/en:3.1.0"
T5_VOCAB = "gs://t5-data/vocabs/cc_all.32000/sentencepiece.model"  # pad 0, eos 1, unk 2: same ids as ours

SKIP_OK, SKIP_EMPTY, SKIP_NON_UTF8 = 0, 1, 2

_REGISTERED: dict[str, tuple] = {}  # task name -> what it was registered with (to re-register on change)
_CORPUS_TASKS: set[str] = set()  # tasks small enough to tokenize once and keep in memory
_MIXTURES: dict[str, tuple[tuple[str, float], ...]] = {}  # mixture name -> (in-memory task, rate) pairs
_FACTORIES: dict[str, object] = {}  # task-name prefix -> fn(name, data_dir) that registers that task or mixture


def parse_lines(dataset: tf.data.Dataset) -> tf.data.Dataset:
  """Shard lines -> {'targets': document text, 'skip': 0 ok | 1 empty | 2 non-UTF-8}; skipped lines get ''."""

  def fn(line):
    line = tf.strings.regex_replace(line, "\r$", "")
    valid = tf.equal(tf.strings.unicode_transcode(line, "UTF-8", "UTF-8", errors="replace"), line)
    text = tf.strings.regex_replace(line, r"\\n", "\n")  # see prepare.decode_line
    empty = tf.equal(tf.strings.length(tf.strings.strip(text)), 0)
    skip = tf.where(valid, tf.where(empty, SKIP_EMPTY, SKIP_OK), SKIP_NON_UTF8)
    return {"targets": tf.where(tf.equal(skip, SKIP_OK), text, ""), "skip": skip}

  return dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


def _output_features(vocab_path: str) -> dict[str, seqio.Feature]:
  vocab = seqio.SentencePieceVocabulary(str(vocab_path))
  return {"targets": seqio.Feature(vocab, add_eos=True, dtype=tf.int32)}


def _register(name: str, key: tuple, **task_kwargs) -> seqio.Task:
  """TaskRegistry.add, idempotent: same key -> existing task; ours with another key -> replaced."""
  if name in seqio.TaskRegistry.names():
    if _REGISTERED.get(name) == key:
      return seqio.TaskRegistry.get(name)
    if name not in _REGISTERED:
      raise ValueError(
        f"A seqio task named {name!r} was registered outside engram_jax; pass another name= "
        f"or call seqio.TaskRegistry.remove({name!r}) first."
      )
    seqio.TaskRegistry.remove(name)
  task = seqio.TaskRegistry.add(name, **task_kwargs)
  _REGISTERED[name] = key
  return task


def register_corpus_task(data_dir: str | os.PathLike | None = None, name: str = CORPUS_TASK) -> seqio.Task:
  """Registers the prepared corpus in `data_dir` (built first via `ensure_corpus` if missing) as a seqio Task."""
  data_dir = fileio.as_path(data_dir or prepare.default_data_dir())  # local (absolute) or gs://
  manifest = prepare.ensure_corpus(data_dir)
  vocab_path = data_dir / manifest["vocab"]["file"]
  files = {split: prepare.split_files(data_dir, manifest, split) for split in manifest["splits"]}
  source = seqio.TextLineDataSource(
    files, num_input_examples={s: manifest["splits"][s]["docs"] for s in manifest["splits"]}
  )
  key = (str(data_dir), manifest["vocab"]["sha256"], tuple(tuple(f) for f in files.values()))
  task = _register(
    name,
    key,
    source=source,
    output_features=_output_features(str(vocab_path)),
    preprocessors=[parse_lines, seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
  )
  _CORPUS_TASKS.add(name)
  return task


def register_c4_task(
  vocab_path: str = T5_VOCAB, name: str = C4_TASK, tfds_name: str = C4_TFDS_NAME, tfds_data_dir: str | None = None
) -> seqio.Task:
  """Registers the TFDS C4 pretraining task (nothing is read or downloaded until a dataset is iterated)."""
  source = seqio.TfdsDataSource(tfds_name=tfds_name, tfds_data_dir=tfds_data_dir, splits=("train", "validation"))
  key = (str(vocab_path), tfds_name, tfds_data_dir)
  _CORPUS_TASKS.discard(name)
  return _register(
    name,
    key,
    source=source,
    output_features=_output_features(vocab_path),
    preprocessors=[
      functools.partial(seqio.preprocessors.rekey, key_map={"targets": "text"}),
      seqio.preprocessors.tokenize,
      seqio.preprocessors.append_eos,
    ],
  )


def register_documents_task(name: str, documents, vocab_path: str, key: tuple,
                            splits: tuple[str, ...] = ("train", "validation")) -> seqio.Task:
  """An in-memory text task: `documents(split)` -> list of document strings, tokenized with the SentencePiece
  model at `vocab_path` (EOS appended). `key` identifies the content (re-registering with another key replaces
  the task)."""

  def dataset_fn(split, shuffle_files, seed=None):
    docs = list(documents(split))
    return tf.data.Dataset.from_tensor_slices({"targets": docs, "skip": np.zeros(len(docs), np.int32)})

  task = _register(name, (str(vocab_path), *key), source=seqio.FunctionDataSource(dataset_fn, splits),
                   output_features=_output_features(str(vocab_path)),
                   preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos])
  _CORPUS_TASKS.add(name)
  return task


def register_mixture(name: str, components) -> seqio.Mixture:
  """A document-level mixture of registered in-memory tasks: components [(task name, rate), ...]; a document
  comes from a task with probability rate / sum(rates). Registered as a seqio Mixture (for its vocabulary and
  tools); `get_dataset` mixes in numpy, deterministically per (seed, epoch)."""
  components = tuple((str(t), float(r)) for t, r in components)
  bad = [t for t, r in components if t not in _CORPUS_TASKS or r <= 0]
  if bad:
    raise ValueError(f"register_mixture({name!r}): {bad} are not registered in-memory tasks with a rate > 0; "
                     "register them first (register_corpus_task / register_documents_task)")
  if name in seqio.MixtureRegistry.names():
    if _MIXTURES.get(name) == components:
      return seqio.MixtureRegistry.get(name)
    if name not in _MIXTURES:
      raise ValueError(f"A seqio mixture named {name!r} was registered outside engram_jax; pass another name")
    seqio.MixtureRegistry.remove(name)
  mixture = seqio.MixtureRegistry.add(name, list(components))
  _MIXTURES[name] = components
  return mixture


def register_task_factory(prefix: str, factory) -> None:
  """`factory(task_name, data_dir)` registers any task or mixture whose name starts with `prefix`, on first use."""
  _FACTORIES[prefix] = factory


def _get_task(task_name: str, data_dir) -> seqio.Task:
  if task_name == CORPUS_TASK:  # always re-resolved: data_dir (or $ENGRAM_DATA_DIR) may differ between calls
    return register_corpus_task(data_dir)
  for prefix, factory in _FACTORIES.items():  # re-resolved too: the factory knows its data_dir dependence
    if task_name.startswith(prefix):
      factory(task_name, data_dir)
  if task_name in seqio.TaskRegistry.names():
    return seqio.TaskRegistry.get(task_name)
  if task_name in seqio.MixtureRegistry.names():
    return seqio.MixtureRegistry.get(task_name)
  if task_name == C4_TASK:
    return register_c4_task()
  raise ValueError(
    f"task_name={task_name!r} is not a registered seqio task; use {CORPUS_TASK!r}, {C4_TASK!r} "
    "or register it first (register_corpus_task(data_dir, name=...)); a mixture's module may need importing "
    f"(e.g. 'import evals.mixtures' in the gin file; known factory prefixes: {sorted(_FACTORIES)})."
  )


def get_vocabulary(task_name: str = CORPUS_TASK, data_dir: str | os.PathLike | None = None) -> seqio.Vocabulary:
  """The 'targets' vocabulary of a task (registering the default tasks on demand)."""
  return _get_task(task_name, data_dir).output_features["targets"].vocabulary


def tokenized_documents(
  task: seqio.Task,
  split: str,
  *,
  shuffle: bool = False,
  seed: int | None = None,
  shard_info: seqio.ShardInfo | None = None,
  skipped: prepare.SkipCounts | None = None,
):
  """Yields each document's token ids (1-D int32 numpy, EOS included) through the task; counts skipped lines."""
  if split not in task.splits:
    raise ValueError(f"split={split!r} not in task {task.name!r}; choose one of {list(task.splits)}")
  ds = task.get_dataset(
    sequence_length=None,
    split=split,
    shuffle=shuffle,
    seed=seed,
    shard_info=shard_info,
    num_epochs=1,
    use_cached=False,
    trim_output_features=False,
    try_in_mem_cache=False,
  )
  for ex in ds.as_numpy_iterator():
    skip = int(ex.get("skip", SKIP_OK))
    if skip != SKIP_OK:
      if skipped is not None:
        skipped.empty += skip == SKIP_EMPTY
        skipped.non_utf8 += skip == SKIP_NON_UTF8
      continue
    yield ex["targets"].astype(np.int32)


def get_dataset(
  task_name: str = CORPUS_TASK,
  split: str = "train",
  seq_len: int = 256,
  batch_size: int = 16,
  seed: int = 0,
  data_dir: str | os.PathLike | None = None,
  *,
  shard_index: int = 0,
  num_shards: int = 1,
  num_epochs: int | None = None,
  drop_remainder: bool = True,
) -> packing.PackedBatches:
  """Packed batches {'targets','segment_ids','positions'}: [B, S] int32 numpy, deterministic for `seed`.

  Corpus tasks are tokenized once (tf.data, CPU) and reshuffled per epoch in numpy; other tasks (C4) are streamed
  through seqio with seed `seed + epoch`. `shard_index`/`num_shards`: this host's slice of the documents.
  Resume: `it.state()` -> {'epoch', 'index'}; `it.restore(state)`. `it.info` holds counts and skipped lines.
  """
  task = _get_task(task_name, data_dir)
  skipped = prepare.SkipCounts()
  if task_name in _CORPUS_TASKS:
    docs = list(tokenized_documents(task, split, skipped=skipped))
    documents_fn = packing.shuffled_documents(docs, seed, shard_index=shard_index, num_shards=num_shards)
    info = {"docs": len(docs), "tokens": int(sum(d.size for d in docs))}
  elif task_name in _MIXTURES:
    names, rates = zip(*_MIXTURES[task_name])
    sources = [list(tokenized_documents(seqio.TaskRegistry.get(t), split, skipped=skipped)) for t in names]
    documents_fn = packing.mixed_documents(sources, rates, seed, shard_index=shard_index, num_shards=num_shards)
    info = {"docs": {t: len(d) for t, d in zip(names, sources)}, "rates": dict(zip(names, rates))}
  else:
    shard = seqio.ShardInfo(shard_index, num_shards) if num_shards > 1 else None

    def documents_fn(epoch):
      return tokenized_documents(task, split, shuffle=True, seed=seed + epoch, shard_info=shard, skipped=skipped)

    info = {}
  it = packing.PackedBatches(
    documents_fn, batch_size=batch_size, seq_len=seq_len, num_epochs=num_epochs, drop_remainder=drop_remainder
  )
  it.info = {"task": task_name, "split": split, **info, "skipped_lines": skipped}
  return it
