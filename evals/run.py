"""Runs an eval suite on a checkpoint.

    python -m evals.run --gin.CHECKPOINT_PATH=DIR --gin.SUITE=standard [--limit N]
    python -m evals.run --gin_file=configs/evals/analysis.gin --gin.CHECKPOINT_PATH=DIR --gin.COMPARE="('OTHER',)"

SUITE names configs/evals/<SUITE>.gin (used when no --gin_file is given); --limit N keeps N documents per task
(the same seeded subset every time). Results: DIR/evals/step_<N>/<SUITE>.{json,md} and PNGs (see evals.suite).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from engram_jax import cli, configurables, run_dir
from evals.configurables import eval_suite_args
from evals.loading import load
from evals.suite import run_suite


ENTRY = cli.Entry(
    "python -m evals.run", "eval_suite",
    "Run an eval suite on a checkpoint (SUITE picks configs/evals/<SUITE>.gin when no --gin_file is given). Own "
    "flag: --limit N (documents per task, the same seeded subset every time).",
    (("CHECKPOINT_PATH", "(required) a MODEL_DIR, its checkpoints/ or checkpoints/<step>"),
     ("SUITE", "standard | quick | engram_off | analysis | long_context"),
     ("LIMIT", "documents per task (None: all)"), ("SEQ_LEN", "scoring window (None: the run's)"),
     ("BATCH_SIZE", "rows per scoring batch"), ("ENGRAM_OFF", "'all', a tuple of layers, or None"),
     ("COMPARE", "other checkpoints for CKA (analysis suite)"), ("OUTPUT_DIR", "None: DIR/evals/step_<N>")),
    configurables="SuiteConfig.*, " + cli.CONFIGURABLES, default_gin_files=("configs/evals/standard.gin",),
    examples=("python -m evals.run --gin.CHECKPOINT_PATH=\"'/tmp/engram_quickstart'\" --gin.SUITE=quick",))


def _suite_file(argv: Sequence[str]) -> str:
  name = "standard"
  for a in argv:
    if a.startswith("--gin.SUITE="):
      name = a.split("=", 1)[1].strip().strip("'\"")
  return f"configs/evals/{name}.gin"


def parse_args(argv: Sequence[str]) -> tuple[list[str], list[str], list[str]]:
  """(gin files, bindings, search paths): --limit N becomes LIMIT = N; without --gin_file, configs/evals/<SUITE>.gin."""
  argv, rest = list(argv), []
  limit = None
  while argv:
    a = argv.pop(0)
    if a == "--limit":
      limit = argv.pop(0) if argv else ""
    elif a.startswith("--limit="):
      limit = a.split("=", 1)[1]
    else:
      rest.append(a)
  if limit is not None and not limit.isdigit():
    raise SystemExit(f"--limit {limit!r}: expected a positive number of documents per task")
  if not any(a.startswith("--gin_file") for a in rest):
    rest.insert(0, f"--gin_file={_suite_file(rest)}")
  gin_files, bindings, args = cli.parse_flags(rest, ENTRY)
  if limit is not None:
    bindings.append(f"LIMIT = {int(limit)}")
  return gin_files, bindings, args.gin_search_path


def main(argv: Sequence[str] | None = None) -> dict:
  gin_files, bindings, search = parse_args(sys.argv[1:] if argv is None else argv)
  configurables.parse(gin_files, bindings, search, entry=ENTRY)
  try:
    checkpoint_path, suite, output_dir = eval_suite_args()
  except (ValueError, TypeError) as e:
    raise configurables.GinConfigError(f"eval suite: {e}\nFix: set CHECKPOINT_PATH (and see the header of "
                                       f"{gin_files[0]})") from None
  loaded = load(checkpoint_path)
  print(f"{loaded.model_dir} step {loaded.step}: suite {suite.name}, {len(suite.tasks)} tasks, window "
        f"{suite.seq_len or loaded.seq_len}", flush=True)
  with run_dir.x64_context(loaded.model_config):  # 64-bit Engram hashing needs jax x64 while the model runs
    return run_suite(loaded, suite, output_dir)


if __name__ == "__main__":  # run the importable module's main, so gin sees a single copy of the configurables
  from evals import run as _entry
  _entry.main()
