"""ModelConfig: one frozen record describing a decoder LM with optional MoE FFNs and Engram layers."""

from __future__ import annotations

import dataclasses

from engram_jax.layers.engram_config import EngramConfig
from engram_jax.layers.moe_config import MoEConfig


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Decoder-only LM: embed -> blocks [Engram? -> attention -> FFN or MoE] -> norm -> LM head."""

  vocab_size: int = 8192
  d_model: int = 256
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: int = 2  # Grouped-query attention: num_heads must be a multiple.
  head_dim: int = 64
  rope_theta: float = 10_000.0
  dense_hidden: int = 1024  # SwiGLU width of the dense FFN layers.
  num_dense_layers: int = 1  # Leading layers with a dense FFN (DeepSeek keeps the first one dense); all if moe is None.
  moe: MoEConfig | None = None  # None: a dense model.
  engram_layers: tuple[int, ...] = ()  # 0-based block indices that get an Engram module before attention.
  engram: EngramConfig | None = None  # Required when engram_layers is non-empty.
  hc_expansion: int = 1  # G hyper-connection branches (arXiv 2409.19606); 1 = plain residual stream.
  hc_variant: str = "hc"  # 'hc' (dynamic hyper-connections) or 'mhc' (manifold-constrained, doubly-stochastic mixing).
  hc_sinkhorn_iters: int = 20  # Only for 'mhc': Sinkhorn row/column normalisations of the residual mixing matrix.
  norm_eps: float = 1e-6
  compute_dtype: str = "float32"  # 'float32' or 'bfloat16' for activations and matmuls; params stay float32.
  tie_embeddings: bool = False
  remat: bool = False  # Rematerialise each block in the backward pass.
