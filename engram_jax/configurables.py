"""Gin registration of the library's plain classes, and config resolution for every entry point (engram_jax.cli).

The only library module that imports gin. Gin files bind:
  ModelConfig.*, MoEConfig.*, EngramConfig.*, RunConfig.*, OptimizerConfig.*, EvalConfig.*, SweepConfig.*
  train.model_config / train.run / train.model_dir                  (python -m engram_jax.train)
  evaluate.checkpoint_path / evaluate.config / evaluate.output_dir   (python -m engram_jax.eval)
  sparsity_allocation.sweep / .run / .out_dir                        (the sweep and python -m engram_jax.budget)
  serving.checkpoint_path / .config / .context / .mesh / .row_counts / .server
                                              (python -m engram_jax.generate / engram_jax.serve; DecodeConfig.*,
                                               ServeConfig.* are registered only when they are parsed)
T5X-style macros (MODEL_DIR, TRAIN_STEPS, BATCH_SIZE, SEQ_LEN, MIXTURE_OR_TASK_NAME, CHECKPOINT_PATH, OUT_DIR) are
declared in the gin files and overridden on the command line with --gin.NAME=VALUE; a macro the files do not
declare is an error (a misspelling would otherwise be silently ignored).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import gin

from engram_jax.experiments.sparsity_allocation import SweepConfig
from engram_jax.layers.engram_config import EngramConfig
from engram_jax.layers.moe_config import MoEConfig
from engram_jax.models.config import ModelConfig
from engram_jax.optim import OptimizerConfig
from engram_jax.run_config import EvalConfig, RunConfig

REPO_ROOT = Path(__file__).resolve().parent.parent

for _cls in (ModelConfig, MoEConfig, EngramConfig, OptimizerConfig, RunConfig, EvalConfig):
  gin.external_configurable(_cls, module="engram_jax")
gin.external_configurable(SweepConfig, module="engram_jax.experiments")


@gin.configurable("train", module="engram_jax")
def train_args(model_config: ModelConfig = gin.REQUIRED, run: RunConfig = gin.REQUIRED,
               model_dir: str = gin.REQUIRED):
  """What `python -m engram_jax.train` trains: (model config, run config, model dir)."""
  return model_config, run, model_dir


@gin.configurable("evaluate", module="engram_jax")
def eval_args(checkpoint_path: str = gin.REQUIRED, config: EvalConfig = EvalConfig(), output_dir: str | None = None):
  """What `python -m engram_jax.eval` evaluates: (checkpoint path, eval config, output dir); the model comes from
  the checkpoint's run directory."""
  return checkpoint_path, config, output_dir


@gin.configurable("sparsity_allocation", module="engram_jax.experiments")
def sweep_args(sweep: SweepConfig = gin.REQUIRED, run: RunConfig | None = None, out_dir: str | None = None):
  """What the sparsity-allocation sweep (and the budget table) plans: (sweep, run config or None, out dir)."""
  return sweep, run, out_dir


def _register_serving():
  """Registers DecodeConfig, ServeConfig and `serving` (once): the serving modules (and their web stack) are imported
  only by the entry points that serve."""
  if "serving" in KINDS:
    return
  from engram_jax.decode import DecodeConfig
  from engram_jax.serve import ServeConfig
  gin.external_configurable(DecodeConfig, module="engram_jax")
  gin.external_configurable(ServeConfig, module="engram_jax")

  @gin.configurable("serving", module="engram_jax")
  def serving_args(checkpoint_path: str = gin.REQUIRED, config: DecodeConfig = DecodeConfig(),
                   context: int | None = None, mesh: str | None = None, row_counts: str | None = None,
                   server: ServeConfig = ServeConfig()):
    """What generate / serve load: (checkpoint path, decode config, context, mesh spec, row counts path, server)."""
    return checkpoint_path, config, context, mesh, row_counts, server

  KINDS["serving"] = serving_args


def _register_experiment():
  """Registers ExperimentConfig and `experiment` (once) for engram_jax.experiments.memory_experiments."""
  if "experiment" in KINDS:
    return
  from engram_jax.experiments.memory_experiments import ExperimentConfig
  gin.external_configurable(ExperimentConfig, module="engram_jax.experiments")

  @gin.configurable("experiment", module="engram_jax.experiments")
  def experiment_args(experiment: ExperimentConfig = gin.REQUIRED, run: RunConfig = gin.REQUIRED,
                      out_dir: str = gin.REQUIRED):
    """What an ablation / infinite-memory experiment trains: (experiment, run config, out dir)."""
    return experiment, run, out_dir

  KINDS["experiment"] = experiment_args


KINDS = {"train": train_args, "evaluate": eval_args, "sparsity_allocation": sweep_args}
LAZY_KINDS = {"serving": _register_serving, "experiment": _register_experiment}


class GinConfigError(ValueError):
  """A gin file or binding that cannot be applied (raised before anything is built or compiled)."""


def _macro_help(entry) -> str:
  if entry is None:
    return "MODEL_DIR, TRAIN_STEPS, BATCH_SIZE, SEQ_LEN, MIXTURE_OR_TASK_NAME, CHECKPOINT_PATH, OUT_DIR"
  return ", ".join(m for m, _ in entry.macros) + f" (see {entry.prog} --help)"


def parse(gin_files: Sequence[str], bindings: Sequence[str] = (), search_paths: Sequence[str] = (),
          entry=None) -> None:
  """Clears gin, then parses files and bindings; errors name the offending file or binding."""
  gin.clear_config()
  for path in (os.getcwd(), str(REPO_ROOT), *search_paths):
    gin.add_config_file_search_path(path)
  for f in gin_files:
    if not any(Path(p, f).is_file() for p in (os.getcwd(), REPO_ROOT, *search_paths)) and not Path(f).is_file():
      raise GinConfigError(f"gin file {f!r} not found (looked in the working directory and {REPO_ROOT}); "
                           "pass a path like configs/experiments/quickstart.gin")
  try:
    gin.parse_config_files_and_bindings(list(gin_files), [], finalize_config=False)
  except Exception as e:  # gin raises ValueError / SyntaxError / KeyError with its own text
    raise GinConfigError(f"gin files {list(gin_files)}: {e}") from None
  for b in bindings:
    name = b.split("=", 1)[0].strip()
    if "." not in name and "/" not in name:  # a macro: it must be declared by the files (catches typos)
      try:
        gin.query_parameter(f"{name}/macro.value")
      except ValueError:
        raise GinConfigError(f"gin binding {b!r}: no macro {name!r} is declared in {list(gin_files)}; "
                             f"macros: {_macro_help(entry)}") from None
    try:
      gin.parse_config(b)
    except Exception as e:
      raise GinConfigError(f"gin binding {b!r}: {e}\nFix: check the name against the configurables "
                           f"({entry.configurables if entry else 'ModelConfig.*, RunConfig.*, ...'}) and macros "
                           f"({_macro_help(entry)}).") from None
  # Finalize hooks find %gin.REQUIRED macros nobody set and unknown references. The config stays unlocked so
  # other entry points (e.g. the sparsity sweep) can still register their configurables in this process.
  with gin.unlock_config():
    try:
      gin.finalize()
    except ValueError as e:
      raise GinConfigError(f"{e}\nFix: set it with --gin.NAME=VALUE (see the header of configs/runs/*.gin)") from None


def resolve(kind: str, gin_files: Sequence[str], bindings: Sequence[str] = (), search_paths: Sequence[str] = (),
            entry=None):
  """Parses the config and builds the entry point's arguments: 'train' -> (model, run, model_dir); 'evaluate' ->
  (checkpoint_path, eval config, output_dir); 'sparsity_allocation' -> (sweep, run or None, out_dir or None).
  'serving' -> (checkpoint_path, decode config, context, mesh, row_counts, server). Config errors (unknown names,
  missing macros, bad field values) raise GinConfigError."""
  if kind in LAZY_KINDS:
    LAZY_KINDS[kind]()
  parse(gin_files, bindings, search_paths, entry)
  try:
    return KINDS[kind]()
  except (ValueError, TypeError, RuntimeError) as e:  # e.g. a %gin.REQUIRED macro nobody set, a bad field value
    raise GinConfigError(f"{kind}: {e}\nFix: set required macros with --gin.NAME=VALUE ({_macro_help(entry)}); "
                         "field errors name the field.") from None


def operative_config() -> str:
  """Gin's operative config: every value the entry point actually used (saved as MODEL_DIR/config.gin)."""
  return gin.operative_config_str()
