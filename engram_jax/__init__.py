"""engram_jax: conditional memory (Engram, arXiv 2601.07372) beside Mixture-of-Experts, in JAX/Flax NNX."""

from engram_jax import platforms as _platforms

_platforms.default_to_cpu()  # CPU-only machine and JAX_PLATFORMS unset: JAX_PLATFORMS=cpu (no CUDA-probe errors)

__version__ = "0.1.0"
