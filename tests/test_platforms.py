"""A CPU-only machine starts quietly: JAX defaults to CPU without accelerator plugins (an explicit JAX_PLATFORMS
wins), and TensorFlow's CUDA-probe lines are dropped while other stderr lines pass through."""

import os
import subprocess
import sys

import pytest

from engram_jax import platforms

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE_WORDS = ("cuda", "cuinit", "plugin", "gpu will not be used", "libtpu", "tpu backend")


def run_python(code: str, **env_changes) -> subprocess.CompletedProcess:
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "TF_CPP_MIN_LOG_LEVEL")}
  env.update(env_changes)
  return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=300)


@pytest.mark.skipif(bool(platforms.accelerator_plugins()), reason="an accelerator plugin is installed here")
def test_cpu_only_start_is_quiet_and_defaults_to_cpu():
  code = ("import engram_jax, os, jax; import engram_jax.data.tasks as t; t.tf.constant(1.0) + 1; "
          "print(os.environ['JAX_PLATFORMS'], jax.default_backend(), len(jax.devices()))")
  out = run_python(code)
  assert out.returncode == 0, out.stderr
  assert out.stdout.split()[:2] == ["cpu", "cpu"]
  noisy = [line for line in out.stderr.splitlines() if any(w in line.lower() for w in PROBE_WORDS)]
  assert noisy == [], noisy


def test_explicit_jax_platforms_is_respected():
  out = run_python("import engram_jax, os; print(repr(os.environ['JAX_PLATFORMS']))", JAX_PLATFORMS="")
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == "''"  # '' = jax's own detection, as the user asked
  out = run_python("import jax, engram_jax, os; print(os.environ.get('JAX_PLATFORMS'))")  # jax imported first
  assert out.stdout.strip() == "None"


def test_probe_noise_is_dropped_and_other_lines_kept():
  code = ("import os; from engram_jax import platforms\n"
          "with platforms.probe_noise_filtered():\n"
          "  os.write(2, b'I0000 cudart_stub.cc:31] Could not find cuda drivers\\n')\n"
          "  os.write(2, b'E0000 cuda_platform.cc:52] failed call to cuInit\\n')\n"
          "  os.write(2, b'a real warning\\n')\n"
          "os.write(2, b'after the block\\n')\n")
  out = run_python(code, JAX_PLATFORMS="cpu")
  assert out.returncode == 0, out.stderr
  assert out.stderr.splitlines() == ["a real warning", "after the block"]
  out = run_python(code, JAX_PLATFORMS="")  # JAX may use an accelerator: nothing is filtered
  assert len(out.stderr.splitlines()) == 4
