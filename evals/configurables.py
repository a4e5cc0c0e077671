"""Gin registration of the eval suite (imported by the entry point evals.run; one copy per process)."""

from __future__ import annotations

import gin

from evals.suite import SuiteConfig

gin.external_configurable(SuiteConfig, module="evals")


@gin.configurable("eval_suite", module="evals")
def eval_suite_args(checkpoint_path: str = gin.REQUIRED, suite: SuiteConfig = gin.REQUIRED,
                    output_dir: str | None = None):
  """What `python -m evals.run` runs: (checkpoint path, suite, output dir or None for DIR/evals/step_<N>)."""
  return checkpoint_path, suite, output_dir
