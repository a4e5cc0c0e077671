"""EngramConfig: the hyper-parameters of one conditional-memory module (arXiv 2601.07372, section 2)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class EngramConfig:
  """Shape of the Engram module; the defaults follow the paper and its demo at small scale."""

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
