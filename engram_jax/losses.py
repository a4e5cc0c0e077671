"""Language-model loss terms on packed rows (segment ids mark documents; 0 is padding).

Letters: B batch, S sequence, V vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Batch = dict[str, np.ndarray]


def shift_right(targets: jax.Array, segment_ids: jax.Array) -> jax.Array:
  """Decoder inputs [B, S]: the previous token of the same document, 0 (pad, acting as BOS) at document starts."""
  prev = jnp.pad(targets, ((0, 0), (1, 0)))[:, :-1]  # [B, S]
  prev_seg = jnp.pad(segment_ids, ((0, 0), (1, 0)))[:, :-1]  # [B, S]
  return jnp.where(prev_seg == segment_ids, prev, 0)


def cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(sum of weighted token NLL, sum of weights) for logits [B, S, V] and integer targets [B, S]."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [B, S, V]
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]  # [B, S]
  weights = weights.astype(jnp.float32)
  return jnp.sum(nll * weights), jnp.sum(weights)


def lm_terms(model: nnx.Module, batch: Batch, engram_rows: dict | None = None) -> tuple[jax.Array, jax.Array, dict]:
  """Next-token NLL sum and token count over the non-pad positions of a packed batch, and the model's aux.
  engram_rows (optional): per Engram layer, its table rows already gathered for these inputs [B, S, H, d]."""
  inputs = shift_right(batch["targets"], batch["segment_ids"])
  logits, aux = model(inputs, segment_ids=batch["segment_ids"], positions=batch["positions"],
                      engram_rows=engram_rows)  # [B, S, V]
  nll, count = cross_entropy(logits, batch["targets"], batch["segment_ids"] > 0)
  return nll, count, aux

