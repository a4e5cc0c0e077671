"""engram_jax: conditional memory (Engram, arXiv 2601.07372) beside Mixture-of-Experts, in JAX/Flax NNX."""

__version__ = "0.1.0"
