"""Ablation switches: each changes what it should and nothing else — parameter names and shapes of the model, the
values of every parameter it keeps, and the outputs (against the NumPy reference where the layer's math changes).

Letters: B batch, S sequence, G branches, D width, H hash heads, d head_dim, V vocabulary.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from engram_jax import budget, hashing, run_dir
from engram_jax.layers.engram import Engram, build_engram_layers
from engram_jax.layers.engram_config import EngramConfig
from engram_jax.layers.moe_config import MoEConfig
from engram_jax.models.config import ModelConfig
from engram_jax.models.decoder import Decoder
import reference_engram as ref  # tests/ is on sys.path (pytest rootdir-relative import)

D, V = 16, 48
COMP = (np.arange(V) % 30).astype(np.int32)  # ids i and i + 30 merge
CFG = EngramConfig(max_ngram=3, heads_per_order=2, head_dim=4, table_base_sizes=(31, 37), num_branches=2,
                   table_row_multiple=8)
BASE = ModelConfig(vocab_size=V, d_model=D, num_layers=3, num_heads=2, num_kv_heads=1, head_dim=8, dense_hidden=32,
                   moe=MoEConfig(num_experts=4, num_shared_experts=1, top_k=2, expert_hidden=8), hc_expansion=2,
                   engram_layers=(1,), engram=CFG)


def flat_params(model) -> dict[str, np.ndarray]:
  return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def layer_params(layer: Engram) -> dict[str, np.ndarray]:
  return {k: v for k, v in flat_params(layer).items()}


def randomise_conv(layer: Engram, seed=0):
  """Non-zero conv taps (init is zero, which would hide the conv)."""
  if layer.config.short_conv:
    w = np.random.default_rng(seed).normal(size=layer.conv_weight[...].shape) * 0.5
    layer.conv_weight.set_value(jnp.asarray(w, jnp.float32))


def inputs(b=2, s=11, g=2, seed=0):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(size=(b, s, g, D)), jnp.float32),
          jnp.asarray(rng.integers(0, V, (b, s)), jnp.int32))


def reference(layer: Engram, h, ids):
  """tests/reference_engram.py on the layer's own parameters and hash ids (float64)."""
  p = {k: np.asarray(v, np.float64) for k, v in layer_params(layer).items()}
  rows = np.asarray(layer.flat_rows(layer.hash(ids)))
  return ref.engram_forward(np.asarray(h), rows, None, p["table"], p["value_proj"], p.get("key_proj"),
                            p.get("gate_norm_h"), p.get("gate_norm_k"), p.get("conv_norm"), p.get("conv_weight"),
                            layer.dilation, layer.config.norm_eps)


def pair(**changes):
  """(full layer, ablated layer), same seed, same conv taps."""
  full = build_engram_layers(CFG, (1,), D, COMP, rngs=nnx.Rngs(0))[1]
  abl = build_engram_layers(dataclasses.replace(CFG, **changes), (1,), D, COMP, rngs=nnx.Rngs(0))[1]
  randomise_conv(full)
  randomise_conv(abl)
  return full, abl


@pytest.mark.parametrize("changes,removed", [
    ({"gate": False}, {"key_proj", "gate_norm_h", "gate_norm_k"}),
    ({"short_conv": False}, {"conv_norm", "conv_weight"}),
    ({"gate": False, "short_conv": False}, {"key_proj", "gate_norm_h", "gate_norm_k", "conv_norm", "conv_weight"})])
def test_gate_and_conv_switches_remove_only_their_parameters_and_match_the_reference(changes, removed):
  full, abl = pair(**changes)
  pf, pa = layer_params(full), layer_params(abl)
  assert set(pf) - set(pa) == removed and set(pa) <= set(pf)
  for k in pa:
    np.testing.assert_array_equal(pa[k], pf[k], err_msg=k)  # every kept parameter has the same initial value
  h, ids = inputs()
  got = np.asarray(abl(h, ids))
  np.testing.assert_allclose(got, reference(abl, h, ids), rtol=2e-5, atol=2e-5)
  assert np.abs(got - np.asarray(full(h, ids))).max() > 1e-3  # and the ablation does change the output
  if not changes.get("gate", True):
    np.testing.assert_array_equal(np.asarray(abl.gates(h, ids)), 1.0)
  n_full = sum(v.size for k, v in pf.items() if k != "table")
  model = dataclasses.replace(BASE, engram=abl.config)
  assert budget._engram_dense(model).total == sum(v.size for k, v in pa.items() if k != "table")
  assert budget._engram_dense(BASE).total == n_full


def test_no_conv_equals_the_full_layer_while_its_conv_taps_are_zero():
  full = build_engram_layers(CFG, (1,), D, COMP, rngs=nnx.Rngs(0))[1]  # init: conv taps 0, SiLU(0) = 0
  abl = build_engram_layers(dataclasses.replace(CFG, short_conv=False), (1,), D, COMP, rngs=nnx.Rngs(0))[1]
  h, ids = inputs()
  np.testing.assert_array_equal(np.asarray(abl(h, ids)), np.asarray(full(h, ids)))


@pytest.mark.parametrize("changes", [{"short_conv": False}, {"gate": False}])
def test_ablated_layer_decodes_like_its_full_pass(changes):
  _, layer = pair(**changes)
  h, ids = inputs(s=7)
  full = np.asarray(layer(h, ids))
  cache = layer.init_decode_cache(2)
  assert cache.conv.shape[1] == layer.conv_state_len == (0 if not changes.get("short_conv", True) else 9)
  outs = []
  for t in range(7):
    y, cache = layer.decode_step(h[:, t:t + 1], ids[:, t:t + 1], cache)
    outs.append(np.asarray(y))
  np.testing.assert_allclose(np.concatenate(outs, axis=1), full, rtol=1e-5, atol=1e-5)


def test_single_row_table_reads_one_row_per_head_whatever_the_ngram():
  full, abl = pair(single_row_table=True)
  pf, pa = layer_params(full), layer_params(abl)
  assert set(pf) == set(pa)
  changed = {k for k in pf if pf[k].shape != pa[k].shape}
  assert changed == {"table"} and pa["table"].shape == (8, 4)  # H = 4 rows, padded to table_row_multiple
  h, ids = inputs()
  rows = np.asarray(abl.flat_rows(abl.hash(ids)))  # [B, S, H]
  np.testing.assert_array_equal(rows, np.broadcast_to(np.arange(4), rows.shape))  # head k -> row k, always
  np.testing.assert_allclose(np.asarray(abl(h, ids)), reference(abl, h, ids), rtol=2e-5, atol=2e-5)
  # the retrieved memory is the same for every token: only h (the gate) and the conv make the outputs differ
  e = np.asarray(abl.retrieve(abl.hash(ids)))
  np.testing.assert_array_equal(e, np.broadcast_to(e[0, 0], e.shape))
  assert budget.engram_table_rows(dataclasses.replace(BASE, engram=abl.config)) == 8


# ------------------------------------------------------------------------------------------------ whole models


def decoder(cfg, compression=None):
  return Decoder(cfg, compression=compression, rngs=nnx.Rngs(0))


def logits(model, tokens):
  return np.asarray(model(tokens)[0])


TOKENS = jnp.asarray(np.random.default_rng(3).integers(0, V, (2, 10)), jnp.int32)
ENGRAM_KEYS = ("table", "value_proj", "key_proj", "gate_norm_h", "gate_norm_k", "conv_norm", "conv_weight")


def _is_hc(path):
  return "_hc." in path


ABLATIONS = {
    # name: (model change, which changed/added/removed parameter paths are allowed, same engram layer count)
    "no_gate": (lambda c: dataclasses.replace(c, engram=dataclasses.replace(c.engram, gate=False)),
                lambda p: p.split(".")[-1] in ("key_proj", "gate_norm_h", "gate_norm_k"), True),
    "no_conv": (lambda c: dataclasses.replace(c, engram=dataclasses.replace(c.engram, short_conv=False)),
                lambda p: p.split(".")[-1] in ("conv_norm", "conv_weight"), True),
    "one_head_per_order": (lambda c: dataclasses.replace(c, engram=dataclasses.replace(c.engram, heads_per_order=1)),
                           lambda p: p.split(".")[-1] in ("table", "value_proj", "key_proj"), True),
    "ngram4": (lambda c: dataclasses.replace(c, engram=dataclasses.replace(c.engram, max_ngram=4,
                                                                        table_base_sizes=(31, 37, 41))),
               lambda p: p.split(".")[-1] in ("table", "value_proj", "key_proj"), True),
    "single_branch": (lambda c: dataclasses.replace(c, hc_expansion=1,
                                                    engram=dataclasses.replace(c.engram, num_branches=1)),
                      lambda p: _is_hc(p) or p.split(".")[-1] in ENGRAM_KEYS[2:], True),
    "capacity_one": (lambda c: dataclasses.replace(c, engram=dataclasses.replace(c.engram, single_row_table=True)),
                     lambda p: p.endswith("engram.table"), True),
    "layers_early": (lambda c: dataclasses.replace(c, engram_layers=(0,)), lambda p: ".engram." in p, True),
    "layers_late": (lambda c: dataclasses.replace(c, engram_layers=(2,)), lambda p: ".engram." in p, True),
    "layers_every": (lambda c: dataclasses.replace(c, engram_layers=(0, 1, 2)), lambda p: ".engram." in p, False),
}


@pytest.mark.parametrize("name", sorted(ABLATIONS))
def test_model_ablation_changes_only_its_parameters_and_the_output(name):
  change, allowed, same_layers = ABLATIONS[name]
  base, abl = decoder(BASE), decoder(change(BASE))
  pb, pa = flat_params(base), flat_params(abl)
  differ = {k for k in set(pb) | set(pa) if k not in pb or k not in pa or pb[k].shape != pa[k].shape}
  assert differ and all(allowed(k) for k in differ), sorted(differ)
  if same_layers:  # same random stream: every parameter the ablation keeps starts from the same value
    for k in set(pb) & set(pa) - differ:
      np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)
  for m in (base, abl):  # non-zero conv taps so the conv matters
    for b in m.blocks:
      if b.engram is not None:
        randomise_conv(b.engram)
  lb, la = logits(base, TOKENS), logits(abl, TOKENS)
  assert la.shape == lb.shape == (2, 10, V) and np.isfinite(la).all()
  assert np.abs(la - lb).max() > 1e-4


def test_no_compression_switch_changes_only_the_map():
  """RunConfig.engram_compression='none' hashes raw ids: the identity map; parameters are untouched, and only
  tokens whose ids the vocabulary map merges see different memory."""
  identity = hashing.identity_compression(V)

  class Tok:  # a SentencePiece-like vocabulary whose pieces i and i + 24 normalise alike
    def get_piece_size(self):
      return V

    def id_to_piece(self, i):
      return ("\u2581" if i >= 24 else "") + f"w{i % 24}"

  vocab = type("Vocab", (), {"tokenizer": Tok()})()
  merged = run_dir.task_compression(BASE, "vocab", vocab)
  np.testing.assert_array_equal(run_dir.task_compression(BASE, "none", vocab), identity)
  assert hashing.compressed_vocab_size(merged) < V
  a, b = decoder(BASE, identity), decoder(BASE, merged)
  pa, pb = flat_params(a), flat_params(b)
  assert pa.keys() == pb.keys() and all(np.array_equal(pa[k], pb[k]) for k in pa)
  np.testing.assert_array_equal(merged, np.arange(V) % 24)  # ids i and i + 24 share a compressed id
  low = jnp.asarray([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]], jnp.int32)  # ids < 24: the two maps agree on them
  np.testing.assert_array_equal(logits(a, low), logits(b, low))
  high = low + 24  # merged: hashed as the low ids; identity: other rows
  assert np.abs(logits(a, high) - logits(b, high)).max() > 1e-4
