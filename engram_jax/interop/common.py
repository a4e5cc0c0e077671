"""What every converter shares: our side of the conversion (a layer's parameters as numpy arrays), shape checks
whose errors name the tensor and the expected shape, and writing parameters back into a layer.

Our parameters (`engram_jax.layers.engram.param_names`), letters G branches, D model width, E = H * d memory width,
J conv taps, V table rows (padded), T = total_rows (the real rows, sum of the head primes):
  table [V, d], value_proj [E, D], key_proj [G, E, D], gate_norm_h [G, D] (query norm), gate_norm_k [G, D] (key
  norm), conv_norm [G, D], conv_weight [J, G, D] (conv_weight[j] multiplies the input j * dilation back),
  value_bias [D] and key_bias [G, D] with EngramConfig.projection_bias.
Outside formats store only the T real rows of the table; rows T..V are padding that is never read (zero here).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np

from engram_jax.layers.engram import BIAS_NAMES, param_names


def layer_params(layer) -> dict[str, np.ndarray]:
  """The layer's parameters as numpy arrays keyed by name (float32)."""
  return {name: np.asarray(getattr(layer, name)[...]) for name in param_names(layer.config)}


def expected_shapes(layer) -> dict[str, tuple[int, ...]]:
  """Shape of every parameter of `layer`."""
  return {name: tuple(getattr(layer, name)[...].shape) for name in param_names(layer.config)}


def check_shape(name: str, value, expected: tuple[int, ...], fmt: str, hint: str = "") -> np.ndarray:
  """`value` as an array of shape `expected`, else ValueError naming the tensor, both shapes and a hint."""
  if value is None:
    raise ValueError(f"{fmt}: tensor {name!r} is missing (expected shape {tuple(expected)})")
  a = np.asarray(value)
  if tuple(a.shape) != tuple(expected):
    raise ValueError(f"{fmt}: tensor {name!r} has shape {tuple(a.shape)}, expected {tuple(expected)}"
                     + (f"; {hint}" if hint else ""))
  return a


def table_hint(layer) -> str:
  """What to check when a table's row count differs."""
  return (f"the table must hold the {layer.spec.total_rows} rows of this layer's {layer.spec.num_heads} head primes "
          f"({', '.join(str(p) for o in layer.spec.primes for p in o)}): check table_base_sizes, heads_per_order, "
          "max_ngram and the layer ids the primes were allocated for")


def pad_table(layer, rows: np.ndarray) -> np.ndarray:
  """The T real rows [T, d] -> the layer's padded table [V, d] (padding rows zero), float32."""
  out = np.zeros((layer.num_rows, rows.shape[1]), np.float32)
  out[:rows.shape[0]] = rows
  return out


def drop_biases_if_zero(layer, params: dict[str, np.ndarray], fmt: str) -> dict[str, np.ndarray]:
  """A checkpoint with biases loaded into a bias-free layer: fine when they are zero, an error otherwise."""
  if layer.config.projection_bias:
    return params
  for name in BIAS_NAMES:
    if name in params and np.any(params[name] != 0):
      raise ValueError(f"{fmt}: the checkpoint's {name} is nonzero but the layer has no projection biases; build it "
                       "with EngramConfig(projection_bias=True)")
  return {k: v for k, v in params.items() if k not in BIAS_NAMES}


def load_params(layer, params: Mapping[str, np.ndarray], fmt: str = "load_params") -> None:
  """Writes {name: array} into the NNX layer in place, every name present and every shape checked."""
  shapes = expected_shapes(layer)
  extra = set(params) - set(shapes)
  if extra:
    raise ValueError(f"{fmt}: unexpected parameters {sorted(extra)} for this layer")
  for name, shape in shapes.items():
    value = check_shape(name, params.get(name), shape, fmt)
    var = getattr(layer, name)
    var.set_value(jnp.asarray(value, var[...].dtype))
