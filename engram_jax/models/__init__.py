"""Decoder language models composed from engram_jax.layers."""
