"""MaxText's Engram parameter tree (MaxText/layers/engram.py, NNX) <-> our parameters.

MaxText's `Engram` module state, T = sum of the head primes (no padding; heads at offsets = prefix sums of the
primes, as ours), G = mhc_expansion_rate, D = base_emb_dim, E memory width, J conv taps:
  multi_head_embedding.embedding.embedding  [T, d]     the flat table                    -> table[:T]
  key_proj.kernel [E, G, D], key_proj.bias [G, D]      DenseGeneral to (G, D)   -> key_proj ([G, E, D]), key_bias
  value_proj.kernel [E, D], value_proj.bias [D]                                          -> value_proj, value_bias
  k_norm.scale [G, D], q_norm.scale [G, D]             per-branch RMSNorms (vmapped)     -> gate_norm_k, gate_norm_h
  short_conv.norm.scale [G, D]                                                           -> conv_norm
  short_conv.conv.kernel [J, 1, G * D]                 depthwise nnx.Conv, CAUSAL padding: tap J-1-j reads the input
                                                       j * dilation back, channel g * D + i -> conv_weight
MaxText's norms use one epsilon (normalization_layer_epsilon) for gate and conv norms: set EngramConfig.norm_eps
to it. Files: an orbax checkpoint directory of this tree, or a safetensors file with '.'-joined names.
`tree_path` locates the Engram subtree inside a bigger tree (e.g. ('params', 'decoder', 'layers_1', 'engram')).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from engram_jax.interop import common
from engram_jax.interop.safetensors_io import open_tensors, write_safetensors

FORMAT = "MaxText engram tree"


def to_maxtext_tree(layer) -> dict:
  """Our layer -> MaxText's Engram parameter tree (nested dicts of float32 numpy arrays)."""
  p = common.export_params(layer, FORMAT)
  g, e, d = p["key_proj"].shape
  taps = p["conv_weight"].shape[0]
  t = layer.spec.total_rows
  return {
      "multi_head_embedding": {"embedding": {"embedding": p["table"][:t]}},
      "key_proj": {"kernel": np.ascontiguousarray(p["key_proj"].transpose(1, 0, 2)),  # [E, G, D]
                   "bias": p.get("key_bias", np.zeros((g, d), np.float32))},
      "value_proj": {"kernel": p["value_proj"], "bias": p.get("value_bias", np.zeros((d,), np.float32))},
      "k_norm": {"scale": p["gate_norm_k"]},
      "q_norm": {"scale": p["gate_norm_h"]},
      "short_conv": {"norm": {"scale": p["conv_norm"]},
                     # [J, G, D] -> [J, 1, G * D], taps reversed (CAUSAL conv: the last tap reads the current token).
                     "conv": {"kernel": np.ascontiguousarray(p["conv_weight"][::-1].reshape(taps, 1, g * d))}},
  }


def from_maxtext_tree(layer, tree: Mapping) -> dict[str, np.ndarray]:
  """MaxText's Engram tree -> our parameters for `layer` (every shape checked, errors name the tensor)."""
  shapes = common.import_shapes(layer, FORMAT)
  g, e, d = shapes["key_proj"]
  taps = shapes["conv_weight"][0]
  t, hd = layer.spec.total_rows, shapes["table"][1]

  def get(path, shape, hint=""):
    node = tree
    for key in path.split("."):
      node = node.get(key) if isinstance(node, Mapping) else None
    return common.check_shape(path, node, shape, FORMAT, hint)

  branches = f"mhc_expansion_rate must equal EngramConfig.num_branches={g}"
  params = {
      "table": common.pad_table(layer, get("multi_head_embedding.embedding.embedding", (t, hd),
                                           common.table_hint(layer))),
      "key_proj": get("key_proj.kernel", (e, g, d), branches).transpose(1, 0, 2),
      "key_bias": get("key_proj.bias", (g, d), branches),
      "value_proj": get("value_proj.kernel", (e, d), "memory width (max_ngram - 1) * heads_per_order * head_dim "
                        "or d_model differ"),
      "value_bias": get("value_proj.bias", (d,)),
      "gate_norm_k": get("k_norm.scale", (g, d), branches),
      "gate_norm_h": get("q_norm.scale", (g, d), branches),
      "conv_norm": get("short_conv.norm.scale", (g, d), branches),
      "conv_weight": get("short_conv.conv.kernel", (taps, 1, g * d), "kernel_size, branches or width differ"
                         ).reshape(taps, g, d)[::-1],
  }
  params = {k: np.ascontiguousarray(v, np.float32) for k, v in params.items()}
  return common.drop_conv_if_zero(layer, common.drop_biases_if_zero(layer, params, FORMAT), FORMAT)


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, np.ndarray]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[prefix + k] = np.asarray(v)
  return out


def _unflatten(flat: Mapping[str, np.ndarray]) -> dict:
  out: dict = {}
  for name, v in flat.items():
    node = out
    *parents, leaf = name.split(".")
    for key in parents:
      node = node.setdefault(key, {})
    node[leaf] = v
  return out


def _nest(tree: dict, tree_path: Sequence[str]) -> dict:
  for key in reversed(tuple(tree_path)):
    tree = {key: tree}
  return tree


def _subtree(tree: Mapping, tree_path: Sequence[str]) -> Mapping:
  for i, key in enumerate(tree_path):
    if not isinstance(tree, Mapping) or key not in tree:
      raise ValueError(f"{FORMAT}: no subtree {'.'.join(tree_path[:i + 1])!r} in the file; check tree_path")
    tree = tree[key]
  return tree


def save_maxtext(layer, path: str | Path, tree_path: Sequence[str] = ()) -> None:
  """Writes MaxText's tree: a '.safetensors' file ('.'-joined names) or else an orbax checkpoint directory."""
  tree = _nest(to_maxtext_tree(layer), tree_path)
  if str(path).endswith(".safetensors"):
    write_safetensors(path, _flatten(tree), {"engram_jax": FORMAT})
    return
  import orbax.checkpoint as ocp  # noqa: PLC0415 (optional dependency: pip install engram_jax[interop])

  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(Path(path).absolute(), tree)
  checkpointer.wait_until_finished()


def read_maxtext_tree(path: str | Path, tree_path: Sequence[str] = ()) -> Mapping:
  """The Engram subtree of a '.safetensors' file or an orbax checkpoint directory (numpy arrays)."""
  if str(path).endswith(".safetensors") or Path(path, "model.safetensors.index.json").is_file():
    tree = _unflatten(dict(open_tensors(path)))
  else:
    import orbax.checkpoint as ocp  # noqa: PLC0415

    tree = ocp.StandardCheckpointer().restore(Path(path).absolute())
  return _subtree(tree, tuple(tree_path))


def load_maxtext(layer, path: str | Path, tree_path: Sequence[str] = ()) -> None:
  """Reads MaxText's Engram tree from a file into `layer` in place."""
  common.load_params(layer, from_maxtext_tree(layer, read_maxtext_tree(path, tree_path)), FORMAT)
