"""The Engram layer as a Flax Linen module, for T5X / flaxformer / other Linen codebases.

Same parameters as the NNX `engram_jax.layers.engram.Engram` (names, shapes, initialisation, logical axis names),
same functional core (`engram_update`), same hashing and lookup strategies, so outputs and gradients match the NNX
layer given the same parameters. `params_from_nnx` / `params_to_nnx` move parameters between the two.

Logical axis annotations, two styles (`axes_style`):
  'boxed'       `nn.with_logical_partitioning`: params are `LogicallyPartitioned` boxes, read by
                `nn.get_partition_spec` and `nn.logical_to_mesh_sharding` (current Linen, T5X).
  'params_axes' flaxformer's `param_with_axes`: axis names go to the 'params_axes' collection as
                `AxisMetadata` (`<name>_axes`), which T5X's partitioner reads.
The compression map is a constant of the module (like a vocabulary), not a variable.

The decode step (KV-style cache of the last N-1 ids and the conv state) lives on the NNX module only.

Letters: B batch, S sequence, G branches, D model width, H hash heads, d head_dim, E = H * d, V table rows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen import partitioning as nn_partitioning
from jax.sharding import Mesh

from engram_jax import hashing, sharding
from engram_jax.layers.engram import (check_table_rows, engram_update, lookup_rows, mean_gate, param_names,
                                      table_num_rows)
from engram_jax.layers.engram_config import EngramConfig

AXES_STYLES = ("boxed", "params_axes")


def param_axes(config: EngramConfig) -> dict[str, tuple[str | None, ...]]:
  """Logical axis names of every parameter (the same as the NNX layer's annotations)."""
  axes = {"table": ("table_rows", "table_dim"), "value_proj": (None, "embed"),
          "key_proj": ("branches", None, "embed"), "gate_norm_h": ("branches", "embed"),
          "gate_norm_k": ("branches", "embed"), "conv_norm": ("branches", "embed"),
          "conv_weight": (None, "branches", "embed"), "value_bias": ("embed",), "key_bias": ("branches", "embed")}
  return {name: axes[name] for name in param_names(config)}


def table_rows(config: EngramConfig, spec: hashing.HashSpec, mesh: Mesh | None = None,
               rules: sharding.Rules = sharding.DEFAULT_RULES) -> int:
  """Rows of the flat table: total_rows padded to table_row_multiple (mesh-independent); the mesh's row shards
  must divide it (ValueError naming the meshes that work otherwise)."""
  rows = table_num_rows(spec.total_rows, config.table_row_multiple)
  check_table_rows(rows, spec.total_rows, config.table_row_multiple, mesh, spec.layer_id, rules)
  return rows


class Engram(nn.Module):
  """One Engram layer (Linen): hash -> table lookup -> per-branch context gate -> short conv -> residual update.

  Call: `y = module.apply(variables, h, token_ids, segment_ids)` with h [B, S, G, D], token_ids [B, S] raw ids;
  add y to the residual stream. Give `hash_spec` from `hashing.make_hash_specs` when several layers share a run
  (primes unique across layers); otherwise the layer builds its own from the config.
  """

  config: EngramConfig
  d_model: int
  compression: np.ndarray  # [V_raw] raw id -> compressed id (hashing.build_compression / identity_compression).
  layer_id: int = 0
  hash_spec: hashing.HashSpec | None = None
  mesh: Mesh | None = None
  rules: tuple = sharding.DEFAULT_RULES
  axes_style: str = "boxed"

  def setup(self):
    cfg = self.config
    if self.axes_style not in AXES_STYLES:
      raise ValueError(f"linen.Engram.axes_style must be one of {AXES_STYLES}, got {self.axes_style!r}")
    if self.d_model < 1:
      raise ValueError(f"linen.Engram.d_model must be >= 1, got {self.d_model}")
    comp = hashing.check_compression(self.compression)
    if not 0 <= cfg.pad_id < comp.size:
      raise ValueError(f"EngramConfig.pad_id={cfg.pad_id} is outside the raw vocabulary [0, {comp.size}) of the "
                       "compression map; set pad_id to the tokenizer's pad id")
    spec = self.hash_spec or hashing.make_hash_specs(
        max_ngram=cfg.max_ngram, heads_per_order=cfg.heads_per_order, table_base_sizes=cfg.table_base_sizes,
        seed=cfg.seed, hash_bits=cfg.hash_bits, layer_ids=[self.layer_id],
        vocab_size=hashing.compressed_vocab_size(comp), pad_id=int(comp[cfg.pad_id]))[self.layer_id]
    if (spec.max_ngram, spec.heads_per_order, spec.vocab_size) != (
        cfg.max_ngram, cfg.heads_per_order, hashing.compressed_vocab_size(comp)):
      raise ValueError("linen.Engram.hash_spec does not match the config / compression (max_ngram, heads_per_order, "
                       "vocab size); build the specs with hashing.make_hash_specs from the same config and map")
    self._spec = spec
    self._comp = comp
    self.num_rows = table_rows(cfg, spec, self.mesh, self.rules)
    g, e, d = cfg.num_branches, cfg.memory_width, self.d_model
    total = spec.total_rows

    # Initialisation, as in the NNX layer: table ~ N(0, std^2) (padding rows 0); projections ~ N(0, 1/E),
    # biases 0; norm scales 1; conv weights 0.
    def table_init(key, shape):
      rows = cfg.table_init_std * jax.random.normal(key, shape, jnp.float32)
      return jnp.where(jnp.arange(shape[0])[:, None] < total, rows, 0.0)

    def proj_init(key, shape):
      return jax.random.normal(key, shape, jnp.float32) / math.sqrt(e)

    def ones(key, shape):
      return jnp.ones(shape, jnp.float32)

    def zeros(key, shape):
      return jnp.zeros(shape, jnp.float32)

    shapes = {"table": ((self.num_rows, cfg.head_dim), table_init), "value_proj": ((e, d), proj_init),
              "key_proj": ((g, e, d), proj_init), "gate_norm_h": ((g, d), ones), "gate_norm_k": ((g, d), ones),
              "conv_norm": ((g, d), ones), "conv_weight": ((cfg.kernel_size, g, d), zeros),
              "value_bias": ((d,), zeros), "key_bias": ((g, d), zeros)}
    axes = param_axes(cfg)
    self._params = {name: self._param(name, shapes[name][1], shapes[name][0], axes[name]) for name in axes}

  def _param(self, name, init, shape, axes):
    if self.axes_style == "boxed":
      return self.param(name, nn.with_logical_partitioning(init, axes), shape)
    return nn_partitioning.param_with_axes(name, init, shape, axes=axes, module=self)

  def __call__(self, h: jax.Array, token_ids: jax.Array, segment_ids: jax.Array | None = None,
               hash_ids: jax.Array | None = None) -> jax.Array:
    """h [B, S, G, D], token_ids [B, S], segment_ids [B, S] (0 = pad) or None, hash_ids [B, S, H] per-head local
    rows hashed on the host (optional) -> residual update Y [B, S, G, D] in h.dtype. Sows the mean gate per branch
    ('intermediates', 'gate_mean') and the ids dropped by an all_to_all lookup ('intermediates', 'dropped')."""
    cfg, spec = self.config, self._spec
    if h.ndim != 4 or h.shape[2:] != (cfg.num_branches, self.d_model):
      raise ValueError(f"linen.Engram expects h [B, S, G={cfg.num_branches}, D={self.d_model}], got {h.shape}")
    if token_ids.shape != h.shape[:2]:
      raise ValueError(f"token_ids {token_ids.shape} must be [B, S] = {h.shape[:2]}")
    if hash_ids is None:
      cids = jnp.take(jnp.asarray(self._comp), token_ids, mode="clip")  # [B, S]
      hash_ids = hashing.hash_ngrams_jnp(cids, segment_ids, spec)  # [B, S, H]
    elif hash_ids.shape != token_ids.shape + (spec.num_heads,):
      raise ValueError(f"hash_ids {hash_ids.shape} must be [B, S, H={spec.num_heads}]")
    rows = hash_ids.astype(jnp.int32) + jnp.asarray(spec.offsets, jnp.int32)  # [B, S, H]
    e, dropped = lookup_rows(self._params["table"], rows, cfg.lookup, self.mesh,
                             capacity_factor=cfg.all_to_all_capacity_factor, rules=self.rules)  # [B, S, H, d]
    e = e.reshape(rows.shape[:2] + (-1,))  # [B, S, E]
    core = {k: v for k, v in self._params.items() if k != "table"}
    y, alpha, _ = engram_update(core, h, e, dilation=cfg.max_ngram, gate_eps=cfg.gate_eps, conv_eps=cfg.conv_eps,
                                segment_ids=segment_ids)
    self.sow("intermediates", "gate_mean", mean_gate(alpha, segment_ids))
    self.sow("intermediates", "dropped", dropped)
    return y


def params_from_nnx(layer) -> dict[str, jax.Array]:
  """An NNX Engram layer's parameters as the plain {name: array} dict the Linen module's 'params' hold."""
  return {name: getattr(layer, name)[...] for name in param_names(layer.config)}


def params_to_nnx(layer, params: Mapping[str, jax.Array]) -> None:
  """Writes {name: array} (e.g. `unbox(variables['params'])`) into an NNX Engram layer, checking shapes."""
  for name in param_names(layer.config):
    var = getattr(layer, name)
    value = jnp.asarray(params[name])
    if value.shape != var[...].shape:
      raise ValueError(f"params_to_nnx: {name} has shape {value.shape}, the layer expects {var[...].shape}")
    var.set_value(value.astype(var[...].dtype))


def replace_params(variables: Mapping, params: Mapping[str, jax.Array]) -> dict:
  """`variables` (from `module.init`) with its 'params' values replaced by `params`, keeping the axis boxes."""
  old = variables["params"]
  missing = set(old) - set(params)
  if missing:
    raise ValueError(f"replace_params: no value for {sorted(missing)}")
  new = {}
  for name, box in old.items():
    value = jnp.asarray(params[name])
    shape = box.value.shape if isinstance(box, nn.meta.AxisMetadata) else box.shape
    if value.shape != shape:
      raise ValueError(f"replace_params: {name} has shape {value.shape}, the module expects {shape}")
    new[name] = box.replace_boxed(value) if isinstance(box, nn.meta.AxisMetadata) else value
  return {**variables, "params": new}
