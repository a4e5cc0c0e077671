"""Experiment runners of the paper (arXiv 2601.07372): importable functions plus a gin entry point each."""
