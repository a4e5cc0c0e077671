"""A DeepSeek-V4.1-style Engram layout (fp8 tables with ue8m0 block scales) <-> our parameters.

The layout, as public serving code for DeepSeek-V4.1-Flash reads it (Engram at layers 1 and 14, orders 2..4,
8 heads per order, 256-wide rows: E = 3 * 8 * 256 = 6144; about 384M rows per table). Per Engram layer L, names
'layers.{L}.engram.*', T = sum of the layer's head primes, G branches (hc_mult), D hidden size:
  embed.weight  [T, d]                 float8_e4m3fn   the flat table, heads at prefix-sum offsets -> table[:T]
  embed.scale   [T, d / 32]            float8_e8m0fnu  one power-of-two scale per 32 values of a row
  wkv.weight    [(G + 1) * D, E]       float8_e4m3fn   fused [out, in] projection: the G key projections first
                                                       (rows g * D .. g * D + D), the shared value projection last
                                                       -> key_proj[g] = rows.T, value_proj = last D rows.T
  wkv.scale     [(G + 1) * D / 32, E / 32]  float8_e8m0fnu  32 x 32 blocks
  k_weight      [G, D]                 bfloat16        RMSNorm gain of the key           -> gate_norm_k
  q_weight      [G, D]                 bfloat16        RMSNorm gain of the hidden state  -> gate_norm_h
The V4.1 module has no short convolution and no projection biases. Loading sets conv_weight = 0 (our conv branch
then adds SiLU(0) = 0, i.e. exactly no conv) and zero biases; exporting a layer whose conv or biases are nonzero
raises unless `drop_conv=True`. Both gate norms use the model's rms_norm_eps: set EngramConfig.gate_norm_eps to it.
The hash must match too: the same compression map (tokenizer), seed, primes and the int64 hash (hash_bits=64).

Metadata: `export_v41` stores the layer's Engram config under the safetensors metadata key 'config' (JSON, the
model config's key names: engram_layer_ids, engram_num_embeddings, engram_max_ngram_size, engram_n_heads,
engram_head_dim, engram_pad_token_id, engram_compressed_vocab_size, hc_mult, hidden_size); `load_v41` checks
whatever of it is present (or a `config` mapping / config.json you pass) against the layer.
Not checked against released weights (they cannot be downloaded here): the key order inside wkv is the serving
code's reading.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

from engram_jax.interop import common, fp8
from engram_jax.interop.safetensors_io import open_tensors, write_safetensors

FORMAT = "DeepSeek-V4.1-style engram layout"
TABLE_BLOCK = (1, 32)  # one scale per 32 values of a row
WEIGHT_BLOCK = (32, 32)


def _names(layer_id: int) -> dict[str, str]:
  p = f"layers.{layer_id}.engram."
  return {k: p + k for k in ("embed.weight", "embed.scale", "wkv.weight", "wkv.scale", "k_weight", "q_weight")}


def engram_config(layer, layer_ids=None, num_embeddings=None) -> dict:
  """The layer's Engram config under the V4.1 model config's key names (one layer unless lists are given)."""
  cfg, spec = layer.config, layer.spec
  return {"engram_layer_ids": list(layer_ids or [spec.layer_id]),
          "engram_num_embeddings": list(num_embeddings or [spec.total_rows]),
          "engram_max_ngram_size": cfg.max_ngram, "engram_n_heads": cfg.heads_per_order,
          "engram_head_dim": cfg.head_dim, "engram_pad_token_id": cfg.pad_id,
          "engram_compressed_vocab_size": spec.vocab_size,
          "hc_mult": cfg.num_branches, "hidden_size": layer.d_model}


def check_config(layer, config: Mapping) -> None:
  """Compares the present keys of a V4.1-style model config with the layer; errors name the key and both values."""
  config = config.get("text_config", config)
  mine = engram_config(layer)
  lid = layer.spec.layer_id
  if "engram_layer_ids" in config and lid not in list(config["engram_layer_ids"]):
    raise ValueError(f"{FORMAT}: engram_layer_ids={list(config['engram_layer_ids'])} has no layer {lid}")
  if "engram_num_embeddings" in config and "engram_layer_ids" in config:
    rows = dict(zip(config["engram_layer_ids"], config["engram_num_embeddings"]))[lid]
    if int(rows) != layer.spec.total_rows:
      raise ValueError(f"{FORMAT}: engram_num_embeddings gives layer {lid} {rows} rows, the layer has "
                       f"{layer.spec.total_rows}; {common.table_hint(layer)}")
  for key in ("engram_max_ngram_size", "engram_n_heads", "engram_head_dim", "engram_pad_token_id",
              "engram_compressed_vocab_size", "hc_mult", "hidden_size"):
    if key in config and int(config[key]) != mine[key]:
      raise ValueError(f"{FORMAT}: {key}={config[key]} but the layer has {mine[key]}; build the layer with the "
                       "checkpoint's Engram config (and its compression map)")


def to_v41_tensors(layer, *, drop_conv: bool = False, norm_dtype=ml_dtypes.bfloat16) -> dict[str, np.ndarray]:
  """Our layer -> the V4.1-style tensors (fp8 table and wkv with block scales, norm gains in `norm_dtype`). A
  conv-less layer needs no drop_conv; a gate-less one is refused."""
  p = common.export_params(layer, FORMAT)
  if not drop_conv:
    for name in ("conv_weight", "value_bias", "key_bias"):
      if name in p and np.any(p[name] != 0):
        raise ValueError(f"{FORMAT}: the layer's {name} is nonzero but the layout has no short conv and no biases; "
                         "pass drop_conv=True to export without them")
  g, e, d = p["key_proj"].shape
  hd = p["table"].shape[1]
  if hd % 32 or e % 32 or ((g + 1) * d) % 32:
    raise ValueError(f"{FORMAT}: head_dim={hd}, memory width {e} and (num_branches + 1) * d_model={(g + 1) * d} must "
                     "be multiples of 32 (the block size of the scales)")
  names = _names(layer.spec.layer_id)
  table_q, table_s = fp8.quantize(p["table"][:layer.spec.total_rows], TABLE_BLOCK)
  wkv = np.concatenate([p["key_proj"].transpose(0, 2, 1).reshape(g * d, e), p["value_proj"].T])  # [(G+1) D, E]
  wkv_q, wkv_s = fp8.quantize(wkv, WEIGHT_BLOCK)
  return {names["embed.weight"]: table_q, names["embed.scale"]: table_s, names["wkv.weight"]: wkv_q,
          names["wkv.scale"]: wkv_s, names["k_weight"]: p["gate_norm_k"].astype(norm_dtype),
          names["q_weight"]: p["gate_norm_h"].astype(norm_dtype)}


def from_v41_tensors(layer, tensors: Mapping, *, table_only: bool = False) -> dict[str, np.ndarray]:
  """V4.1-style tensors -> our parameters (dequantised to float32). table_only: take the table, keep the rest
  of the layer's parameters (the one way into a gate-less layer: the gate is not read)."""
  shapes = common.expected_shapes(layer) if table_only else common.import_shapes(layer, FORMAT)
  g, e, d = layer.config.num_branches, layer.config.memory_width, layer.d_model
  t, hd = layer.spec.total_rows, shapes["table"][1]
  names = _names(layer.spec.layer_id)

  def get(key, shape, hint=""):
    return common.check_shape(names[key], tensors.get(names[key]), shape, FORMAT, hint)

  table = fp8.dequantize(get("embed.weight", (t, hd), common.table_hint(layer)),
                         get("embed.scale", (t, hd // 32), "one scale per 32 values of a row"), TABLE_BLOCK)
  params = common.layer_params(layer)
  params["table"] = common.pad_table(layer, table)
  if table_only:
    return params
  wkv = fp8.dequantize(get("wkv.weight", ((g + 1) * d, e), f"(hc_mult + 1) * hidden_size rows with hc_mult = "
                           f"num_branches = {g}, hidden_size = d_model = {d}; E = memory width"),
                       get("wkv.scale", ((g + 1) * d // 32, e // 32), "32 x 32 blocks"), WEIGHT_BLOCK)
  params.update(
      key_proj=np.ascontiguousarray(wkv[:g * d].reshape(g, d, e).transpose(0, 2, 1)),  # [G, E, D]
      value_proj=np.ascontiguousarray(wkv[g * d:].T),  # [E, D]
      gate_norm_k=get("k_weight", (g, d)).astype(np.float32),
      gate_norm_h=get("q_weight", (g, d)).astype(np.float32))
  if layer.config.short_conv:  # the layout has no conv: zero weights add nothing (SiLU(0) = 0)
    params.update(conv_weight=np.zeros(shapes["conv_weight"], np.float32),
                  conv_norm=np.ones(shapes["conv_norm"], np.float32))
  for name in ("value_bias", "key_bias"):
    if name in params:
      params[name] = np.zeros(shapes[name], np.float32)
  return params


def export_v41(layer, path: str | Path, *, drop_conv: bool = False) -> None:
  """Writes the layer in the V4.1-style layout to a safetensors file (config in the metadata; atomic)."""
  write_safetensors(path, to_v41_tensors(layer, drop_conv=drop_conv),
                    {"engram_jax": FORMAT, "config": json.dumps(engram_config(layer))})


def load_v41(layer, path: str | Path, *, config: Mapping | str | Path | None = None, table_only: bool = False
             ) -> None:
  """Reads a V4.1-style file or sharded directory into `layer` in place. The config is checked when known: the
  `config` argument (a mapping or a config.json path), else the file's metadata, else a config.json beside it."""
  tensors = open_tensors(path)
  if isinstance(config, (str, Path)):
    config = json.loads(Path(config).read_text())
  if config is None and "config" in tensors.metadata:
    config = json.loads(tensors.metadata["config"])
  if config is None and Path(path, "config.json").is_file():
    config = json.loads(Path(path, "config.json").read_text())
  if config is not None:
    check_config(layer, config)
  common.load_params(layer, from_v41_tensors(layer, tensors, table_only=table_only), FORMAT)
