"""What every converter shares: our side of the conversion (a layer's parameters as numpy arrays), shape checks
whose errors name the tensor and the expected shape, and writing parameters back into a layer.

Our parameters (`engram_jax.layers.engram.param_names`), letters G branches, D model width, E = H * d memory width,
J conv taps, V table rows (padded), T = total_rows (the real rows, sum of the head primes):
  table [V, d], value_proj [E, D], key_proj [G, E, D], gate_norm_h [G, D] (query norm), gate_norm_k [G, D] (key
  norm), conv_norm [G, D], conv_weight [J, G, D] (conv_weight[j] multiplies the input j * dilation back),
  value_bias [D] and key_bias [G, D] with EngramConfig.projection_bias.
Outside formats store only the T real rows of the table; rows T..V are padding that is never read (zero here).

Ablated layers: every outside layout has a short conv and a context gate. A layer without the conv
(EngramConfig.short_conv=False) is written as zero conv weights and unit conv norm gains, which compute the same
output (SiLU(0) = 0), and read back only if the file's conv weights are zero. A layer without the gate
(EngramConfig.gate=False, alpha = 1) has no form in these layouts (their gate is a sigmoid, never exactly 1).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np

from engram_jax.layers.engram import BIAS_NAMES, CONV_NAMES, param_names


def layer_params(layer) -> dict[str, np.ndarray]:
  """The layer's parameters as numpy arrays keyed by name (float32)."""
  return {name: np.asarray(getattr(layer, name)[...]) for name in param_names(layer.config)}


def expected_shapes(layer) -> dict[str, tuple[int, ...]]:
  """Shape of every parameter of `layer`."""
  return {name: tuple(getattr(layer, name)[...].shape) for name in param_names(layer.config)}


def check_gate(layer, fmt: str) -> None:
  """A layer without the context gate cannot be written to or read from a layout that always applies one."""
  if not layer.config.gate:
    raise ValueError(f"{fmt}: the layer has no context gate (EngramConfig.gate=False) and this layout always applies "
                     "one (a sigmoid, never exactly 1), so no file in it computes what the layer computes; keep "
                     "gate-less models in engram_jax run directories, or convert a model built with gate=True")


def _conv_shapes(layer) -> dict[str, tuple[int, ...]]:
  """The short conv's parameter shapes for the layer's config, whether or not the layer has the conv."""
  g, d = layer.config.num_branches, layer.d_model
  return {"conv_norm": (g, d), "conv_weight": (layer.config.kernel_size, g, d)}


def export_params(layer, fmt: str) -> dict[str, np.ndarray]:
  """The layer's parameters in the form every layout stores: a conv-less layer gets zero conv weights and unit conv
  norm gains (the same output); a gate-less layer is refused (check_gate)."""
  check_gate(layer, fmt)
  params = layer_params(layer)
  if not layer.config.short_conv:
    shapes = _conv_shapes(layer)
    params["conv_norm"] = np.ones(shapes["conv_norm"], np.float32)
    params["conv_weight"] = np.zeros(shapes["conv_weight"], np.float32)
  return params


def import_shapes(layer, fmt: str) -> dict[str, tuple[int, ...]]:
  """The shapes a layout's file must have for `layer` (conv shapes included for a conv-less layer)."""
  check_gate(layer, fmt)
  return expected_shapes(layer) | _conv_shapes(layer)


def drop_conv_if_zero(layer, params: dict[str, np.ndarray], fmt: str) -> dict[str, np.ndarray]:
  """A file's conv loaded into a conv-less layer: fine when its weights are zero (the conv adds nothing), an error
  otherwise."""
  if layer.config.short_conv:
    return params
  if np.any(params["conv_weight"] != 0):
    raise ValueError(f"{fmt}: the file's short conv weights are nonzero but the layer has no short conv; build it "
                     "with EngramConfig(short_conv=True)")
  return {k: v for k, v in params.items() if k not in CONV_NAMES}


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
