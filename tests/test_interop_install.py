"""`pip install` as another project would: a wheel built from pyproject.toml, installed into a fresh venv with the
core dependencies only (jax, flax, numpy and what they pull in), runs the docs' Engram example. Slow: it builds a
wheel and downloads jax/flax into the new venv (needs the package registry)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CHECK_CORE = """
import importlib.util, sys
heavy = [m for m in ("tensorflow", "seqio", "gin", "sentencepiece", "tokenizers", "matplotlib") if importlib.util.find_spec(m)]
assert not heavy, f"core install pulled in {heavy}"
import engram_jax, engram_jax.layers.engram, engram_jax.models.decoder, engram_jax.linen, engram_jax.interop
assert "tensorflow" not in sys.modules
print("core-ok", engram_jax.__version__, engram_jax.__file__)
"""


def _run(cmd, **kw):
  out = subprocess.run(cmd, capture_output=True, text=True, **kw)
  assert out.returncode == 0, f"{cmd} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
  return out.stdout


@pytest.mark.slow
def test_wheel_installs_with_core_deps_and_runs_the_docs_example(tmp_path):
  wheels = tmp_path / "wheels"
  _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels),
        str(ROOT)], cwd=tmp_path)
  (wheel,) = wheels.glob("engram_jax-*.whl")
  venv = tmp_path / "venv"
  _run([sys.executable, "-m", "venv", str(venv)])
  py = str(venv / "bin" / "python")
  _run([py, "-m", "pip", "install", "-q", str(wheel)], cwd=tmp_path)
  out = _run([py, "-c", CHECK_CORE], cwd=tmp_path)  # cwd outside the repo: the installed copy is imported
  assert "core-ok" in out and str(venv) in out
  text = (ROOT / "docs" / "engram_layer.md").read_text()
  example = tmp_path / "example.py"
  example.write_text("\n".join(re.findall(r"```python\n(.*?)```", text, flags=re.S)))
  out = _run([py, str(example)], cwd=tmp_path)
  first, last = map(float, re.search(r"loss ([\d.]+) -> ([\d.]+)", out).groups())
  assert last < first
