"""Optax parameter groups: the backbone under AdamW, Engram tables under their own optimizer.

Paper (arXiv 2601.07372, Appendix A): Engram embeddings use Adam with the learning rate x5 and weight decay 0,
apart from the backbone optimizer. Here:
  - 'backbone': AdamW, linear warmup then cosine decay (or warmup-stable-decay, `schedule='wsd'`); weight decay on matrices only (ndim >= 2), never on
    norm scales or biases;
  - 'table': every `EngramTable` parameter (and only those) at `table_lr_multiplier` x the backbone schedule,
    under `table_optimizer`: 'adam_dense' (the paper's Adam on the dense [V, d] gradient, weight decay
    `table_weight_decay`, default 0; 'adam' is the same), or a row-sparse optimizer that reads and writes only the
    rows a step touched ('adam_lazy', 'adagrad_rowwise', 'sgd': engram_jax.sparse_tables, no weight decay; 'sgd'
    falls back to optax SGD on the dense gradient with EngramConfig.lookup='all_to_all', same math);
  - gradients are clipped by their GLOBAL norm over both groups before the split;
  - MoE balance biases are `nnx.Variable`s, not `nnx.Param`s: they are not in the optimized tree at all and are
    updated by the train loop outside the gradient.

Optimizers here work on pure pytrees (nested dicts of arrays, `nnx.to_pure_dict` of the `nnx.Param` state).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from engram_jax.config_checks import check_types

BACKBONE = "backbone"
TABLE = "table"
SCHEDULES = ("cosine", "wsd")
TABLE_OPTIMIZERS = ("adam_dense", "sgd", "adam_lazy", "adagrad_rowwise")
SPARSE_TABLE_OPTIMIZERS = ("adam_lazy", "adagrad_rowwise", "sgd")  # row-sparse: engram_jax.sparse_tables
SPARSE_ONLY = ("adam_lazy", "adagrad_rowwise")  # no dense form in make_optimizer


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """Learning-rate schedule and the two parameter groups."""

  learning_rate: float = 1e-3  # Backbone peak learning rate.
  warmup_steps: int = 100  # Linear warmup from lr/warmup to lr over this many steps.
  min_lr_ratio: float = 0.1  # The decay ends at min_lr_ratio * lr on the last training step.
  # 'cosine': warmup, then cosine decay over all remaining steps. 'wsd' (warmup-stable-decay): warmup, constant
  # peak, then a linear cooldown over the last decay steps; the schedule before the cooldown does not depend on
  # the run's length, so runs of several lengths can branch from one run's checkpoints (RunConfig.init_from).
  schedule: str = "cosine"
  decay_fraction: float = 0.2  # Only 'wsd': the cooldown is round(decay_fraction * total steps) steps (>= 1).
  decay_steps: int | None = None  # Only 'wsd': the cooldown length in steps (overrides decay_fraction).
  weight_decay: float = 0.1  # Backbone AdamW decoupled weight decay (matrices only).
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  grad_clip_norm: float = 1.0  # Global-norm clipping over all groups; 0 turns it off.
  # 'adam_dense' (paper; 'adam' is the same), or row-sparse (step cost O(tokens), not O(rows)): 'sgd' (no state),
  # 'adam_lazy' (LazyAdam: touched rows only) or 'adagrad_rowwise' (one accumulator per row).
  table_optimizer: str = "adam_dense"
  table_lr_multiplier: float = 5.0  # Paper: Engram embeddings at 5x the backbone learning rate.
  table_weight_decay: float = 0.0  # Paper: no weight decay on Engram embeddings.

  def __post_init__(self):
    check_types(self)  # a wrong type fails here, naming the field, not inside a comparison below
    if self.learning_rate <= 0:
      raise ValueError(f"OptimizerConfig.learning_rate={self.learning_rate} must be > 0")
    if self.warmup_steps < 0:
      raise ValueError(f"OptimizerConfig.warmup_steps={self.warmup_steps} must be >= 0")
    if not 0 <= self.min_lr_ratio <= 1:
      raise ValueError(f"OptimizerConfig.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
    if self.schedule not in SCHEDULES:
      raise ValueError(f"OptimizerConfig.schedule={self.schedule!r}: use one of {SCHEDULES}")
    if not 0 < self.decay_fraction <= 1:
      raise ValueError(f"OptimizerConfig.decay_fraction={self.decay_fraction} must be in (0, 1]")
    if self.decay_steps is not None and self.decay_steps < 1:
      raise ValueError(f"OptimizerConfig.decay_steps={self.decay_steps} must be >= 1 (or None: decay_fraction)")
    if self.table_optimizer == "adam":  # the name before the sparse optimizers existed (older run directories)
      object.__setattr__(self, "table_optimizer", "adam_dense")
    if self.table_optimizer not in TABLE_OPTIMIZERS:
      raise ValueError(f"OptimizerConfig.table_optimizer={self.table_optimizer!r}: use one of {TABLE_OPTIMIZERS}")
    if self.table_optimizer != "adam_dense" and self.table_weight_decay:
      raise ValueError(f"OptimizerConfig.table_weight_decay must be 0 with table_optimizer="
                       f"{self.table_optimizer!r} (only 'adam_dense' has weight decay)")
    if self.grad_clip_norm < 0 or self.table_lr_multiplier <= 0 or self.weight_decay < 0:
      raise ValueError("OptimizerConfig: grad_clip_norm and weight_decay must be >= 0, table_lr_multiplier > 0")


def cooldown_steps(config: OptimizerConfig, total_steps: int) -> int:
  """Length C of the 'wsd' cooldown for a run of `total_steps` (0 for 'cosine')."""
  if config.schedule != "wsd":
    return 0
  c = config.decay_steps if config.decay_steps is not None else round(config.decay_fraction * total_steps)
  return max(1, min(int(c), total_steps))


def learning_rate_schedule(config: OptimizerConfig, total_steps: int) -> Callable[[jax.Array], jax.Array]:
  """step (0-based count of updates already applied) -> backbone learning rate.

  Warmup: lr(t) = peak * (t + 1) / W for t < W. Then, with T = total_steps, m = min_lr_ratio:
    'cosine': a cosine from peak (t = W) down to m * peak (t = T - 1);
    'wsd':    peak until the cooldown's C steps (`cooldown_steps`), then linear: lr(t) = peak * (1 - (1 - m) *
              (t - (T - C) + 1) / C) for T - C <= t < T, reaching m * peak on the last update.
  """
  peak, warmup = config.learning_rate, config.warmup_steps
  if config.schedule == "wsd":
    c = cooldown_steps(config, total_steps)
    if total_steps - c < warmup:
      raise ValueError(f"OptimizerConfig: the wsd cooldown ({c} steps) starts at step {total_steps - c}, before "
                       f"warmup_steps={warmup} end (TRAIN_STEPS={total_steps}); lower decay_steps / decay_fraction "
                       "or warmup_steps")
  decay_steps = max(total_steps - 1 - warmup, 1)

  def schedule(step):
    t = jnp.asarray(step, jnp.float32)
    warm = peak * jnp.minimum((t + 1.0) / max(warmup, 1), 1.0)
    if config.schedule == "wsd":
      frac = jnp.clip((t - (total_steps - c) + 1.0) / c, 0.0, 1.0)
      after = peak * (1.0 - (1.0 - config.min_lr_ratio) * frac)
    else:
      frac = jnp.clip((t - warmup) / decay_steps, 0.0, 1.0)
      after = peak * (config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + jnp.cos(math.pi * frac)))
    return jnp.where(t < warmup, warm, after)

  return schedule


def _table_types() -> tuple[type, ...]:
  """The nnx.Param subclass(es) that mark Engram tables (empty while the Engram layer is absent)."""
  try:
    from engram_jax.layers.engram import EngramTable
  except ImportError:
    return ()
  return (EngramTable,)


def param_labels(params: nnx.State, table_types: tuple[type, ...] | None = None) -> dict:
  """The nnx.Param state (Variable leaves) -> pure dict of group labels: 'table' for EngramTable, else 'backbone'."""
  table_types = _table_types() if table_types is None else table_types
  labels = jax.tree.map(lambda v: TABLE if isinstance(v, table_types) else BACKBONE, params,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.to_pure_dict(labels)


def decay_mask(params: dict) -> dict:
  """Pure params -> bool tree: weight-decay matrices (ndim >= 2) only."""
  return jax.tree.map(lambda p: np.ndim(p) >= 2, params)


def make_optimizer(config: OptimizerConfig, total_steps: int, labels: dict) -> optax.GradientTransformation:
  """Global-norm clip -> {'backbone': AdamW + warmup/cosine, 'table': Adam|SGD at lr x multiplier}.

  `labels` is `param_labels(...)`: a pure dict with the params' structure.
  """
  if config.table_optimizer in SPARSE_ONLY:
    raise ValueError(f"make_optimizer: table_optimizer={config.table_optimizer!r} is row-sparse; its tables are "
                     "updated by engram_jax.sparse_tables and the backbone by backbone_optimizer")
  backbone = backbone_optimizer(config, total_steps)
  table_schedule = table_learning_rate(config, total_steps)
  if config.table_optimizer == "adam_dense":
    # Paper: Adam; decoupled decay (0 by default) applies to every table row.
    table = optax.adamw(table_schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                        weight_decay=config.table_weight_decay)
  else:
    table = optax.sgd(table_schedule)
  clip = optax.clip_by_global_norm(config.grad_clip_norm) if config.grad_clip_norm else optax.identity()
  return optax.chain(clip, optax.multi_transform({BACKBONE: backbone, TABLE: table}, labels))


def backbone_optimizer(config: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
  """AdamW with warmup/cosine, weight decay on matrices only (no clipping: the caller clips over every group)."""
  return optax.adamw(learning_rate_schedule(config, total_steps), b1=config.b1, b2=config.b2, eps=config.eps,
                     weight_decay=config.weight_decay, mask=decay_mask)


def table_learning_rate(config: OptimizerConfig, total_steps: int) -> Callable[[jax.Array], jax.Array]:
  """step -> the table group's learning rate (table_lr_multiplier x the backbone schedule)."""
  schedule = learning_rate_schedule(config, total_steps)
  return lambda step: config.table_lr_multiplier * schedule(step)


def opt_state_shardings(tx: optax.GradientTransformation, params: dict, param_shardings: dict,
                        replicated: jax.sharding.Sharding):
  """Shardings of `tx.init(params)`: moments follow their parameter's sharding, counters are replicated."""
  shapes = jax.eval_shape(tx.init, params)
  keep = lambda p, s: optax.MaskedNode() if isinstance(p, optax.MaskedNode) else s  # other group's slots
  return optax.tree_map_params(tx, keep, shapes, param_shardings,
                               transform_non_params=lambda _: replicated,
                               is_leaf=lambda x: isinstance(x, optax.MaskedNode))


def group_sizes(labels: dict, params: dict) -> dict[str, int]:
  """Number of scalars per group (for logs and tests)."""
  sizes = {BACKBONE: 0, TABLE: 0}
  for label, p in zip(jax.tree.leaves(labels), jax.tree.leaves(params)):
    sizes[label] += int(np.prod(np.shape(p)))
  return sizes
