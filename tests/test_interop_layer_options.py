"""The demo's layer options (projection biases, separate gate / conv norm epsilons) against the NumPy reference."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from engram_jax.layers.engram import BIAS_NAMES, Engram, build_engram_layers
from engram_jax.layers.engram_config import DEMO_LAYER_OPTIONS, EngramConfig
import reference_engram as ref  # tests/ is on sys.path (pytest rootdir-relative import)

BASE = EngramConfig(max_ngram=3, heads_per_order=2, head_dim=4, table_base_sizes=(31, 37), num_branches=2, seed=5,
                    table_row_multiple=16)
D, V_RAW, LAYER = 8, 40, 1
COMP = (np.arange(V_RAW) % 25).astype(np.int32)
SCALE = 1e-3  # activations and rows this small make mean(x^2) ~ 1e-6, so the norm epsilons visibly matter


def _layer(cfg: EngramConfig, seed: int = 0) -> Engram:
  """A layer whose every parameter is random (biases, norms, conv), with a small-valued table."""
  layer = build_engram_layers(cfg, [LAYER, 4], D, COMP, rngs=nnx.Rngs(seed))[LAYER]
  rng = np.random.default_rng(seed)
  for name in ("conv_weight", "gate_norm_h", "gate_norm_k", "conv_norm") + BIAS_NAMES:
    if hasattr(layer, name):
      var = getattr(layer, name)
      base = 1.0 if "norm" in name else 0.0
      scale = SCALE if "bias" in name else 0.5
      var.set_value(jnp.asarray(rng.normal(size=var[...].shape) * scale + base, jnp.float32))
  layer.table.set_value(layer.table[...] * SCALE)
  return layer


def _reference(layer: Engram, h, ids, seg, *, gate_eps, conv_eps, hash_bits):
  cfg = layer.config
  primes = ref.demo_primes([LAYER, 4], cfg.max_ngram, cfg.heads_per_order, cfg.table_base_sizes)[LAYER]
  pad = int(COMP[cfg.pad_id])
  if hash_bits == 64:
    mult = ref.demo_multipliers(cfg.seed, LAYER, cfg.max_ngram, int(COMP.max()) + 1)
    local = ref.demo_ngram_hashes(COMP[np.asarray(ids)], mult, primes, pad)
  else:
    mult = ref.uint32_multipliers(cfg.seed, LAYER, cfg.max_ngram)
    local = ref.hash32_python(COMP[np.asarray(ids)], seg, mult, primes, pad)
  sizes = [p for order in primes for p in order]
  rows = local + np.concatenate([[0], np.cumsum(sizes)[:-1]])
  p = {k: np.asarray(v[...], np.float64) for k, v in nnx.state(layer, nnx.Param).items()}
  return ref.engram_forward(np.asarray(h, np.float64), rows, seg, p["table"], p["value_proj"], p["key_proj"],
                            p["gate_norm_h"], p["gate_norm_k"], p["conv_norm"], p["conv_weight"], cfg.max_ngram,
                            cfg.norm_eps, b_v=p.get("value_bias"), b_k=p.get("key_bias"), gate_eps=gate_eps,
                            conv_eps=conv_eps)


def _inputs(b=2, s=13, seed=0):
  rng = np.random.default_rng(seed)
  h = jnp.asarray(rng.normal(size=(b, s, BASE.num_branches, D)) * SCALE, jnp.float32)
  return h, jnp.asarray(rng.integers(0, V_RAW, (b, s)), jnp.int32)


def test_biases_and_two_epsilons_match_numpy_reference():
  cfg = dataclasses.replace(BASE, projection_bias=True, gate_norm_eps=1.1920929e-07, conv_norm_eps=1e-5)
  layer = _layer(cfg)
  h, ids = _inputs()
  seg = np.array([[1] * 6 + [2] * 7, [1] * 13])
  got = np.asarray(layer(h, ids, jnp.asarray(seg, jnp.int32)))
  want = _reference(layer, h, ids, seg, gate_eps=1.1920929e-07, conv_eps=1e-5, hash_bits=32)
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-9)
  # The test can tell the epsilons apart: swapped or merged, the reference moves far outside the tolerance.
  for gate_eps, conv_eps in ((1e-5, 1.1920929e-07), (1e-6, 1e-6)):
    other = _reference(layer, h, ids, seg, gate_eps=gate_eps, conv_eps=conv_eps, hash_bits=32)
    assert np.max(np.abs(other - got) / (np.abs(want) + 1e-9)) > 1e-2


def test_demo_options_with_int64_hash_match_numpy_reference():
  cfg = dataclasses.replace(BASE, **DEMO_LAYER_OPTIONS)
  h, ids = _inputs(seed=3)
  with jax.enable_x64(True):
    layer = _layer(cfg, seed=2)
    got = np.asarray(layer(h, ids))
  want = _reference(layer, h, ids, None, gate_eps=DEMO_LAYER_OPTIONS["gate_norm_eps"],
                    conv_eps=DEMO_LAYER_OPTIONS["conv_norm_eps"], hash_bits=64)
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-9)


def test_bias_changes_output_and_defaults_are_unchanged():
  cfg = dataclasses.replace(BASE, projection_bias=True)
  layer = _layer(cfg, seed=4)
  h, ids = _inputs(seed=4)
  with_bias = np.asarray(layer(h, ids))
  layer.value_bias.set_value(jnp.zeros_like(layer.value_bias[...]))
  layer.key_bias.set_value(jnp.zeros_like(layer.key_bias[...]))
  assert np.abs(np.asarray(layer(h, ids)) - with_bias).max() > 1e-6
  default = build_engram_layers(BASE, [LAYER], D, COMP, rngs=nnx.Rngs(0))[LAYER]
  assert not any(hasattr(default, n) for n in BIAS_NAMES)
  assert (BASE.gate_eps, BASE.conv_eps) == (BASE.norm_eps, BASE.norm_eps) == (1e-6, 1e-6)
  assert layer.key_bias.get_metadata()["out_sharding"] == ("branches", "embed")
  assert layer.value_bias.get_metadata()["out_sharding"] == ("embed",)


def test_table_padding_rows_are_zero_at_init():
  layer = build_engram_layers(BASE, [LAYER], D, COMP, rngs=nnx.Rngs(0))[LAYER]
  table = np.asarray(layer.table[...])
  assert layer.num_rows > layer.spec.total_rows
  assert not table[layer.spec.total_rows:].any() and np.all(table[:layer.spec.total_rows].std(-1) > 0)


@pytest.mark.parametrize("field,value", [("gate_norm_eps", 0.0), ("conv_norm_eps", -1e-5), ("norm_eps", 0.0)])
def test_bad_epsilons_name_the_field(field, value):
  with pytest.raises(ValueError, match=f"EngramConfig.{field}"):
    dataclasses.replace(BASE, **{field: value})
