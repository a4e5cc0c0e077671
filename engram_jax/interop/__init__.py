"""Engram weights in and out: converters between our layer's parameters and other layouts, from and to files.

  demo          the official demo's PyTorch state dict (safetensors)               save_demo / load_demo
  maxtext       MaxText's NNX Engram parameter tree (orbax directory or safetensors)  save_maxtext / load_maxtext
  deepseek_v41  a DeepSeek-V4.1-style layout: fp8 e4m3 rows with ue8m0 block scales  export_v41 / load_v41
Each also has pure in-memory functions (to_* / from_*). Loading checks every shape against the layer and names
the tensor and the expected shape on a mismatch. See docs/interop.md for what else must match (tokenizer and
compression map, seed, primes, hash width, layer options).
"""
