"""The one command-line layer of every gin entry point: flags, --help, config resolution, exit codes.

    python -m engram_jax.train | engram_jax.eval | engram_jax.budget | engram_jax.experiments.sparsity_allocation
        [--gin_file=FILE ...] [--gin.NAME=VALUE ...] [--gin_search_path=DIR] [--distributed]

Every entry point is described once in ENTRIES (purpose, macros, examples, default gin files) and parsed the same
way: --gin.NAME=VALUE overrides a macro declared by the gin files (a misspelled one is an error) or a field of a
registered configurable (a misspelled one is an error too); any other flag is an error. Gin itself is imported only
by engram_jax.configurables, which this module calls after the flags are read.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

EXIT_CONFIG, EXIT_NONFINITE = 2, 3
CONFIGURABLES = "ModelConfig.*, MoEConfig.*, EngramConfig.*, RunConfig.*, OptimizerConfig.*"


@dataclasses.dataclass(frozen=True)
class Entry:
  """One command-line entry point."""

  prog: str  # How it is run.
  kind: str  # configurables.resolve kind: what the gin files must bind.
  purpose: str  # First line of --help.
  macros: tuple[tuple[str, str], ...]  # (macro, meaning); '(required)' marks %gin.REQUIRED ones.
  configurables: str = CONFIGURABLES  # What --gin.Class.field may bind.
  default_gin_files: tuple[str, ...] = ()  # Used when no --gin_file is given.
  examples: tuple[str, ...] = ()

  def epilog(self) -> str:
    width = max(len(m) for m, _ in self.macros)
    lines = ["overrides (--gin.NAME=VALUE; strings need inner quotes when they look like numbers, e.g. "
             "--gin.MODEL_DIR=\"'/tmp/run'\"):", "  macros:"]
    lines += [f"    {m:<{width}}  {meaning}" for m, meaning in self.macros]
    lines += [f"  configurable fields: {self.configurables}", "examples:"] + [f"  {e}" for e in self.examples]
    return "\n".join(lines)


TRAIN = Entry(
    "python -m engram_jax.train", "train",
    "Train an Engram/MoE language model; rerunning the same command resumes from MODEL_DIR's latest checkpoint.",
    (("MODEL_DIR", "(required) run directory: checkpoints, run record, metrics, config.gin"),
     ("TRAIN_STEPS", "(required) optimizer steps; the learning-rate schedule spans exactly these"),
     ("BATCH_SIZE", "global rows per step (configs/runs/pretrain.gin: 16)"),
     ("SEQ_LEN", "tokens per row (256)"),
     ("MIXTURE_OR_TASK_NAME", "data task: 'engram_corpus_en' (offline corpus) or 'c4_en_pretrain'")),
    examples=("python -m engram_jax.train --gin_file=configs/experiments/quickstart.gin",
              "python -m engram_jax.train --gin_file=configs/models/engram_moe_tiny.gin "
              "--gin_file=configs/runs/pretrain.gin --gin.MODEL_DIR=\"'/tmp/run'\" --gin.TRAIN_STEPS=1000"))
EVAL = Entry(
    "python -m engram_jax.eval", "evaluate",
    "Validation loss and perplexity of a checkpoint; the model comes from its run directory (no model gin file).",
    (("CHECKPOINT_PATH", "(required) a MODEL_DIR, its checkpoints/ or checkpoints/<step>"),
     ("EVAL_BATCHES", "validation batches (None: as in training)"),
     ("BATCH_SIZE", "global rows per batch (None: as in training)"),
     ("SEQ_LEN", "tokens per row (None: as in training)"),
     ("MIXTURE_OR_TASK_NAME", "data task (None: training's)"),
     ("EVAL_MESH", "mesh spec, e.g. 'data=-1'"),
     ("EVAL_OUTPUT_DIR", "where eval_step<N>.json goes (None: the MODEL_DIR)")),
    configurables="EvalConfig.*", default_gin_files=("configs/runs/eval.gin",),
    examples=("python -m engram_jax.eval --gin.CHECKPOINT_PATH=\"'/tmp/engram_quickstart'\"",))
SWEEP = Entry(
    "python -m engram_jax.experiments.sparsity_allocation", "sparsity_allocation",
    "Sparsity-allocation sweep: validation loss against the MoE share rho at equal parameters and FLOPs "
    "(resumable).",
    (("OUT_DIR", "directory of the sweep: one run per (rho, seed), results.json, plots"),
     ("TRAIN_STEPS", "optimizer steps of every run"), ("BATCH_SIZE", "global rows per step"),
     ("SEQ_LEN", "tokens per row (also the FLOPs/token of the budget)")),
    configurables="SweepConfig.*, sparsity_allocation.*, " + CONFIGURABLES,
    examples=("python -m engram_jax.experiments.sparsity_allocation "
              "--gin_file=configs/experiments/sparsity_allocation_cpu.gin",))
BUDGET = Entry(
    "python -m engram_jax.budget", "sparsity_allocation",
    "Parameter and FLOP budget table of a sparsity-allocation plan (nothing trains).",
    (("SEQ_LEN", "tokens per row for FLOPs/token"),),
    configurables="SweepConfig.*, " + CONFIGURABLES,
    examples=("python -m engram_jax.budget --gin_file=configs/experiments/budget_6e20.gin",))
_SERVING_MACROS = (
    ("CHECKPOINT_PATH", "(required) a MODEL_DIR, its checkpoints/ or checkpoints/<step>"),
    ("CONTEXT", "KV-cache slots per row (None: the run's training sequence length)"),
    ("MESH", "mesh spec, e.g. 'data=2' (None: one device)"),
    ("ROW_COUNTS", "row frequencies for the hot-row cache (python -m engram_jax.count_rows)"))
GENERATE = Entry(
    "python -m engram_jax.generate", "serving",
    "Generate text from a checkpoint, streamed to the terminal, then tokens/s. Own flags: --prompt TEXT "
    "(repeatable: one batch), --max_new_tokens, --temperature (0: greedy), --top_k, --top_p, --seed, --stop.",
    _SERVING_MACROS, configurables="DecodeConfig.*, ServeConfig.*", default_gin_files=("configs/runs/generate.gin",),
    examples=("python -m engram_jax.generate --gin.CHECKPOINT_PATH=\"'/tmp/engram_quickstart'\" --prompt 'The king'",))
SERVE = Entry(
    "python -m engram_jax.serve", "serving",
    "OpenAI-compatible completions server for a checkpoint. Own flags: --host (default 127.0.0.1), --port, "
    "--model_name; ENGRAM_API_KEY or ServeConfig.api_key requires a bearer key.",
    _SERVING_MACROS, configurables="DecodeConfig.*, ServeConfig.*", default_gin_files=("configs/runs/generate.gin",),
    examples=("python -m engram_jax.serve --gin.CHECKPOINT_PATH=\"'/tmp/engram_quickstart'\" --port 8000",))
COUNT_ROWS = Entry(
    "python -m engram_jax.count_rows", "serving",
    "Row frequencies of a run's Engram tables over its training split (for the hot-row cache). Own flags: "
    "--max_tokens (default 20M), --out FILE.npz (default MODEL_DIR/row_counts.npz).",
    _SERVING_MACROS[:1], configurables="DecodeConfig.*, ServeConfig.*", default_gin_files=("configs/runs/generate.gin",),
    examples=("python -m engram_jax.count_rows --gin.CHECKPOINT_PATH=\"'/tmp/engram_quickstart'\"",))
EXPERIMENT = Entry(
    "python -m engram_jax.experiments.memory_experiments", "experiment",
    "Ablation or infinite-memory experiment on one backbone: every (point, seed) trained, results, PNG and README "
    "(resumable).",
    (("OUT_DIR", "directory of the experiment: one run per (point, seed), results.json, PNG, README.md"),
     ("TRAIN_STEPS", "optimizer steps of every run"), ("BATCH_SIZE", "global rows per step"),
     ("SEQ_LEN", "tokens per row")),
    configurables="ExperimentConfig.*, " + CONFIGURABLES,
    examples=("python -m engram_jax.experiments.memory_experiments "
              "--gin_file=configs/experiments/ablation_cpu.gin",))
ENTRIES = {e.kind if e is not BUDGET else "budget": e for e in (TRAIN, EVAL, SWEEP, BUDGET, EXPERIMENT)}


def parse_flags(argv: Sequence[str], entry: Entry | None = None,
                ) -> tuple[list[str], list[str], argparse.Namespace]:
  """--gin_file (repeatable) and --gin.NAME=VALUE overrides -> (files, bindings, other flags). Without --gin_file
  the entry's default files are used (an error if it has none). Any other flag is an error."""
  entry = entry or TRAIN
  parser = argparse.ArgumentParser(prog=entry.prog, description=entry.purpose, epilog=entry.epilog(),
                                   formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
  default = f" (default: {', '.join(entry.default_gin_files)})" if entry.default_gin_files else ""
  parser.add_argument("--gin_file", action="append", default=[], metavar="FILE",
                      help=f"gin file, repeatable, applied in order{default}")
  parser.add_argument("--gin.NAME=VALUE", dest="_overrides", action="append", metavar="",
                      help="override a macro or a configurable field (see below); repeatable")
  parser.add_argument("--gin_search_path", action="append", default=[], metavar="DIR",
                      help="extra directory for gin includes")
  parser.add_argument("--distributed", action="store_true",
                      help="call jax.distributed.initialize() first (multi-host / multi-process)")
  args, rest = parser.parse_known_args(argv)
  bindings = []
  for item in rest:
    if not item.startswith("--gin."):
      parser.error(f"unrecognized argument {item!r}; overrides look like --gin.TRAIN_STEPS=100 (see --help)")
    name, sep, value = item[len("--gin."):].partition("=")
    if not sep or not name:
      parser.error(f"{item!r}: expected --gin.NAME=VALUE")
    bindings.append(f"{name} = {_gin_value(value)}")
  if not args.gin_file:
    args.gin_file = list(entry.default_gin_files)
  if not args.gin_file:
    parser.error("at least one --gin_file is required, e.g. " + entry.examples[0].split(" ", 3)[-1])
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


def run(entry: Entry, argv: Sequence[str] | None, fn: Callable[..., Any], *, kind: str | None = None) -> Any:
  """Parses the flags and the gin config of `entry`, then calls fn(*resolved). A config error prints its message
  and exits with status 2; a non-finite training stop with status 3."""
  argv = sys.argv[1:] if argv is None else list(argv)
  files, bindings, args = parse_flags(argv, entry)
  from engram_jax import configurables  # imports gin; registers the library's classes
  if args.distributed:
    initialize_distributed()
  try:
    resolved = configurables.resolve(kind or entry.kind, files, bindings, args.gin_search_path, entry=entry)
  except configurables.GinConfigError as e:
    print(f"{entry.prog}: error: {e}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_CONFIG) from None
  from engram_jax.guard import NonFiniteError
  try:
    return fn(*resolved)
  except NonFiniteError as e:  # a clear reason and a non-zero status, not a traceback
    print(f"{entry.prog}: error: {e}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_NONFINITE) from None


def initialize_distributed() -> None:
  """jax.distributed.initialize from ENGRAM_COORDINATOR / ENGRAM_NUM_PROCESSES / ENGRAM_PROCESS_ID when set (local
  multi-process, see launch/multiprocess.py; CPU processes talk through gloo), else auto-detection (Cloud TPU)."""
  import jax
  if "ENGRAM_COORDINATOR" in os.environ:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=os.environ["ENGRAM_COORDINATOR"],
                               num_processes=int(os.environ["ENGRAM_NUM_PROCESSES"]),
                               process_id=int(os.environ["ENGRAM_PROCESS_ID"]))
  else:
    jax.distributed.initialize()
