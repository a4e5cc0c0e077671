"""Results at several token budgets from one warmup-stable-decay run per (point, seed).

A run of `steps` steps on the 'wsd' schedule stops on its way at each smaller budget T's branch point
k = T - C(T) (C(T): the cooldown of a T-step WSD run, optim.cooldown_steps), and a cooldown branch
(engram_jax.branch: RunConfig.init_from / init_step) trains from the run's step-k checkpoint to T in
`<run_dir>/budget<T>/`. The run then goes on to its own length. Before k the learning rate does not depend on the
run's length, so each branch is the T-step WSD run (tests/test_token_budgets.py checks this against straight
runs). Cost: steps + sum over T of C(T) steps, instead of steps + sum of T.

Order (resumable at any point): run to k1, branch T1, run to k2, branch T2, ..., run to the end. A finished branch
(result.json complete at T) is not retrained.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence

from engram_jax import checkpoint as ckpt_lib
from engram_jax import optim


def branch_point(run, budget: int) -> int:
  """k: the step of `run`'s checkpoint that the `budget`-step branch starts from (where its cooldown begins)."""
  return budget - optim.cooldown_steps(run.optimizer, budget)


def check_budgets(budgets: Sequence[int], run) -> tuple[int, ...]:
  """The budgets (steps) sorted, after checking that each can branch from `run`; ValueError naming the field."""
  if not budgets:
    return ()
  if run.optimizer.schedule != "wsd":
    raise ValueError(f"ExperimentConfig.budgets={tuple(budgets)} needs OptimizerConfig.schedule='wsd' (got "
                     f"{run.optimizer.schedule!r}): only a WSD run's learning rate before a cooldown is the same at "
                     "every length")
  if run.stop_after is not None or run.init_from is not None:
    raise ValueError("ExperimentConfig.budgets: leave RunConfig.stop_after and init_from unset; the runner sets them "
                     "per budget")
  if len(set(budgets)) != len(budgets):
    raise ValueError(f"ExperimentConfig.budgets={tuple(budgets)}: give distinct step counts")
  warmup = run.optimizer.warmup_steps
  for t in budgets:
    if not 0 < t < run.steps:
      raise ValueError(f"ExperimentConfig.budgets: {t} steps must be in (0, RunConfig.steps={run.steps}); the full "
                       "length is always reported")
    if branch_point(run, t) < max(warmup, 1):
      raise ValueError(f"ExperimentConfig.budgets: the {t}-step budget's cooldown starts at step "
                       f"{branch_point(run, t)}, before warmup_steps={warmup} end; drop it or lower decay_steps")
  return tuple(sorted(budgets))


def budget_dir(run_dir: str, budget: int) -> str:
  return os.path.join(run_dir, f"budget{budget}")


def _finished(model_dir: str, steps: int) -> dict | None:
  try:
    with open(os.path.join(model_dir, "result.json")) as f:
      result = json.load(f)
  except (OSError, ValueError):
    return None
  return result if result.get("status") == "complete" and result.get("steps") == steps else None


def train_with_budgets(train_fn: Callable, model, run, run_dir: str, budgets: Sequence[int],
                       log: Callable[[str], None] = print) -> tuple[dict, dict[int, dict]]:
  """Trains `run` in `run_dir` and a cooldown branch at every budget; (full run's result, {budget: result})."""
  results = {}
  for t in check_budgets(budgets, run):
    target = budget_dir(run_dir, t)
    done = _finished(target, t)
    if done is not None:
      results[t] = done
      continue
    k = branch_point(run, t)
    log(f"[{os.path.basename(run_dir)}] budget {t} steps: training the run to its branch point {k}")
    train_fn(model, dataclasses.replace(run, stop_after=k), run_dir)
    saved = ckpt_lib.finished_steps(os.path.join(run_dir, "checkpoints"))
    if k not in saved:
      raise ValueError(f"{run_dir}: the {t}-step budget branches at step {k}, but the run's checkpoints are at "
                       f"{saved} (it went past {k} before this budget was asked for). Fix: drop {t} from "
                       "ExperimentConfig.budgets, or train this point in a new out_dir")
    log(f"[{os.path.basename(run_dir)}] budget {t} steps: cooldown branch {k} -> {t}")
    results[t] = train_fn(model, dataclasses.replace(run, steps=t, init_from=run_dir, init_step=k), target)
  return train_fn(model, run, run_dir), results


def runs_at(runs: Sequence[dict], budget: int) -> list[dict]:
  """Run records with `train` replaced by their `budget`-step branch; records without that branch are left out."""
  return [dict(r, train=r["budgets"][str(budget)]) for r in runs if str(budget) in (r.get("budgets") or {})]
