"""Table shapes do not depend on the mesh: a checkpoint saved on 1 device loads on meshes of 2, 8 and 12 devices
(12 when the table's row count allows it; otherwise the error names the sizes that work, before compiling)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def load_on_meshes(tmp_path, multiple: int) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=12")
  out = subprocess.run([sys.executable, os.path.join(HERE, "mesh_portability_run.py"), str(tmp_path / "run"),
                        str(multiple)], env=env, cwd=os.path.dirname(HERE), capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  return {int(k) if k.isdigit() else k: v for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}


def assert_same_model(results: dict, sizes) -> None:
  reference = np.asarray(results[1]["logits"])
  for n in sizes:
    assert results[n]["rows"] == results[1]["rows"]
    assert results[n]["row_shard"] * n == results[n]["rows"]  # rows split over all n devices
    np.testing.assert_allclose(np.asarray(results[n]["logits"]), reference, rtol=2e-5, atol=2e-5)


def test_checkpoint_from_one_device_loads_on_2_and_8_and_names_the_sizes_that_work_on_12(tmp_path):
  results = load_on_meshes(tmp_path, multiple=1024)  # the default EngramConfig.table_row_multiple
  assert results[1]["rows"] == 1024  # 928 hashed rows of the tiny model's layer, padded to 1024
  assert_same_model(results, (2, 8))
  error = results[12]["error"]
  assert "1024 rows" in error and "12 shards" in error and "1, 2, 4, 8, 16, 32, 64, 128" in error
  assert "table_row_multiple a multiple of 12 (e.g. 3072)" in error
  assert results[12]["seconds"] < 5  # raised while checking the config: nothing was compiled or restored
  stale = results["stale"]  # the record says 2048 rows, the checkpoint holds 1024
  assert stale["type"] == "ValueError" and "(1024, 8)" in stale["error"] and "(2048, 8)" in stale["error"]
  assert "other shapes than this model" in stale["error"] and "Nothing was moved" in stale["error"]


@pytest.mark.slow
def test_a_row_count_divisible_by_12_loads_on_all_four_meshes(tmp_path):
  results = load_on_meshes(tmp_path, multiple=3072)
  assert results[1]["rows"] == 3072
  assert_same_model(results, (2, 8, 12))
