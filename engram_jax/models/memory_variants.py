"""Ways to spend a given number of hashed n-gram table slots on a backbone, for like-for-like comparisons.

  'engram'             the full Engram module (arXiv 2601.07372) at `engram_layers`: gate, short conv, the
                       EngramConfig's orders and heads;
  'overencoding'       OverEncoding (arXiv 2501.16975): hashed n-gram embeddings of the same orders and heads added
                       to the input embedding only (an Engram layer at block 0, before any attention, with the gate
                       and the conv off; W_V is the linear map from the concatenated slices to the model width);
  'bigram_every_layer' a plain hashed bigram table at every layer (the nanochat-style variant): order 2, one head,
                       no gate, no conv; each layer has its own table and W_V.
Every variant gets (about) `slots` table rows in total, over layers, orders and heads; the exact count is
engram_jax.budget.engram_table_rows of the returned config (each head's size is a prime).
"""

from __future__ import annotations

import dataclasses

from engram_jax.models.config import ModelConfig

VARIANTS = ("engram", "overencoding", "bigram_every_layer")


def memory_model(backbone: ModelConfig, variant: str, slots: int, engram_layers: tuple[int, ...] = (1,)
                 ) -> ModelConfig:
  """`backbone` (its `engram` field gives head_dim, orders, heads and branches) with `slots` table rows as
  `variant`. engram_layers is used by 'engram' only."""
  if variant not in VARIANTS:
    raise ValueError(f"memory variant {variant!r}: use one of {VARIANTS}")
  if backbone.engram is None:
    raise ValueError("memory_model: backbone.engram is None; give the EngramConfig whose head_dim, orders and heads "
                     "the variants share (ModelConfig.engram)")
  e = backbone.engram
  changes = {}
  if variant == "engram":
    layers = tuple(engram_layers)
  elif variant == "overencoding":
    layers, changes = (0,), dict(gate=False, short_conv=False)
  else:
    layers = tuple(range(backbone.num_layers))
    changes = dict(gate=False, short_conv=False, max_ngram=2, heads_per_order=1)
  n, k = changes.get("max_ngram", e.max_ngram), changes.get("heads_per_order", e.heads_per_order)
  per_head = slots // (len(layers) * (n - 1) * k)
  if per_head < 2:
    raise ValueError(f"memory_model: slots={slots} leave {per_head} rows per head for {variant!r} "
                     f"({len(layers)} layers x {(n - 1) * k} heads); give at least {2 * len(layers) * (n - 1) * k}")
  e = dataclasses.replace(e, **changes, table_base_sizes=(per_head,) * (n - 1), memory_dim=None)
  return dataclasses.replace(backbone, engram=e, engram_layers=layers)
