"""Gin registration of the library's plain classes, and config resolution for the entry points.

The only library module besides the entry points (train.py / eval.py `main`) that imports gin. Gin files bind:
  ModelConfig.*, MoEConfig.*, EngramConfig.*, RunConfig.*, OptimizerConfig.*  (plain frozen dataclasses)
  train.model_config / train.run / train.model_dir            (what `python -m engram_jax.train` runs)
  evaluate.checkpoint_path / evaluate.config (EvalConfig.*) / evaluate.output_dir        (`engram_jax.eval`)
T5X-style macros (MODEL_DIR, TRAIN_STEPS, BATCH_SIZE, SEQ_LEN, MIXTURE_OR_TASK_NAME, CHECKPOINT_PATH) are
defined in configs/runs/*.gin and overridden on the command line with --gin.NAME=VALUE.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import gin

from engram_jax.eval import EvalConfig
from engram_jax.layers.engram_config import EngramConfig
from engram_jax.layers.moe_config import MoEConfig
from engram_jax.models.config import ModelConfig
from engram_jax.optim import OptimizerConfig
from engram_jax.run_config import RunConfig

REPO_ROOT = Path(__file__).resolve().parent.parent

for _cls in (ModelConfig, MoEConfig, EngramConfig, OptimizerConfig, RunConfig, EvalConfig):
  gin.external_configurable(_cls, module="engram_jax")


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


class GinConfigError(ValueError):
  """A gin file or binding that cannot be applied (raised before anything is built or compiled)."""


def parse(gin_files: Sequence[str], bindings: Sequence[str] = (), search_paths: Sequence[str] = ()) -> None:
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
                             "macros of configs/runs/*.gin: MODEL_DIR, TRAIN_STEPS, BATCH_SIZE, SEQ_LEN, "
                             "MIXTURE_OR_TASK_NAME (and CHECKPOINT_PATH for eval)") from None
    try:
      gin.parse_config(b)
    except Exception as e:
      raise GinConfigError(f"gin binding {b!r}: {e}\nFix: check the name against the configurables "
                           "(ModelConfig, MoEConfig, EngramConfig, RunConfig, OptimizerConfig, train, evaluate) "
                           "and macros (MODEL_DIR, TRAIN_STEPS, BATCH_SIZE, SEQ_LEN, MIXTURE_OR_TASK_NAME, "
                           "CHECKPOINT_PATH).") from None
  # Finalize hooks find %gin.REQUIRED macros nobody set and unknown references. The config stays unlocked so
  # other entry points (e.g. the sparsity sweep) can still register their configurables in this process.
  with gin.unlock_config():
    try:
      gin.finalize()
    except ValueError as e:
      raise GinConfigError(f"{e}\nFix: set it with --gin.NAME=VALUE (see the header of configs/runs/*.gin)") from None


def resolve(kind: str, gin_files: Sequence[str], bindings: Sequence[str] = (), search_paths: Sequence[str] = ()):
  """Parses the config and builds the entry point's arguments: 'train' -> (model, run, model_dir); 'evaluate' ->
  (checkpoint_path, eval config, output_dir). Config errors (missing macros, bad fields) raise GinConfigError."""
  parse(gin_files, bindings, search_paths)
  fn = {"train": train_args, "evaluate": eval_args}[kind]
  try:
    return fn()
  except (ValueError, TypeError, RuntimeError) as e:  # e.g. a %gin.REQUIRED macro nobody set, a bad field value
    raise GinConfigError(f"{kind}: {e}\nFix: set required macros with --gin.NAME=VALUE (see the header of "
                         "configs/runs/*.gin); field errors name the field.") from None


def operative_config() -> str:
  """Gin's operative config: every value the entry point actually used (saved as MODEL_DIR/config.gin)."""
  return gin.operative_config_str()
