"""MoEConfig: a DeepSeek-style mixture of shared and fine-grained routed experts (DeepSeek-V3, arXiv 2412.19437)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """Shape and routing of one MoE FFN."""

  num_experts: int = 8  # Routed experts E (fine-grained: small experts, several chosen per token).
  num_shared_experts: int = 1  # Always-on experts, same width as a routed one.
  top_k: int = 2  # Routed experts per token.
  expert_hidden: int = 256  # Hidden width of each expert's SwiGLU.
  score_func: str = "sigmoid"  # 'sigmoid' (DeepSeek-V3) or 'softmax'.
  norm_topk: bool = True  # Renormalise the chosen k weights to sum to one.
  route_scale: float = 1.0  # Multiplies the routed output.
  dispatch: str = "dropless"  # 'dropless' (sort + ragged_dot, no expert parallelism) or 'capacity' (all-to-all EP).
  capacity_factor: float = 1.25  # Slots per expert = ceil(cf * tokens * k / E); overflow tokens are dropped and counted.
  # How the dropless path runs its grouped matmuls: 'blocked' (sorted rows padded into one-expert blocks, a batched
  # matmul) or 'ragged_dot' (jax.lax.ragged_dot: on CPU every expert computes every row, E times the FLOPs).
  dropless_impl: str = "blocked"
  # How the capacity path ranks assignments in each expert's queue: 'sorted' (stable sort, O(T k log T k)) or
  # 'onehot' (cumsum over a [T*k, E] one-hot, O(T k E)); identical slots, so identical outputs.
  capacity_impl: str = "sorted"
  bias_update_rate: float = 1e-3  # gamma of aux-loss-free balancing: bias += rate * sign(mean load - load).
  seq_aux_loss_coef: float = 0.0  # Sequence-wise balance loss weight (DeepSeek-V3 uses a tiny value; 0 = off).
