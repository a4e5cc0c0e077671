"""EngramConfig: the hyper-parameters of one conditional-memory module (arXiv 2601.07372, section 2)."""

from __future__ import annotations

import dataclasses

import numpy as np

from engram_jax.config_checks import check_types

LOOKUPS = ("take", "shard_map", "all_to_all")
TABLE_PLACEMENTS = ("device", "host")


@dataclasses.dataclass(frozen=True)
class EngramConfig:
  """Shape of the Engram module; the defaults follow the paper and its demo at small scale.

  Checked at construction (ValueError naming the field); checks that need d_model or the vocabulary run in
  `build_engram_layers`.
  """

  max_ngram: int = 3  # N: suffix n-grams of orders 2..N are hashed (paper: {2, 3}).
  heads_per_order: int = 8  # K: hash heads per order, each with its own prime-sized table.
  head_dim: int = 32  # Width of one retrieved row; e_t has (N - 1) * K * head_dim channels.
  table_base_sizes: tuple[int, ...] = (50_021, 50_021)  # Per order 2..N: each head's modulus is the next unused prime >= this.
  kernel_size: int = 4  # Short causal depthwise conv (paper: 4), dilation = max_ngram.
  num_branches: int = 1  # G: hyper-connection expansion; one key projection and gate per branch, W_V shared.
  seed: int = 0  # Multipliers of layer l come from an RNG seeded with seed + 10007 * l (demo convention).
  hash_bits: int = 32  # 32: uint32 arithmetic (TPU-safe, no x64); 64: the demo's int64 hashing (needs jax x64).
  lookup: str = "take"  # Table lookup strategy: 'take' (GSPMD), 'shard_map' (masked local gather + psum), 'all_to_all'.
  all_to_all_capacity_factor: float = 2.0  # Only for lookup='all_to_all': slots per shard relative to a uniform split.
  table_init_std: float = 1.0  # Rows ~ N(0, std^2) (demo uses nn.Embedding's default init).
  memory_dim: int | None = None  # Optional check: total retrieved width (N - 1) * K * head_dim (paper: 1280 = 16 x 80).
  pad_id: int = 0  # RAW vocabulary id whose compressed id fills positions before a sequence / document start.
  table_row_multiple: int = 1024  # Flat table rows are padded up to a multiple of this (and of the mesh's row shards).
  norm_eps: float = 1e-6  # RMSNorm epsilon of the gate and conv norms (unless the two fields below override it).
  projection_bias: bool = False  # W_V and every W_K^g carry a bias (the demo's nn.Linear does); off: bias-free.
  gate_norm_eps: float | None = None  # Epsilon of the two gate norms; None: norm_eps (demo: float32 machine eps).
  conv_norm_eps: float | None = None  # Epsilon of the conv norms; None: norm_eps (demo: 1e-5).
  # Where decoding keeps the table: 'device' (a parameter, read in-graph) or 'host' (numpy in host memory; rows are
  # hashed and gathered on the host and sent with each step, see engram_jax.host_table). Does not change the math.
  table_placement: str = "device"
  # Ablation switches (defaults = the full module, arXiv 2601.07372). gate=False: alpha = 1 (no W_K, no gate norms);
  # short_conv=False: Y = alpha * v (no conv norm, no conv weights); single_row_table=True: capacity-1 control, every
  # head's modulus is 1, so each head reads one learned row whatever the n-gram (table_base_sizes then unused).
  gate: bool = True
  short_conv: bool = True
  single_row_table: bool = False

  def __post_init__(self):
    check_types(self)  # a wrong type fails here, naming the field, not inside a comparison below

    def bad(field, why):
      raise ValueError(f"EngramConfig.{field}={getattr(self, field)!r}: {why}")

    if self.max_ngram < 2:
      bad("max_ngram", "must be >= 2 (n-grams of orders 2..max_ngram are hashed)")
    if self.heads_per_order < 1:
      bad("heads_per_order", "must be >= 1")
    if self.head_dim < 1:
      bad("head_dim", "must be >= 1")
    if len(self.table_base_sizes) != self.max_ngram - 1:
      bad("table_base_sizes", f"needs one base size per order 2..{self.max_ngram}, i.e. {self.max_ngram - 1} values")
    if any(int(b) < 2 for b in self.table_base_sizes):
      bad("table_base_sizes", "every base size must be >= 2 (each head's table has a prime number of rows)")
    if self.hash_bits == 32 and max(self.table_base_sizes) >= 2**31:
      bad("table_base_sizes", "32-bit hashing needs primes < 2^31; use smaller tables or hash_bits=64")
    if self.kernel_size < 1:
      bad("kernel_size", "must be >= 1")
    if self.num_branches < 1:
      bad("num_branches", "must be >= 1 (1 = plain residual stream)")
    if self.hash_bits not in (32, 64):
      bad("hash_bits", "must be 32 (uint32, TPU-safe) or 64 (the demo's int64 hashing; needs jax x64)")
    if self.lookup not in LOOKUPS:
      bad("lookup", f"must be one of {LOOKUPS}")
    if self.all_to_all_capacity_factor <= 0:
      bad("all_to_all_capacity_factor", "must be > 0")
    if self.table_init_std <= 0:
      bad("table_init_std", "must be > 0")
    if self.memory_dim is not None and self.memory_dim != self.num_heads * self.head_dim:
      bad("memory_dim", f"must equal (max_ngram - 1) * heads_per_order * head_dim = {self.num_heads * self.head_dim}; "
          "change head_dim or leave memory_dim None")
    if self.pad_id < 0:
      bad("pad_id", "must be a raw vocabulary id >= 0")
    if self.table_placement not in TABLE_PLACEMENTS:
      bad("table_placement", f"must be one of {TABLE_PLACEMENTS}")
    if self.table_row_multiple < 1:
      bad("table_row_multiple", "must be >= 1")
    for field in ("norm_eps", "gate_norm_eps", "conv_norm_eps"):
      value = getattr(self, field)
      if value is not None and not value > 0:
        bad(field, "must be > 0 (None for the two per-norm fields means: use norm_eps)")

  @property
  def num_heads(self) -> int:
    """H = (N - 1) * K hash heads per layer."""
    return (self.max_ngram - 1) * self.heads_per_order

  @property
  def gate_eps(self) -> float:
    """Epsilon of RMSNorm(h) and RMSNorm(k) in the gate."""
    return self.norm_eps if self.gate_norm_eps is None else self.gate_norm_eps

  @property
  def conv_eps(self) -> float:
    """Epsilon of the short conv's RMSNorm."""
    return self.norm_eps if self.conv_norm_eps is None else self.conv_norm_eps

  @property
  def memory_width(self) -> int:
    """Width of the concatenated retrieved vector e_t."""
    return self.num_heads * self.head_dim


# The official demo's layer options: nn.Linear biases on W_V and W_K, torch RMSNorm's default epsilon (float32
# machine epsilon for float32 activations) in the gate norms, 1e-5 in the conv norms, and its int64 hash.
# Use as dataclasses.replace(config, **DEMO_LAYER_OPTIONS).
DEMO_LAYER_OPTIONS = {"projection_bias": True, "gate_norm_eps": float(np.finfo(np.float32).eps),
                      "conv_norm_eps": 1e-5, "hash_bits": 64}
