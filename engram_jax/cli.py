"""Command-line flags shared by the entry points: --gin_file, --gin.NAME=VALUE, --distributed."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import jax


def parse_flags(argv: Sequence[str], description: str | None = None, default_gin_files: Sequence[str] = ()
                ) -> tuple[list[str], list[str], argparse.Namespace]:
  """--gin_file (repeatable) and --gin.NAME=VALUE overrides -> (files, bindings, other flags).
  Without --gin_file, `default_gin_files` are used (an error if there are none)."""
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument("--gin_file", action="append", default=[], help="gin file (repeatable, applied in order)")
  parser.add_argument("--gin_search_path", action="append", default=[], help="extra directory for gin includes")
  parser.add_argument("--distributed", action="store_true",
                      help="call jax.distributed.initialize() first (multi-host / multi-process)")
  args, rest = parser.parse_known_args(argv)
  bindings = []
  for item in rest:
    if not item.startswith("--gin."):
      parser.error(f"unrecognized argument {item!r}; overrides look like --gin.TRAIN_STEPS=100")
    name, sep, value = item[len("--gin."):].partition("=")
    if not sep:
      parser.error(f"{item!r}: expected --gin.NAME=VALUE")
    bindings.append(f"{name} = {_gin_value(value)}")
  if not args.gin_file and default_gin_files:
    args.gin_file = list(default_gin_files)
  if not args.gin_file:
    parser.error("at least one --gin_file is required (e.g. configs/experiments/quickstart.gin)")
  return args.gin_file, bindings, args


def _gin_value(value: str) -> str:
  """Values that are not gin literals or references (e.g. a bare path) are quoted as strings."""
  import ast
  v = value.strip()
  if v[:1] in "@%([{'\"" or v in ("True", "False", "None"):
    return v
  try:
    ast.literal_eval(v)
    return v
  except (ValueError, SyntaxError):
    return repr(v)


def initialize_distributed() -> None:
  """jax.distributed.initialize from ENGRAM_COORDINATOR / ENGRAM_NUM_PROCESSES / ENGRAM_PROCESS_ID when set (local
  multi-process, see launch/multiprocess.py; CPU processes talk through gloo), else auto-detection (Cloud TPU)."""
  if "ENGRAM_COORDINATOR" in os.environ:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=os.environ["ENGRAM_COORDINATOR"],
                               num_processes=int(os.environ["ENGRAM_NUM_PROCESSES"]),
                               process_id=int(os.environ["ENGRAM_PROCESS_ID"]))
  else:
    jax.distributed.initialize()

