"""Quiet start on CPU-only machines: JAX defaults to the CPU backend when no accelerator plugin is installed, and
TensorFlow's failed CUDA probe (it only feeds tf.data here) is kept off the console.

Run at `import engram_jax`, before jax is imported. An explicit JAX_PLATFORMS is always respected.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import contextlib
import os
import sys
import tempfile

# TensorFlow's import-time lines on a machine without CUDA: the driver probe, absl's pre-init notice, CPU features.
TF_PROBE_NOISE = ("cudart_stub.cc", "cuda_platform.cc", "cuda_executor.cc", "cuda_diagnostics.cc",
                  "All log messages before absl::InitializeLog()", "cpu_feature_guard.cc",
                  "To enable the following instructions", "failed call to cuInit")

def accelerator_plugins() -> list[str]:
  """Installed JAX accelerator backends: PJRT plugins (jax_plugins entry points or namespace modules, e.g. the CUDA
  or ROCm plugins) and libtpu."""
  found = [f"entry point {e.name}" for e in importlib.metadata.entry_points(group="jax_plugins")]
  if importlib.util.find_spec("jax_plugins") is not None:
    found.append("jax_plugins package")
  for name in ("libtpu", "libtpu_nightly"):
    if importlib.util.find_spec(name) is not None:
      found.append(name)
  return found


def default_to_cpu() -> bool:
  """Sets JAX_PLATFORMS=cpu when the user has not set it and no accelerator plugin is installed; returns whether it
  did. (Without this jax probes for CUDA/TPU backends and TensorFlow for CUDA drivers, printing errors.)"""
  if "JAX_PLATFORMS" in os.environ or "jax" in sys.modules:  # jax reads JAX_PLATFORMS when it is imported
    return False
  if accelerator_plugins():
    return False
  os.environ["JAX_PLATFORMS"] = "cpu"
  return True


def cpu_only() -> bool:
  """JAX runs on the CPU only (the user or this module set JAX_PLATFORMS=cpu)."""
  return os.environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu"


@contextlib.contextmanager
def probe_noise_filtered():
  """Drops TensorFlow's CUDA-probe lines (TF_PROBE_NOISE) from stderr inside the block when JAX is CPU-only; other
  lines are kept. TensorFlow writes them from C++ straight to file descriptor 2, so that descriptor is captured."""
  if not cpu_only():
    yield
    return
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as capture:
    os.dup2(capture.fileno(), 2)
    try:
      yield
    finally:
      os.dup2(saved, 2)
      os.close(saved)
      capture.seek(0)
      kept = [line for line in capture.read().decode(errors="replace").splitlines(keepends=True)
              if not any(noise in line for noise in TF_PROBE_NOISE)]
      if kept:
        sys.stderr.write("".join(kept))
        sys.stderr.flush()


def import_tensorflow():
  """`import tensorflow` and TensorFlow's device initialisation (kept off accelerators: JAX owns them), with the
  CUDA-probe lines filtered as in probe_noise_filtered."""
  with probe_noise_filtered():
    import tensorflow as tf
    try:
      tf.config.set_visible_devices([], "GPU")  # initialises TF's devices (the cuInit probe) once, here
    except RuntimeError:  # devices already initialised (then they were set before, or TF found none)
      pass
  return tf
