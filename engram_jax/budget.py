"""Parameter and FLOP accounting for a ModelConfig, and the sparsity-allocation solver (arXiv 2601.07372, sec. 3).

Definitions (paper section 3, our exact reading):
  P_tot     trainable parameters (nnx.Param) excluding the vocabulary embedding and the LM head. Non-trainable
            state (MoE balance biases, the Engram compression map) is not a parameter.
  P_act     parameters used by one token: everything in P_tot except the routed experts a token does not pick
            (E - top_k per MoE layer) and the Engram tables. A token reads (N - 1) * K rows of head_dim from each
            table by lookup, with no matmul; we count the whole table as sparse (reported apart as
            `engram_rows_read`). Engram's projections, norms and conv are activated parameters.
  P_sparse  P_tot - P_act = inactive routed experts (P_MoE_sparse) + Engram tables (P_Engram).
  rho       P_MoE_sparse / P_sparse (1 = pure MoE).

Training FLOPs per token (forward + backward = 3 x forward, 2 FLOPs per multiply-accumulate):
  flops = 6 * (N_mm + N_head) + 6 * L * S * d_attn / 2 * 2  =  6 * (N_mm + N_head) + 12 * L * S * d_attn / 2
  N_mm    activated matmul weights: attention projections, dense FFN / shared + top_k routed experts, router,
          Engram W_V and W_K (W_K once per branch), the depthwise conv taps (per branch), and the dynamic
          hyper-connection projections times the G branches they are applied to (norm scales, biases excluded).
  N_head  d_model * vocab (the LM head matmul is real compute even though it is excluded from P_tot).
  attention: per layer and token, QK^T and AV are 2 * S * d_attn multiply-accumulates without a mask, half of
          that under a causal mask (S = sequence length, d_attn = num_heads * head_dim); x 2 FLOPs x 3 passes.
  Not counted: elementwise work (norms, gates, SiLU, routing softmax/top-k, the table gather) and the
  hyper-connection stream mixing (G * (G + 1) * D per sublayer and token, no weights).

Solver (`solve_allocation`): for a backbone (attention, dense layers, shared experts, top_k, expert width fixed)
and a target P_tot, the pure-MoE point (rho = 1) gets the routed-expert count E_1 whose P_tot is nearest the
target; its (P_tot, P_act) is the sweep's reference. For rho < 1: E = top_k + round(rho * P_sparse / P_expert_slot),
and the Engram tables take the rest of P_tot (per-head prime sizes via EngramConfig.table_base_sizes). Keeping
P_act and FLOPs equal: Engram's dense part (W_V, W_K, conv) and the smaller router add activated matmul weights;
with offset='dense_ffn' (default) the leading dense FFN layers shrink their hidden width by exactly that many
weights (rounded to 3 * d_model * num_dense_layers), so P_act and FLOPs match the reference to within one hidden
unit plus Engram's norm scales. offset='none' keeps the backbone and accepts the overhead inside the tolerance.

Letters: L layers, S sequence, D d_model, E routed experts, K hash heads per order, N max n-gram order,
G hyper-connection branches, V vocabulary.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

from engram_jax import hashing
from engram_jax.layers.engram_config import EngramConfig
from engram_jax.models.config import ModelConfig

# ----------------------------------------------------------------------------------------------------------------
# Engram table sizes (primes)
# ----------------------------------------------------------------------------------------------------------------


def engram_primes(engram: EngramConfig, layer_ids: Sequence[int]) -> dict[int, tuple[tuple[int, ...], ...]]:
  """Per-head table sizes {layer: ((primes of order 2), (order 3), ...)}, allocated jointly over `layer_ids` by
  the same function the Engram layer uses (engram_jax.hashing.allocate_primes)."""
  return hashing.allocate_primes(engram.table_base_sizes, engram.heads_per_order, tuple(layer_ids))


def engram_table_rows(cfg: ModelConfig) -> int:
  """Rows of all Engram tables: per layer the sum of its primes, padded up to a multiple of
  EngramConfig.table_row_multiple as the layer pads its flat table (the padding rows are parameters that no id
  reads). The shape does not depend on the mesh."""
  m = cfg.engram.table_row_multiple
  primes = engram_primes(cfg.engram, cfg.engram_layers)
  if cfg.engram.single_row_table:  # capacity-1 control: one row per head
    primes = {l: tuple((1,) * len(order) for order in layer) for l, layer in primes.items()}
  return sum(-(-sum(p for order in layer for p in order) // m) * m for layer in primes.values())


TABLE_OPTIMIZERS = ("adam_dense", "adam_lazy", "adagrad_rowwise", "sgd")


def table_memory(cfg: ModelConfig, param_bytes: int = 4) -> dict:
  """Engram table memory of `cfg` (float32): rows, table bytes, and per table optimizer its state bytes per row and
  in total. Row-sparse optimizers ('adam_lazy', 'adagrad_rowwise', 'sgd') also never build the dense [V, d]
  gradient (adam_dense does: table_bytes more at every step)."""
  from engram_jax.sparse_tables import state_bytes_per_row  # noqa: PLC0415 - jax only when asked
  rows = engram_table_rows(cfg) if cfg.engram_layers else 0
  d = cfg.engram.head_dim if cfg.engram_layers else 0
  per_row = {k: state_bytes_per_row(k, d, param_bytes) for k in TABLE_OPTIMIZERS}
  return {"rows": rows, "table_bytes": rows * d * param_bytes, "optimizer_state_bytes_per_row": per_row,
          "optimizer_state_bytes": {k: rows * b for k, b in per_row.items()},
          "dense_gradient_bytes": {k: rows * d * param_bytes if k == "adam_dense" else 0
                                   for k in TABLE_OPTIMIZERS}}


def format_table_memory(cfg: ModelConfig) -> str:
  """One line per table optimizer: state bytes per row and in total, beside the table's own bytes."""
  mem = table_memory(cfg)
  lines = [f"Engram tables: {mem['rows']:,} rows, {mem['table_bytes'] / 2**20:,.1f} MiB (float32)",
           f"{'table optimizer':>16} {'state B/row':>11} {'state MiB':>10} {'dense grad MiB':>14}"]
  for k in TABLE_OPTIMIZERS:
    lines.append(f"{k:>16} {mem['optimizer_state_bytes_per_row'][k]:>11} "
                 f"{mem['optimizer_state_bytes'][k] / 2**20:>10,.1f} {mem['dense_gradient_bytes'][k] / 2**20:>14,.1f}")
  return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Parameter counts per component
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Group:
  """One component's parameters: total, activated per token, and activated matmul weights (for FLOPs)."""

  total: int
  active: int
  matmul: int


def _attention(cfg: ModelConfig) -> Group:
  d, h, kv, hd = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  n = d * h * hd + 2 * d * kv * hd + h * hd * d  # W_q, W_k, W_v, W_o (no biases)
  return Group(n, n, n)


def _hyper_connections(cfg: ModelConfig) -> Group:
  """Per residual sublayer (attention, FFN) one hyper-connection when G > 1 (arXiv 2409.19606)."""
  g, d = cfg.hc_expansion, cfg.d_model
  if g == 1:
    return Group(0, 0, 0)
  if cfg.hc_variant == "hc":
    # Static beta [G] and alpha [G, 1 + G]; dynamic w_beta [D] and W_alpha [D, 1 + G] (applied to each of the G
    # branches); two scalar scales; the RMSNorm scale [D] of the input.
    weights = d + d * (g + 1)
    per = weights + g + g * (g + 1) + 2 + d
    return Group(per, per, g * weights)
  # mHC: phi_pre, phi_post [G*D, G], phi_res [G*D, G*G]; biases [G], [G], [G, G]; three scalars; norm scale [G*D].
  weights = g * d * (2 * g + g * g)
  per = weights + 2 * g + g * g + 3 + g * d
  return Group(per, per, weights)


def _engram_dense(cfg: ModelConfig) -> Group:
  """One Engram module without its table: W_V (shared), W_K, two gate norms and the conv norm + taps per branch
  (without the gate or the conv when EngramConfig.gate / short_conv are off)."""
  e = cfg.engram
  width = (e.max_ngram - 1) * e.heads_per_order * e.head_dim  # channels of e_t
  g, d = e.num_branches, cfg.d_model
  w_v, w_k = width * d, (g * width * d if e.gate else 0)
  conv = g * d * e.kernel_size if e.short_conv else 0
  norms = (2 * g * d if e.gate else 0) + (g * d if e.short_conv else 0)
  total = w_v + w_k + conv + norms
  return Group(total, total, w_v + w_k + conv)


def count_params(cfg: ModelConfig) -> dict[str, Group]:
  """Exact parameter counts of the Decoder built from `cfg`, by component (summed over layers)."""
  d, L = cfg.d_model, cfg.num_layers
  groups: dict[str, Group] = {}
  groups["embedding"] = Group(cfg.vocab_size * d, cfg.vocab_size * d, 0)
  head = 0 if cfg.tie_embeddings else cfg.vocab_size * d
  groups["lm_head"] = Group(head, head, head)
  att = _attention(cfg)
  groups["attention"] = Group(L * att.total, L * att.active, L * att.matmul)
  groups["norms"] = Group(2 * L * d + d, 2 * L * d + d, 0)  # pre-attention, pre-FFN per block; final norm
  hc = _hyper_connections(cfg)
  groups["hyper_connections"] = Group(2 * L * hc.total, 2 * L * hc.active, 2 * L * hc.matmul)

  n_dense = L if cfg.moe is None else cfg.num_dense_layers
  dense = n_dense * 3 * d * cfg.dense_hidden  # SwiGLU: gate, up, down
  groups["dense_ffn"] = Group(dense, dense, dense)
  if cfg.moe is not None:
    m, l_moe = cfg.moe, L - cfg.num_dense_layers
    expert = 3 * d * m.expert_hidden
    router = l_moe * d * m.num_experts
    shared = l_moe * m.num_shared_experts * expert
    routed_total, routed_active = l_moe * m.num_experts * expert, l_moe * m.top_k * expert
    groups["moe_router"] = Group(router, router, router)
    groups["moe_shared"] = Group(shared, shared, shared)
    groups["moe_routed"] = Group(routed_total, routed_active, routed_active)
  if cfg.engram_layers:
    ed = _engram_dense(cfg)
    n = len(cfg.engram_layers)
    groups["engram_dense"] = Group(n * ed.total, n * ed.active, n * ed.matmul)
    groups["engram_table"] = Group(engram_table_rows(cfg) * cfg.engram.head_dim, 0, 0)
  return groups


@dataclasses.dataclass(frozen=True)
class Budget:
  """The accounting of one ModelConfig (see the module docstring for every definition)."""

  total: int  # P_tot
  active: int  # P_act
  moe_sparse: int  # inactive routed experts
  engram_table: int  # P_Engram
  engram_dense: int  # Engram projections / norms / conv (inside P_act)
  embedding: int
  lm_head: int
  matmul_active: int  # N_mm
  seq_len: int
  attention_flops: float  # per token, training
  flops_per_token: float  # training, per token
  engram_rows_read: int  # table rows gathered per token (all Engram layers)
  num_experts: int
  groups: dict[str, Group]

  @property
  def sparse(self) -> int:
    return self.total - self.active

  @property
  def rho(self) -> float:
    """MoE share of the sparse parameters (1.0 when there are none)."""
    return self.moe_sparse / self.sparse if self.sparse else 1.0

  @property
  def engram_share(self) -> float:
    return self.engram_table / self.sparse if self.sparse else 0.0

  def as_dict(self) -> dict:
    out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "groups"}
    out.update(sparse=self.sparse, rho=self.rho, engram_share=self.engram_share,
               groups={k: dataclasses.asdict(v) for k, v in self.groups.items()})
    return out


def compute_budget(cfg: ModelConfig, seq_len: int) -> Budget:
  """P_tot, P_act, shares and training FLOPs per token of `cfg` at sequence length `seq_len`."""
  groups = count_params(cfg)
  excluded = ("embedding", "lm_head")
  total = sum(g.total for k, g in groups.items() if k not in excluded)
  active = sum(g.active for k, g in groups.items() if k not in excluded)
  matmul = sum(g.matmul for k, g in groups.items() if k not in excluded)
  routed = groups.get("moe_routed", Group(0, 0, 0))
  attention = 12 * cfg.num_layers * seq_len * cfg.num_heads * cfg.head_dim / 2
  e = cfg.engram
  rows_read = len(cfg.engram_layers) * (e.max_ngram - 1) * e.heads_per_order if cfg.engram_layers else 0
  return Budget(
      total=total, active=active, moe_sparse=routed.total - routed.active,
      engram_table=groups.get("engram_table", Group(0, 0, 0)).total,
      engram_dense=groups.get("engram_dense", Group(0, 0, 0)).total,
      embedding=groups["embedding"].total, lm_head=groups["lm_head"].total, matmul_active=matmul,
      seq_len=seq_len, attention_flops=attention,
      flops_per_token=6 * (matmul + cfg.vocab_size * cfg.d_model) + attention,
      engram_rows_read=rows_read, num_experts=cfg.moe.num_experts if cfg.moe else 0, groups=groups)


# ----------------------------------------------------------------------------------------------------------------
# Sparsity-allocation solver
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Allocation:
  """One point of a sparsity-allocation sweep: the concrete config and how close it lands to the targets."""

  rho_target: float
  config: ModelConfig
  budget: Budget
  p_total_target: int
  p_active_target: int
  flops_target: float

  @property
  def total_error(self) -> float:
    return self.budget.total / self.p_total_target - 1

  @property
  def active_error(self) -> float:
    return self.budget.active / self.p_active_target - 1

  @property
  def flops_error(self) -> float:
    return self.budget.flops_per_token / self.flops_target - 1

  def as_dict(self) -> dict:
    return dict(rho_target=self.rho_target, budget=self.budget.as_dict(), p_total_target=self.p_total_target,
                p_active_target=self.p_active_target, flops_target=self.flops_target,
                total_error=self.total_error, active_error=self.active_error, flops_error=self.flops_error,
                num_experts=self.budget.num_experts, dense_hidden=self.config.dense_hidden,
                engram_layers=list(self.config.engram_layers),
                table_base_sizes=list(self.config.engram.table_base_sizes) if self.config.engram_layers else [])


def _with_experts(cfg: ModelConfig, num_experts: int, **changes) -> ModelConfig:
  return dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, num_experts=num_experts), **changes)


def reference_config(backbone: ModelConfig, *, p_total: int | None = None, num_experts: int | None = None,
                     total_to_active: float | None = None) -> ModelConfig:
  """The pure-MoE (rho = 1) point: `backbone` without Engram, with E set from exactly one of the three targets."""
  if backbone.moe is None:
    raise ValueError("solve_allocation: backbone.moe is None; the sweep splits sparse parameters between MoE "
                     "experts and Engram tables, so give the backbone an MoEConfig")
  if sum(x is not None for x in (p_total, num_experts, total_to_active)) != 1:
    raise ValueError("reference_config: give exactly one of p_total, num_experts, total_to_active")
  base = _with_experts(dataclasses.replace(backbone, engram_layers=(), engram=None), backbone.moe.top_k)
  if num_experts is None:
    b0 = compute_budget(base, 1)
    m, l_moe, d = base.moe, base.num_layers - base.num_dense_layers, base.d_model
    # Each expert beyond top_k adds l_moe * 3 d h inactive weights and l_moe * d router weights (activated):
    #   P_tot(E) = T0 + (E - k) l_moe (3 d h + d),   P_act(E) = A0 + (E - k) l_moe d.
    if p_total is not None:
      extra = (p_total - b0.total) / (l_moe * (3 * d * m.expert_hidden + d))
    else:
      denom = l_moe * (3 * d * m.expert_hidden + d - total_to_active * d)
      if denom <= 0:
        raise ValueError(f"reference_config: total_to_active={total_to_active} is unreachable (the router alone "
                         "grows P_act that fast); lower it or widen moe.expert_hidden")
      extra = (total_to_active * b0.active - b0.total) / denom
    num_experts = m.top_k + max(0, round(extra))
  if num_experts < backbone.moe.top_k:
    raise ValueError(f"reference_config: num_experts {num_experts} < moe.top_k {backbone.moe.top_k}; "
                     "raise p_total (or num_experts) or lower top_k")
  return _with_experts(base, num_experts)


def solve_allocation(backbone: ModelConfig, engram: EngramConfig, engram_layers: Sequence[int], rho: float, *,
                     seq_len: int, p_total: int | None = None, num_experts: int | None = None,
                     total_to_active: float | None = None, offset: str = "dense_ffn",
                     tolerance: float = 0.01) -> Allocation:
  """The config at MoE share `rho` with P_tot, P_act (and FLOPs) of the pure-MoE reference within `tolerance`.

  backbone: attention, layers, dense FFN, shared experts, top_k and expert width (num_experts is overwritten);
  engram: the Engram shape (table_base_sizes overwritten; num_branches must equal backbone.hc_expansion);
  exactly one of p_total / num_experts (at rho = 1) / total_to_active sets the budget.
  """
  if not 0.0 <= rho <= 1.0:
    raise ValueError(f"solve_allocation: rho={rho} must lie in [0, 1] (1 = pure MoE)")
  if offset not in ("dense_ffn", "none"):
    raise ValueError(f"solve_allocation: offset={offset!r}; use 'dense_ffn' or 'none'")
  ref = reference_config(backbone, p_total=p_total, num_experts=num_experts, total_to_active=total_to_active)
  rb = compute_budget(ref, seq_len)
  target_total = rb.total if p_total is None else p_total
  if rho == 1.0 or not engram_layers:
    return Allocation(rho, ref, rb, target_total, rb.active, rb.flops_per_token)
  if engram.num_branches != backbone.hc_expansion:
    raise ValueError(f"solve_allocation: engram.num_branches={engram.num_branches} must equal "
                     f"backbone.hc_expansion={backbone.hc_expansion}")
  m, l_moe, d = ref.moe, ref.num_layers - ref.num_dense_layers, ref.d_model
  expert_slot = l_moe * 3 * d * m.expert_hidden
  num_e = m.top_k + round(rho * rb.sparse / expert_slot)
  n_heads = len(engram_layers) * (engram.max_ngram - 1) * engram.heads_per_order
  probe = dataclasses.replace(engram, table_base_sizes=(2,) * (engram.max_ngram - 1))
  cfg = _with_experts(ref, num_e, engram_layers=tuple(engram_layers), engram=probe)
  if offset == "dense_ffn":
    if ref.num_dense_layers < 1:
      raise ValueError("solve_allocation: offset='dense_ffn' needs backbone.num_dense_layers >= 1; "
                       "use offset='none' or add a leading dense layer")
    extra = compute_budget(cfg, seq_len).matmul_active - rb.matmul_active
    hidden = ref.dense_hidden - round(extra / (3 * d * ref.num_dense_layers))
    if hidden < 1:
      raise ValueError(f"solve_allocation: offsetting Engram's {extra} activated weights would leave "
                       f"dense_hidden={hidden}; shrink the Engram width (heads_per_order, head_dim) or use offset='none'")
    cfg = dataclasses.replace(cfg, dense_hidden=hidden)
  b_no_table = compute_budget(cfg, seq_len)
  table_params = target_total - (b_no_table.total - b_no_table.engram_table)
  rows_per_head = table_params // (engram.head_dim * n_heads)
  if rows_per_head < 2:
    raise ValueError(f"solve_allocation: rho={rho} leaves {table_params} parameters for {n_heads} Engram heads "
                     f"(< 2 rows each); raise p_total or rho")
  sized = dataclasses.replace(engram, table_base_sizes=(int(rows_per_head),) * (engram.max_ngram - 1))
  # Primes above the base and the padding of each flat table add rows: take them back from the base once.
  excess = compute_budget(dataclasses.replace(cfg, engram=sized), seq_len).total - target_total
  rows_per_head = max(2, rows_per_head - round(excess / (engram.head_dim * n_heads)))
  sized = dataclasses.replace(engram, table_base_sizes=(int(rows_per_head),) * (engram.max_ngram - 1))
  cfg = dataclasses.replace(cfg, engram=sized)
  alloc = Allocation(rho, cfg, compute_budget(cfg, seq_len), target_total, rb.active, rb.flops_per_token)
  for name, err in (("P_tot", alloc.total_error), ("P_act", alloc.active_error), ("FLOPs", alloc.flops_error)):
    if abs(err) > tolerance:
      raise ValueError(f"solve_allocation: rho={rho}: {name} misses its target by {err:+.2%} (> {tolerance:.0%}); "
                       "use offset='dense_ffn', a smaller Engram width, or a larger budget")
  return alloc


def solve_sweep(backbone: ModelConfig, engram: EngramConfig, engram_layers: Sequence[int], rhos: Iterable[float],
                **kwargs) -> list[Allocation]:
  """`solve_allocation` for every rho (same targets)."""
  return [solve_allocation(backbone, engram, engram_layers, r, **kwargs) for r in rhos]


def _si(x: float) -> str:
  for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
    if abs(x) >= scale:
      return f"{x / scale:.4g}{unit}"
  return f"{x:.4g}"


def format_table(allocs: Sequence[Allocation]) -> str:
  """The budget table of a sweep, one row per rho."""
  head = (f"{'rho':>5} {'rho_got':>7} {'E':>5} {'dense_h':>7} {'rows/head':>10} {'P_tot':>9} {'P_act':>9} "
          f"{'P_sparse':>9} {'MoE_sp':>9} {'Engram':>9} {'FLOPs/tok':>10} {'dP_tot':>7} {'dP_act':>7} {'dFLOPs':>7}")
  lines = [head, "-" * len(head)]
  for a in allocs:
    b, c = a.budget, a.config
    rows = f"~{c.engram.table_base_sizes[0]}" if c.engram_layers else "-"
    lines.append(f"{a.rho_target:5.2f} {b.rho:7.3f} {b.num_experts:5d} {c.dense_hidden:7d} {rows:>10} "
                 f"{_si(b.total):>9} {_si(b.active):>9} {_si(b.sparse):>9} {_si(b.moe_sparse):>9} "
                 f"{_si(b.engram_table):>9} {_si(b.flops_per_token):>10} {a.total_error:+7.2%} "
                 f"{a.active_error:+7.2%} {a.flops_error:+7.2%}")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
  """python -m engram_jax.budget: the budget table of a sparsity-allocation plan (flags: engram_jax.cli)."""
  from engram_jax import cli  # noqa: PLC0415 - flags and gin
  from engram_jax.experiments.sparsity_allocation import print_budget  # noqa: PLC0415 - the plan's printer
  return cli.run(cli.BUDGET, argv, print_budget)


if __name__ == "__main__":  # run the importable module's main, so gin and the caches see a single copy
  from engram_jax import budget as _entry
  _entry.main()
