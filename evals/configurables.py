"""Gin registration of the eval suite and the Engram-off pair (imported by their entry points, evals.run and
evals.engram_off_pair; one copy per process)."""

from __future__ import annotations

import gin

from evals.engram_off_pair import PairConfig
from evals.suite import SuiteConfig

gin.external_configurable(SuiteConfig, module="evals")
gin.external_configurable(PairConfig, module="evals")


@gin.configurable("eval_suite", module="evals")
def eval_suite_args(checkpoint_path: str = gin.REQUIRED, suite: SuiteConfig = gin.REQUIRED,
                    output_dir: str | None = None):
  """What `python -m evals.run` runs: (checkpoint path, suite, output dir or None for DIR/evals/step_<N>)."""
  return checkpoint_path, suite, output_dir


@gin.configurable("engram_off_pair", module="evals")
def engram_off_pair_args(pair: PairConfig = gin.REQUIRED, model_config=gin.REQUIRED, run=gin.REQUIRED,
                         out_dir: str = gin.REQUIRED):
  """What `python -m evals.engram_off_pair` trains and scores: (pair, Engram+MoE model config, run config, out dir)."""
  return pair, model_config, run, out_dir
