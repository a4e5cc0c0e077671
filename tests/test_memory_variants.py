"""OverEncoding and every-layer bigram tables as model options: shapes, slots, causality, and with the tables zeroed
each equals the plain MoE model with the same backbone parameters.

Letters: B batch, S sequence, V vocabulary.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from engram_jax import budget
from engram_jax.layers.engram_config import EngramConfig
from engram_jax.layers.moe_config import MoEConfig
from engram_jax.models.config import ModelConfig
from engram_jax.models.decoder import Decoder
from engram_jax.models.memory_variants import VARIANTS, memory_model

V, S = 40, 9
MOE = ModelConfig(vocab_size=V, d_model=16, num_layers=3, num_heads=2, num_kv_heads=1, head_dim=8, dense_hidden=32,
                  moe=MoEConfig(num_experts=4, num_shared_experts=1, top_k=2, expert_hidden=8),
                  engram=EngramConfig(max_ngram=3, heads_per_order=2, head_dim=4, table_row_multiple=1))
SLOTS = 1200
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, V, (2, S)), jnp.int32)


def build(cfg):
  return Decoder(cfg, rngs=nnx.Rngs(1))


def test_variants_place_the_memory_as_documented():
  oe, bg, en = (memory_model(MOE, v, SLOTS) for v in ("overencoding", "bigram_every_layer", "engram"))
  assert oe.engram_layers == (0,) and not oe.engram.gate and not oe.engram.short_conv
  assert bg.engram_layers == (0, 1, 2) and (bg.engram.max_ngram, bg.engram.heads_per_order) == (2, 1)
  assert not bg.engram.gate and not bg.engram.short_conv
  assert en.engram_layers == (1,) and en.engram.gate and en.engram.short_conv
  for cfg in (oe, bg, en):  # the same slots, up to each head's prime rounding
    rows = budget.engram_table_rows(cfg)
    assert SLOTS <= rows < SLOTS * 1.05, (cfg.engram_layers, rows)
    model = nnx.eval_shape(lambda: build(cfg))
    assert sum(b.engram.table.shape[0] for b in model.blocks if b.engram is not None) == rows
  with pytest.raises(ValueError, match="unigram"):
    memory_model(MOE, "unigram", SLOTS)
  with pytest.raises(ValueError, match="slots=6"):
    memory_model(MOE, "engram", 6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_is_causal_with_the_right_shapes(variant):
  model = build(memory_model(MOE, variant, SLOTS))
  logits, aux = model(TOKENS)
  assert logits.shape == (2, S, V) and np.isfinite(np.asarray(logits)).all()
  changed = TOKENS.at[:, 5].set((TOKENS[:, 5] + 1) % V)
  other = np.asarray(model(changed)[0])
  np.testing.assert_array_equal(other[:, :5], np.asarray(logits)[:, :5])  # nothing before position 5 moves
  assert np.abs(other[:, 5:] - np.asarray(logits)[:, 5:]).max() > 1e-4
  if variant != "engram":
    np.testing.assert_array_equal(np.asarray(aux["engram_gate_mean"]), 1.0)  # no gate: alpha = 1


@pytest.mark.parametrize("variant", VARIANTS)
def test_zeroed_tables_equal_the_plain_moe_model(variant):
  plain = build(dataclasses.replace(MOE, engram=None))
  model = build(memory_model(MOE, variant, SLOTS))
  # give the memory model the plain model's backbone parameters, and zero its tables
  backbone = nnx.to_flat_state(nnx.state(plain, nnx.Param))
  state = nnx.state(model, nnx.Param)
  flat = dict(nnx.to_flat_state(state))
  for path, var in backbone:
    flat[path].set_value(var.get_value())
  for path, var in flat.items():
    if path[-1] == "table":
      var.set_value(jnp.zeros_like(var.get_value()))
  nnx.update(model, state)
  want = np.asarray(plain(TOKENS)[0])
  np.testing.assert_allclose(np.asarray(model(TOKENS)[0]), want, rtol=1e-6, atol=1e-6)
  # and a non-zero table changes the output (the memory is wired in)
  for path, var in flat.items():
    if path[-1] == "table":
      var.set_value(jax.random.normal(jax.random.key(0), var.get_value().shape))
  nnx.update(model, state)
  assert np.abs(np.asarray(model(TOKENS)[0]) - want).max() > 1e-3
