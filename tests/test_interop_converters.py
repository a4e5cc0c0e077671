"""Engram weight converters: exact round trips, files, the layouts' own semantics, and errors naming tensors.

Each layout's semantics is checked by something that reads it as its home code would: the demo's state dict by a
NumPy transcription of the demo's forward (torch's Linear, RMSNorm and causal Conv1d written out), MaxText's tree by
flax's nnx.Conv with CAUSAL padding (the conv MaxText uses) and its DenseGeneral einsum, the fp8 layout by the
quantisation error bound.
"""

from __future__ import annotations

import dataclasses
import json

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from engram_jax.interop import common, demo, deepseek_v41, fp8, maxtext
from engram_jax.interop.safetensors_io import open_tensors, write_safetensors
from engram_jax.layers.engram import build_engram_layers, short_conv
from engram_jax.layers.engram_config import EngramConfig

CFG = EngramConfig(max_ngram=3, heads_per_order=2, head_dim=32, table_base_sizes=(31, 37), num_branches=2, seed=5,
                   table_row_multiple=16, projection_bias=True, gate_norm_eps=1.1920929e-07, conv_norm_eps=1e-5)
D, V_RAW, LAYERS = 32, 40, (1, 4)
COMP = (np.arange(V_RAW) % 25).astype(np.int32)


def _layer(cfg=CFG, seed=0, layer_id=4, randomise=True):
  layer = build_engram_layers(cfg, LAYERS, D, COMP, rngs=nnx.Rngs(seed))[layer_id]
  if randomise:
    rng = np.random.default_rng(seed + 100)
    for name in common.layer_params(layer):
      if name != "table":
        var = getattr(layer, name)
        var.set_value(jnp.asarray(rng.normal(size=var[...].shape) * 0.3 + ("norm" in name), jnp.float32))
  return layer


def _inputs(b=2, s=11, seed=0):
  rng = np.random.default_rng(seed)
  h = jnp.asarray(rng.normal(size=(b, s, CFG.num_branches, D)), jnp.float32)
  return h, jnp.asarray(rng.integers(0, V_RAW, (b, s)), jnp.int32)


def _assert_params_equal(a, b):
  assert set(a) == set(b)
  for name in a:
    np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]), err_msg=name)


# -- the official demo's state dict -------------------------------------------------------------------------------


def _rms(x, w, eps):
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def demo_forward_numpy(sd, h, hash_ids, dilation, gate_eps, conv_eps):
  """The demo's Engram.forward read off its state dict: h [B, S, G, D], hash_ids [B, S, H] -> [B, S, G, D]."""
  h = np.asarray(h, np.float64)
  b, s, g, d = h.shape
  emb = sd["multi_head_embedding.embedding.weight"][hash_ids + sd["multi_head_embedding.offsets"]].reshape(b, s, -1)
  gates = []
  for i in range(g):
    key = emb @ sd[f"key_projs.{i}.weight"].T + sd[f"key_projs.{i}.bias"]
    q = _rms(h[:, :, i], sd[f"norm2.{i}.weight"], gate_eps)
    gate = (_rms(key, sd[f"norm1.{i}.weight"], gate_eps) * q).sum(-1) / np.sqrt(d)
    gate = np.sqrt(np.maximum(np.abs(gate), 1e-6)) * np.sign(gate)
    gates.append(1 / (1 + np.exp(-gate)))
  value = np.stack(gates, 2)[..., None] * (emb @ sd["value_proj.weight"].T + sd["value_proj.bias"])[:, :, None]
  x = np.concatenate([_rms(value[:, :, i], sd[f"short_conv.norms.{i}.weight"], conv_eps) for i in range(g)], -1)
  w = sd["short_conv.conv.weight"]  # [C, 1, K]: nn.Conv1d(groups=C, padding=(K-1)*dil), output cut to the first S
  k = w.shape[-1]
  xp = np.concatenate([np.zeros((b, (k - 1) * dilation, g * d)), x], 1)
  y = sum(w[:, 0, j] * xp[:, j * dilation:j * dilation + s] for j in range(k))
  y = y / (1 + np.exp(-y))
  return value + y.reshape(b, s, g, d)


def test_demo_round_trip_is_exact_and_file_round_trip_gives_the_same_layer_output(tmp_path):
  layer = _layer()
  params = common.layer_params(layer)
  _assert_params_equal(demo.from_demo_state_dict(layer, demo.to_demo_state_dict(layer, "x."), "x."), params)
  demo.save_demo(layer, tmp_path / "engram.safetensors", prefix="layers.4.engram.")
  fresh = _layer(seed=7, randomise=True)
  demo.load_demo(fresh, tmp_path / "engram.safetensors", prefix="layers.4.engram.")
  _assert_params_equal(common.layer_params(fresh), params)
  h, ids = _inputs()
  np.testing.assert_array_equal(np.asarray(fresh(h, ids)), np.asarray(layer(h, ids)))


def test_demo_state_dict_means_what_the_demo_computes():
  layer = _layer(seed=1)
  h, ids = _inputs(seed=1)
  sd = {k: np.asarray(v, np.float64) if v.dtype.kind == "f" else v for k, v in demo.to_demo_state_dict(layer).items()}
  want = demo_forward_numpy(sd, h, np.asarray(layer.hash(ids)), CFG.max_ngram, CFG.gate_eps, CFG.conv_eps)
  np.testing.assert_allclose(np.asarray(layer(h, ids)), want, rtol=2e-4, atol=2e-5)


def test_demo_errors_name_the_tensor_and_expected_shape():
  layer = _layer()
  sd = demo.to_demo_state_dict(layer)
  other_primes = _layer(dataclasses.replace(CFG, table_base_sizes=(41, 37)))
  with pytest.raises(ValueError, match=r"multi_head_embedding.offsets.*expected \[0, .*table_base_sizes"):
    demo.from_demo_state_dict(other_primes, sd)
  no_offsets = {k: v for k, v in sd.items() if k != "multi_head_embedding.offsets"}
  with pytest.raises(ValueError, match=r"'multi_head_embedding.embedding.weight' has shape \(\d+, 32\), expected"):
    demo.from_demo_state_dict(other_primes, no_offsets)
  one_branch = _layer(dataclasses.replace(CFG, num_branches=1))
  with pytest.raises(ValueError, match=r"key_projs.1.*num_branches=1"):
    demo.from_demo_state_dict(one_branch, sd)
  wide = {**sd, "value_proj.weight": np.zeros((D, 64), np.float32)}
  with pytest.raises(ValueError, match=r"'value_proj.weight' has shape \(32, 64\), expected \(32, 128\)"):
    demo.from_demo_state_dict(layer, wide)
  no_bias_layer = _layer(dataclasses.replace(CFG, projection_bias=False))
  with pytest.raises(ValueError, match="projection_bias=True"):
    demo.from_demo_state_dict(no_bias_layer, demo.to_demo_state_dict(layer))
  zero_bias = demo.to_demo_state_dict(no_bias_layer)  # exported with zero biases: loads back into a bias-free layer
  _assert_params_equal(demo.from_demo_state_dict(no_bias_layer, zero_bias), common.layer_params(no_bias_layer))


# -- MaxText's tree ------------------------------------------------------------------------------------------------


def test_maxtext_round_trips_exactly_in_memory_orbax_and_safetensors(tmp_path):
  layer = _layer(seed=2)
  params = common.layer_params(layer)
  _assert_params_equal(maxtext.from_maxtext_tree(layer, maxtext.to_maxtext_tree(layer)), params)
  h, ids = _inputs(seed=2)
  for path in (tmp_path / "orbax_ckpt", tmp_path / "tree.safetensors"):
    maxtext.save_maxtext(layer, path, tree_path=("params", "decoder", "layers_4", "engram"))
    fresh = _layer(seed=9)
    maxtext.load_maxtext(fresh, path, tree_path=("params", "decoder", "layers_4", "engram"))
    _assert_params_equal(common.layer_params(fresh), params)
    np.testing.assert_array_equal(np.asarray(fresh(h, ids)), np.asarray(layer(h, ids)))
  with pytest.raises(ValueError, match="no subtree 'params.decoder.layers_1'"):
    maxtext.read_maxtext_tree(tmp_path / "tree.safetensors", ("params", "decoder", "layers_1"))


def test_maxtext_tree_means_what_flax_conv_and_dense_general_compute():
  """The conv kernel run by flax's nnx.Conv (CAUSAL, depthwise, dilated: MaxText's ShortConv) equals our conv;
  the key kernel contracted as DenseGeneral does equals our key projection."""
  layer = _layer(seed=3)
  tree = maxtext.to_maxtext_tree(layer)
  g, taps = CFG.num_branches, CFG.kernel_size
  conv = nnx.Conv(g * D, g * D, kernel_size=(taps,), feature_group_count=g * D, kernel_dilation=(CFG.max_ngram,),
                  padding="CAUSAL", use_bias=False, rngs=nnx.Rngs(0))
  conv.kernel.set_value(jnp.asarray(tree["short_conv"]["conv"]["kernel"]))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 13, g, D)), jnp.float32)
  xn = x / jnp.sqrt(jnp.mean(x * x, -1, keepdims=True) + CFG.conv_eps) * tree["short_conv"]["norm"]["scale"]
  want = nnx.silu(conv(xn.reshape(2, 13, g * D))).reshape(2, 13, g, D)
  got, _ = short_conv(x, layer.conv_weight[...], layer.conv_norm[...], CFG.max_ngram, eps=CFG.conv_eps)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)
  e = np.random.default_rng(1).normal(size=(2, 5, CFG.memory_width)).astype(np.float32)
  key = np.einsum("bse,egd->bsgd", e, tree["key_proj"]["kernel"]) + tree["key_proj"]["bias"]
  ours = np.einsum("bse,ged->bsgd", e, np.asarray(layer.key_proj[...])) + np.asarray(layer.key_bias[...])
  np.testing.assert_allclose(key, ours, rtol=1e-5, atol=1e-5)


def test_maxtext_errors_name_the_tensor_and_expected_shape():
  layer = _layer()
  tree = maxtext.to_maxtext_tree(layer)
  tree["key_proj"]["kernel"] = np.zeros((CFG.memory_width, 4, D), np.float32)
  with pytest.raises(ValueError, match=r"'key_proj.kernel' has shape \(128, 4, 32\), expected \(128, 2, 32\).*"
                                       "mhc_expansion_rate"):
    maxtext.from_maxtext_tree(layer, tree)
  del tree["k_norm"]
  with pytest.raises(ValueError, match=r"'k_norm.scale' is missing \(expected shape \(2, 32\)\)"):
    maxtext.from_maxtext_tree(layer, maxtext.to_maxtext_tree(layer) | {"k_norm": {}})


# -- DeepSeek-V4.1-style fp8 layout ------------------------------------------------------------------------------


def _no_conv_layer(seed=4):
  layer = _layer(dataclasses.replace(CFG, projection_bias=False, gate_norm_eps=1e-6), seed=seed)
  layer.conv_weight.set_value(jnp.zeros_like(layer.conv_weight[...]))
  layer.conv_norm.set_value(jnp.ones_like(layer.conv_norm[...]))
  return layer


def test_fp8_block_quantisation_is_within_its_bound_and_idempotent():
  rng = np.random.default_rng(0)
  x = (rng.normal(size=(64, 96)) * np.exp(rng.normal(size=(64, 1)) * 3)).astype(np.float32)
  x[:32, :32] = 0.0  # an all-zero block
  for block in ((1, 32), (32, 32)):
    q, s = fp8.quantize(x, block)
    assert q.dtype == ml_dtypes.float8_e4m3fn and s.dtype == ml_dtypes.float8_e8m0fnu
    back = fp8.dequantize(q, s, block)
    assert np.all(np.abs(back - x) <= fp8.error_bound(x, block))
    assert not back[:32, :32].any()
    q2, s2 = fp8.quantize(back, block)  # values already on the grid stay there
    np.testing.assert_array_equal(fp8.dequantize(q2, s2, block), back)
    s32 = s.astype(np.float32)
    assert np.all(np.log2(s32) == np.round(np.log2(s32)))  # powers of two
  with pytest.raises(ValueError, match="not a whole number of 32x32 blocks"):
    fp8.quantize(np.zeros((40, 32)), (32, 32))


def test_v41_layout_round_trip_within_fp8_error_and_same_layer_output(tmp_path):
  layer = _no_conv_layer()
  params = common.layer_params(layer)
  deepseek_v41.export_v41(layer, tmp_path / "v41.safetensors")
  f = open_tensors(tmp_path / "v41.safetensors")
  assert f.dtype_name("layers.4.engram.embed.weight") == "F8_E4M3"
  assert f.dtype_name("layers.4.engram.embed.scale") == "F8_E8M0"
  assert f["layers.4.engram.embed.scale"].shape == (layer.spec.total_rows, CFG.head_dim // 32)
  assert f["layers.4.engram.wkv.weight"].shape == (3 * D, CFG.memory_width)
  assert f.dtype_name("layers.4.engram.q_weight") == "BF16"
  fresh = _no_conv_layer(seed=8)
  deepseek_v41.load_v41(fresh, tmp_path / "v41.safetensors")
  got = common.layer_params(fresh)
  t = layer.spec.total_rows
  table = params["table"][:t]
  assert np.all(np.abs(got["table"][:t] - table) <= fp8.error_bound(table, deepseek_v41.TABLE_BLOCK))
  assert not got["table"][t:].any()
  wkv = np.concatenate([params["key_proj"].transpose(0, 2, 1).reshape(-1, CFG.memory_width), params["value_proj"].T])
  got_wkv = np.concatenate([got["key_proj"].transpose(0, 2, 1).reshape(-1, CFG.memory_width), got["value_proj"].T])
  assert np.all(np.abs(got_wkv - wkv) <= fp8.error_bound(wkv, deepseek_v41.WEIGHT_BLOCK))
  for name in ("gate_norm_h", "gate_norm_k"):
    np.testing.assert_allclose(got[name], params[name], rtol=2.0**-8)
  _assert_params_equal({k: got[k] for k in ("conv_weight", "conv_norm")},
                       {k: params[k] for k in ("conv_weight", "conv_norm")})
  # Exact on the second pass: what was loaded exports to the same values (a block's scale may move by a power of
  # two when rounding lowered its largest value, with the fp8 exponents moving the other way).
  again = deepseek_v41.to_v41_tensors(fresh)
  first = deepseek_v41.to_v41_tensors(layer)
  for name, block in (("embed", deepseek_v41.TABLE_BLOCK), ("wkv", deepseek_v41.WEIGHT_BLOCK)):
    w, sc = f"layers.4.engram.{name}.weight", f"layers.4.engram.{name}.scale"
    np.testing.assert_array_equal(fp8.dequantize(again[w], again[sc], block),
                                  fp8.dequantize(first[w], first[sc], block))
  for name in ("k_weight", "q_weight"):
    np.testing.assert_array_equal(again[f"layers.4.engram.{name}"], first[f"layers.4.engram.{name}"])
  h, ids = _inputs(seed=4)
  y, y_loaded = np.asarray(layer(h, ids)), np.asarray(fresh(h, ids))
  rel = np.abs(y_loaded - y).max() / np.abs(y).max()
  print(f"\nv41 fp8 round trip: table max rel err {np.max(np.abs(got['table'][:t] - table) / np.abs(table)):.4f}, "
        f"layer output max err / max |y| {rel:.4f}")
  assert rel < 0.05


def test_v41_sharded_directory_table_only_and_config_checks(tmp_path):
  layer = _no_conv_layer()
  tensors = deepseek_v41.to_v41_tensors(layer)
  names = sorted(tensors)
  write_safetensors(tmp_path / "model-00001-of-00002.safetensors", {k: tensors[k] for k in names[:3]})
  write_safetensors(tmp_path / "model-00002-of-00002.safetensors", {k: tensors[k] for k in names[3:]})
  weight_map = {k: f"model-0000{1 + (i >= 3)}-of-00002.safetensors" for i, k in enumerate(names)}
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  config = {"text_config": deepseek_v41.engram_config(layer, [1, 4], [123, layer.spec.total_rows])}
  (tmp_path / "config.json").write_text(json.dumps(config))
  other = _layer(seed=6)  # keeps its own projections, conv and biases with table_only
  before = common.layer_params(other)
  deepseek_v41.load_v41(other, tmp_path, table_only=True)
  after = common.layer_params(other)
  _assert_params_equal({k: v for k, v in after.items() if k != "table"}, {k: v for k, v in before.items()
                                                                          if k != "table"})
  np.testing.assert_array_equal(after["table"], common.pad_table(other, fp8.dequantize(
      tensors["layers.4.engram.embed.weight"], tensors["layers.4.engram.embed.scale"], (1, 32))))
  bad = {"text_config": {**config["text_config"], "engram_n_heads": 8}}
  with pytest.raises(ValueError, match="engram_n_heads=8 but the layer has 2"):
    deepseek_v41.load_v41(layer, tmp_path, config=bad)
  rows = {"engram_layer_ids": [4], "engram_num_embeddings": [999]}
  with pytest.raises(ValueError, match="engram_num_embeddings gives layer 4 999 rows"):
    deepseek_v41.load_v41(layer, tmp_path, config=rows)


def test_v41_export_refuses_to_drop_a_conv_silently_and_names_bad_tensors(tmp_path):
  layer = _layer(seed=5)  # random conv and biases
  with pytest.raises(ValueError, match="conv_weight is nonzero.*drop_conv=True"):
    deepseek_v41.to_v41_tensors(layer)
  tensors = deepseek_v41.to_v41_tensors(layer, drop_conv=True)
  tensors["layers.4.engram.embed.scale"] = tensors["layers.4.engram.embed.scale"][:, :0]
  with pytest.raises(ValueError, match=r"'layers.4.engram.embed.scale' has shape \(\d+, 0\), expected \(\d+, 1\)"):
    deepseek_v41.from_v41_tensors(layer, tensors)
  narrow = _layer(dataclasses.replace(CFG, head_dim=8))
  with pytest.raises(ValueError, match="multiples of 32"):
    deepseek_v41.to_v41_tensors(narrow, drop_conv=True)


# -- the safetensors reader and writer ------------------------------------------------------------------------------


def test_safetensors_io_agrees_with_the_safetensors_package(tmp_path):
  st = pytest.importorskip("safetensors.numpy")
  rng = np.random.default_rng(0)
  ours = {"a": rng.normal(size=(3, 5)).astype(np.float32), "b": rng.normal(size=(7,)).astype(ml_dtypes.bfloat16),
          "c": np.arange(6, dtype=np.int64).reshape(2, 3), "e": np.zeros((0, 4), np.float32)}
  write_safetensors(tmp_path / "ours.safetensors", ours, {"k": "v"})
  theirs = st.load_file(str(tmp_path / "ours.safetensors"))
  for k, v in ours.items():
    np.testing.assert_array_equal(theirs[k], v)
  fp8_tensors = {"q": rng.normal(size=(4, 32)).astype(ml_dtypes.float8_e4m3fn),
                 "s": np.arange(8, dtype=np.uint8).reshape(4, 2).view(ml_dtypes.float8_e8m0fnu), **ours}
  st.save_file(fp8_tensors, str(tmp_path / "theirs.safetensors"), metadata={"format": "np"})
  read = open_tensors(tmp_path / "theirs.safetensors")
  assert read.metadata == {"format": "np"} and set(read) == set(fp8_tensors)
  for k, v in fp8_tensors.items():
    np.testing.assert_array_equal(np.asarray(read[k]).view(np.uint8), v.view(np.uint8), err_msg=k)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ours.safetensors", "theirs.safetensors"]  # no temp files
  with pytest.raises(FileNotFoundError, match="no such safetensors"):
    open_tensors(tmp_path / "missing.safetensors")


# -- ablated layers (EngramConfig.short_conv=False / gate=False) ------------------------------------------------


def test_conv_less_layer_exports_as_a_zero_conv_and_round_trips_through_every_layout(tmp_path):
  """short_conv=False is written as zero conv weights (the same output: SiLU(0) = 0, checked against the demo's
  NumPy forward), reads back exactly, and a file whose conv is nonzero is refused with the field named."""
  cfg = dataclasses.replace(CFG, short_conv=False)
  layer = _layer(cfg, seed=11)
  params = common.layer_params(layer)
  assert "conv_weight" not in params
  h, ids = _inputs(seed=11)
  sd = demo.to_demo_state_dict(layer)
  np.testing.assert_array_equal(sd["short_conv.conv.weight"], 0)
  sd64 = {k: np.asarray(v, np.float64) if v.dtype.kind == "f" else v for k, v in sd.items()}
  want = demo_forward_numpy(sd64, h, np.asarray(layer.hash(ids)), cfg.max_ngram, cfg.gate_eps, cfg.conv_eps)
  np.testing.assert_allclose(np.asarray(layer(h, ids)), want, rtol=2e-4, atol=2e-5)
  _assert_params_equal(demo.from_demo_state_dict(layer, sd), params)
  _assert_params_equal(maxtext.from_maxtext_tree(layer, maxtext.to_maxtext_tree(layer)), params)
  maxtext.save_maxtext(layer, tmp_path / "tree.safetensors")
  fresh = _layer(cfg, seed=12)
  maxtext.load_maxtext(fresh, tmp_path / "tree.safetensors")
  np.testing.assert_array_equal(np.asarray(fresh(h, ids)), np.asarray(layer(h, ids)))
  with_conv = demo.to_demo_state_dict(_layer(seed=11))  # random nonzero conv
  with pytest.raises(ValueError, match=r"short conv weights are nonzero.*EngramConfig\(short_conv=True\)"):
    demo.from_demo_state_dict(layer, with_conv)
  no_bias = _layer(dataclasses.replace(cfg, projection_bias=False, gate_norm_eps=1e-6), seed=13)
  v41 = deepseek_v41.from_v41_tensors(no_bias, deepseek_v41.to_v41_tensors(no_bias))  # no drop_conv needed
  assert set(v41) == set(common.layer_params(no_bias))


def test_gate_less_layer_is_refused_by_every_layout_but_takes_a_v41_table():
  cfg = dataclasses.replace(CFG, gate=False, projection_bias=False, gate_norm_eps=1e-6)
  layer = _layer(cfg, seed=14)
  gated = _layer(dataclasses.replace(cfg, gate=True), seed=15)
  for call in (lambda: demo.to_demo_state_dict(layer), lambda: maxtext.to_maxtext_tree(layer),
               lambda: deepseek_v41.to_v41_tensors(layer),
               lambda: demo.from_demo_state_dict(layer, demo.to_demo_state_dict(gated)),
               lambda: maxtext.from_maxtext_tree(layer, maxtext.to_maxtext_tree(gated))):
    with pytest.raises(ValueError, match=r"no context gate \(EngramConfig.gate=False\)"):
      call()
  tensors = deepseek_v41.to_v41_tensors(gated, drop_conv=True)
  with pytest.raises(ValueError, match="gate=False"):
    deepseek_v41.from_v41_tensors(layer, tensors)
  params = deepseek_v41.from_v41_tensors(layer, tensors, table_only=True)
  want = deepseek_v41.from_v41_tensors(gated, tensors, table_only=True)["table"]
  np.testing.assert_array_equal(params["table"], want)
  assert set(params) == set(common.layer_params(layer))
