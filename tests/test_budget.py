"""engram_jax.budget: counts equal the real Decoder's parameters; the solver meets its tolerances.

Letters: E routed experts, G hyper-connection branches, L layers, S sequence.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from engram_jax import budget
from engram_jax.layers.engram_config import EngramConfig
from engram_jax.layers.moe_config import MoEConfig
from engram_jax.models.config import ModelConfig

TINY = ModelConfig(vocab_size=96, d_model=32, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8,
                   dense_hidden=48, num_dense_layers=1)
TINY_MOE = dataclasses.replace(TINY, moe=MoEConfig(num_experts=6, num_shared_experts=1, top_k=2, expert_hidden=16))
TINY_ENGRAM = EngramConfig(max_ngram=3, heads_per_order=2, head_dim=8, table_base_sizes=(53, 71))


def _decoder_params(cfg: ModelConfig) -> dict[tuple, int]:
  """{path: size} of every nnx.Param of the real Decoder, counted without allocating."""
  from engram_jax.models.decoder import Decoder  # noqa: PLC0415 - written in parallel; imported per test.

  model = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
  flat = nnx.state(model, nnx.Param).flat_state()
  return {tuple(str(k) for k in path): math.prod(v.get_value().shape) for path, v in flat}


def _table_params(cfg: ModelConfig) -> int:
  from engram_jax.layers.engram import EngramTable  # noqa: PLC0415

  from engram_jax.models.decoder import Decoder  # noqa: PLC0415

  model = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
  return sum(math.prod(v.get_value().shape) for _, v in nnx.state(model, EngramTable).flat_state())


def _check_counts(cfg: ModelConfig):
  params = _decoder_params(cfg)
  b = budget.compute_budget(cfg, seq_len=16)
  embed = sum(n for p, n in params.items() if p[0] == "embed")
  head = sum(n for p, n in params.items() if p[0] == "lm_head")
  assert embed == b.embedding
  assert head == b.lm_head
  assert sum(params.values()) - embed - head == b.total
  return params, b


CONFIGS = {
    "dense": dataclasses.replace(TINY, num_dense_layers=3),
    "dense_tied": dataclasses.replace(TINY, num_dense_layers=3, tie_embeddings=True),
    "moe": TINY_MOE,
    "moe_hc4": dataclasses.replace(TINY_MOE, hc_expansion=4),
    "moe_mhc3": dataclasses.replace(TINY_MOE, hc_expansion=3, hc_variant="mhc"),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_counts_equal_decoder_params(name):
  _check_counts(CONFIGS[name])


def test_moe_expert_counts_by_component():
  """Routed-expert weights grow by 3 D h per expert and layer; the router by D per expert and layer."""
  a = _decoder_params(TINY_MOE)
  b = _decoder_params(dataclasses.replace(TINY_MOE, moe=dataclasses.replace(TINY_MOE.moe, num_experts=9)))
  l_moe, d, h = TINY.num_layers - 1, TINY.d_model, TINY_MOE.moe.expert_hidden
  assert sum(b.values()) - sum(a.values()) == 3 * l_moe * (3 * d * h + d)
  ba = budget.compute_budget(TINY_MOE, 16)
  # Inactive experts: (E - k) per MoE layer; active = total - inactive.
  assert ba.moe_sparse == l_moe * (6 - 2) * 3 * d * h
  assert ba.active == ba.total - ba.moe_sparse


@pytest.mark.parametrize("g,variant", [(1, "hc"), (2, "hc"), (2, "mhc")])
def test_counts_engram_moe(g, variant):
  cfg = dataclasses.replace(TINY_MOE, hc_expansion=g, hc_variant=variant, engram_layers=(0, 2),
                            engram=dataclasses.replace(TINY_ENGRAM, num_branches=g))
  params, b = _check_counts(cfg)
  assert _table_params(cfg) == b.engram_table
  primes = budget.engram_primes(cfg.engram, cfg.engram_layers)
  flat = [p for layer in primes.values() for order in layer for p in order]
  assert len(set(flat)) == len(flat) == 2 * 2 * 2 and min(flat) >= 53
  padded = sum(-(-sum(p for o in layer for p in o) // 1024) * 1024 for layer in primes.values())
  assert b.engram_table == padded * 8  # Each layer's flat table is padded to table_row_multiple rows.
  assert b.active == b.total - b.moe_sparse - b.engram_table
  assert b.engram_rows_read == 2 * 2 * 2


def test_flops_match_xla_cost_analysis():
  """Forward matmul FLOPs of a dense decoder, counted by XLA, agree with budget's formula.

  XLA computes the full S x S score matrix (the causal mask is applied after), so its attention term is twice
  the causal one: forward = flops_per_token / 3 + 2 L S d_attn per token. Elementwise work (norms, softmax,
  SiLU, RoPE) is in XLA's count but not in ours: allowed 5%.
  """
  from engram_jax.models.decoder import Decoder  # noqa: PLC0415

  cfg = ModelConfig(vocab_size=512, d_model=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32,
                    dense_hidden=384, num_dense_layers=2)
  batch, seq = 2, 64
  model = Decoder(cfg, rngs=nnx.Rngs(0))
  graph, state = nnx.split(model)
  fwd = jax.jit(lambda s, t: nnx.merge(graph, s)(t)[0])
  cost = fwd.lower(state, jnp.zeros((batch, seq), jnp.int32)).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla = cost["flops"] / (batch * seq)
  b = budget.compute_budget(cfg, seq)
  ours = b.flops_per_token / 3 + 2 * cfg.num_layers * seq * cfg.num_heads * cfg.head_dim
  assert abs(xla / ours - 1) < 0.05, (xla, ours)


# ---------------------------------------------------------------------------------------------------- solver
CPU_BACKBONE = ModelConfig(vocab_size=4096, d_model=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32,
                           dense_hidden=512, num_dense_layers=1,
                           moe=MoEConfig(num_experts=8, num_shared_experts=1, top_k=2, expert_hidden=64))
CPU_ENGRAM = EngramConfig(max_ngram=3, heads_per_order=4, head_dim=16)
RHOS = (1.0, 0.95, 0.9, 0.8, 0.75, 0.6, 0.4, 0.2, 0.05)


@pytest.mark.parametrize("offset", ["dense_ffn", "none"])
def test_solver_tolerances_grid(offset):
  allocs = budget.solve_sweep(CPU_BACKBONE, CPU_ENGRAM, (1,), RHOS, seq_len=128, total_to_active=10.0,
                              offset=offset, tolerance=0.01 if offset == "dense_ffn" else 0.05)
  ref = allocs[0].budget
  assert ref.engram_table == 0 and abs(ref.total / ref.active - 10) < 0.1
  for a in allocs:
    b = a.budget
    assert abs(b.total / ref.total - 1) < (0.01 if offset == "dense_ffn" else 0.05)
    assert abs(b.rho - a.rho_target) < 0.03, (a.rho_target, b.rho)
    assert b.num_experts >= CPU_BACKBONE.moe.top_k
    assert b.total == b.active + b.moe_sparse + b.engram_table
    if offset == "dense_ffn":
      # P_act and FLOPs equal to within one dense hidden unit (3 D weights) plus Engram's norm scales.
      assert abs(b.active - ref.active) <= 3 * 128 + 3 * 128 * 1
      assert abs(b.flops_per_token - ref.flops_per_token) <= 6 * 3 * 128
    # The solved configs build: table sizes are the primes the Engram layer would allocate.
    if a.rho_target < 1:
      assert a.config.engram_layers == (1,) and a.config.dense_hidden <= CPU_BACKBONE.dense_hidden


@pytest.mark.parametrize("name,p_act,p_tot,experts", [("budget_2e20", 568e6, 5.7e9, 106),
                                                          ("budget_6e20", 993e6, 9.9e9, 99)])
def test_solver_paper_budgets(name, p_act, p_tot, experts):
  """The gin configs' assumed backbones give the paper's budgets at rho = 1, and every rho meets 1%."""
  from engram_jax.experiments import sparsity_allocation  # noqa: PLC0415

  sweep, _, _ = sparsity_allocation.load_gin([f"configs/experiments/{name}.gin"])
  allocs = sparsity_allocation.plan_sweep(sweep)
  ref = allocs[0].budget
  assert ref.num_experts == experts
  assert abs(ref.active / p_act - 1) < 0.01
  assert abs(ref.total / p_tot - 1) < 0.015
  for a in allocs:
    assert max(abs(a.total_error), abs(a.active_error), abs(a.flops_error)) < 0.01
  assert [round(a.budget.rho, 2) for a in allocs][:3] == [1.0, 0.9, 0.8]


def test_solver_bad_config():
  with pytest.raises(ValueError, match="rho"):
    budget.solve_allocation(CPU_BACKBONE, CPU_ENGRAM, (1,), 1.2, seq_len=8, total_to_active=10)
  with pytest.raises(ValueError, match="backbone.moe"):
    budget.solve_allocation(dataclasses.replace(CPU_BACKBONE, moe=None), CPU_ENGRAM, (1,), 0.5, seq_len=8,
                            total_to_active=10)
  with pytest.raises(ValueError, match="num_branches"):
    budget.solve_allocation(CPU_BACKBONE, dataclasses.replace(CPU_ENGRAM, num_branches=2), (1,), 0.5, seq_len=8,
                            total_to_active=10)
  with pytest.raises(ValueError, match="exactly one"):
    budget.solve_allocation(CPU_BACKBONE, CPU_ENGRAM, (1,), 0.5, seq_len=8, total_to_active=10, num_experts=8)
  with pytest.raises(ValueError, match="P_act"):  # Engram width 3x the dense FFN: cannot fit in 1% without offset.
    budget.solve_allocation(CPU_BACKBONE, dataclasses.replace(CPU_ENGRAM, head_dim=64), (1,), 0.5, seq_len=8,
                            total_to_active=10, offset="none")


@pytest.mark.parametrize("kind", ["adam_dense", "adam_lazy", "adagrad_rowwise", "sgd"])
def test_table_memory_equals_the_optimizer_state_it_builds(kind):
  """Optimizer-state bytes per table row, as reported, equal the bytes of the state each optimizer creates."""
  from engram_jax import optim, sparse_tables  # noqa: PLC0415
  cfg = dataclasses.replace(TINY, engram_layers=(1, 2), engram=TINY_ENGRAM)
  mem = budget.table_memory(cfg)
  rows = _table_params(cfg) // TINY_ENGRAM.head_dim
  assert mem["rows"] == rows and mem["table_bytes"] == rows * TINY_ENGRAM.head_dim * 4
  table = jax.ShapeDtypeStruct((rows, TINY_ENGRAM.head_dim), jnp.float32)
  if kind in optim.SPARSE_TABLE_OPTIMIZERS:
    state = jax.eval_shape(lambda t: sparse_tables.init_state(kind, t), table)
  else:
    cfg_opt = optim.OptimizerConfig(table_optimizer=kind)
    state = jax.eval_shape(optim.make_optimizer(cfg_opt, 10, {"t": optim.TABLE}).init, {"t": table})
  row_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state) if x.ndim and x.shape[0] == rows)
  assert mem["optimizer_state_bytes"][kind] == row_bytes
  assert mem["optimizer_state_bytes_per_row"][kind] * rows == row_bytes
  assert "adagrad_rowwise" in budget.format_table_memory(cfg)
