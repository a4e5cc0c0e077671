"""The official Engram demo's PyTorch state dict (deepseek-ai/Engram, engram_demo_v1.py) <-> our parameters.

The demo's `Engram` module (names relative to it; a full model adds a prefix such as 'layers.1.engram.'),
T = sum of the head primes, G branches (hc_mult), D width, E memory width, J conv taps, H hash heads:
  multi_head_embedding.embedding.weight  [T, d]      the flat table (heads at their offsets)   -> table[:T]
  multi_head_embedding.offsets           [H] int64   first row of each head (a buffer)         -> the hash spec
  value_proj.weight [D, E], value_proj.bias [D]      nn.Linear, [out, in]       -> value_proj.T, value_bias
  key_projs.{g}.weight [D, E], key_projs.{g}.bias [D]                           -> key_proj[g].T, key_bias[g]
  norm1.{g}.weight [D]                               RMSNorm of the key                        -> gate_norm_k[g]
  norm2.{g}.weight [D]                               RMSNorm of the hidden state (query)       -> gate_norm_h[g]
  short_conv.norms.{g}.weight [D]                    RMSNorm before the conv                   -> conv_norm[g]
  short_conv.conv.weight [G * D, 1, J]               depthwise nn.Conv1d, channel g * D + i,   -> conv_weight
                                                     causal: tap J-1-j reads the input j * dilation back
The demo's layer also needs EngramConfig options that no tensor records: projection_bias=True, gate norms with
torch's default epsilon (float32 machine epsilon), conv norms with 1e-5, the int64 hash (`DEMO_LAYER_OPTIONS`).
Files: safetensors (a torch state dict saved with `safetensors.torch.save_file`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from engram_jax.interop import common
from engram_jax.interop.safetensors_io import open_tensors, write_safetensors

FORMAT = "engram demo state dict"


def to_demo_state_dict(layer, prefix: str = "") -> dict[str, np.ndarray]:
  """Our layer -> the demo's state dict (float32; biases are zero when the layer has none, the conv is zero when the
  layer has none; a gate-less layer is refused)."""
  p = common.export_params(layer, FORMAT)
  g, e, d = p["key_proj"].shape
  taps = p["conv_weight"].shape[0]
  t = layer.spec.total_rows
  out = {"multi_head_embedding.embedding.weight": p["table"][:t],
         "multi_head_embedding.offsets": np.asarray(layer.spec.offsets, np.int64),
         "value_proj.weight": p["value_proj"].T,
         "value_proj.bias": p.get("value_bias", np.zeros((d,), np.float32)),
         # [J, G, D] -> [G, D, J] (channel g * D + i), taps reversed: torch's causal conv reads tap J-1 at t.
         "short_conv.conv.weight": p["conv_weight"][::-1].transpose(1, 2, 0).reshape(g * d, 1, taps)}
  key_bias = p.get("key_bias", np.zeros((g, d), np.float32))
  for i in range(g):
    out[f"key_projs.{i}.weight"] = p["key_proj"][i].T
    out[f"key_projs.{i}.bias"] = key_bias[i]
    out[f"norm1.{i}.weight"] = p["gate_norm_k"][i]
    out[f"norm2.{i}.weight"] = p["gate_norm_h"][i]
    out[f"short_conv.norms.{i}.weight"] = p["conv_norm"][i]
  return {prefix + k: np.ascontiguousarray(v) for k, v in out.items()}


def from_demo_state_dict(layer, state_dict, prefix: str = "") -> dict[str, np.ndarray]:
  """The demo's state dict -> our parameters for `layer` (shapes, head offsets and branch count checked)."""
  shapes = common.import_shapes(layer, FORMAT)
  g, e, d = shapes["key_proj"]
  taps = shapes["conv_weight"][0]
  t, hd = layer.spec.total_rows, shapes["table"][1]

  def get(name, shape, hint=""):
    return common.check_shape(prefix + name, state_dict.get(prefix + name), shape, FORMAT, hint)

  offsets = state_dict.get(prefix + "multi_head_embedding.offsets")
  if offsets is not None:
    want = np.asarray(layer.spec.offsets, np.int64)
    got = common.check_shape(prefix + "multi_head_embedding.offsets", offsets, want.shape, FORMAT,
                             "the number of hash heads (max_ngram - 1) * heads_per_order differs")
    if not np.array_equal(got.astype(np.int64), want):
      raise ValueError(f"{FORMAT}: tensor {prefix}multi_head_embedding.offsets is {got.tolist()}, expected "
                       f"{want.tolist()}; {common.table_hint(layer)}")
  head = prefix + "key_projs."
  extra = sorted(k for k in state_dict if k.startswith(head) and int(k[len(head):].split(".")[0]) >= g)
  if extra:
    raise ValueError(f"{FORMAT}: tensors {extra} name more than num_branches={g} key projections; set "
                     "EngramConfig.num_branches to the demo's hc_mult")
  conv = get("short_conv.conv.weight", (g * d, 1, taps), "kernel_size, num_branches or d_model differ")
  params = {
      "table": common.pad_table(layer, get("multi_head_embedding.embedding.weight", (t, hd), common.table_hint(layer))),
      "value_proj": get("value_proj.weight", (d, e), "memory width (max_ngram - 1) * heads_per_order * head_dim "
                        "or d_model differ").T,
      "value_bias": get("value_proj.bias", (d,)),
      "key_proj": np.stack([get(f"key_projs.{i}.weight", (d, e)).T for i in range(g)]),
      "key_bias": np.stack([get(f"key_projs.{i}.bias", (d,)) for i in range(g)]),
      "gate_norm_k": np.stack([get(f"norm1.{i}.weight", (d,)) for i in range(g)]),
      "gate_norm_h": np.stack([get(f"norm2.{i}.weight", (d,)) for i in range(g)]),
      "conv_norm": np.stack([get(f"short_conv.norms.{i}.weight", (d,)) for i in range(g)]),
      "conv_weight": conv.reshape(g, d, taps).transpose(2, 0, 1)[::-1],  # [J, G, D], tap j reads j * dilation back
  }
  params = {k: np.ascontiguousarray(v, np.float32) for k, v in params.items()}
  return common.drop_conv_if_zero(layer, common.drop_biases_if_zero(layer, params, FORMAT), FORMAT)


def save_demo(layer, path: str | Path, prefix: str = "") -> None:
  """Writes the layer as the demo's state dict to a safetensors file (atomic)."""
  write_safetensors(path, to_demo_state_dict(layer, prefix), {"format": "pt", "engram_jax": FORMAT})


def load_demo(layer, path: str | Path, prefix: str = "") -> None:
  """Reads the demo's state dict (a safetensors file or a sharded directory) into `layer` in place."""
  tensors = open_tensors(path)
  common.load_params(layer, from_demo_state_dict(layer, tensors, prefix), FORMAT)
