"""Every launcher has a dry-run mode that prints the exact commands it would run, and runs none of them (a fake
gcloud / xpk on PATH records any call)."""

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TRAIN_ARGS = ["--gin_file=configs/models/engram_moe_base.gin", "--gin.MODEL_DIR='gs://bucket/run one'"]


@pytest.fixture
def env(tmp_path):
  """PATH with fake gcloud / xpk that record being called; DRY_RUN=1."""
  calls = tmp_path / "calls"
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for tool in ("gcloud", "xpk"):
    (bin_dir / tool).write_text(f"#!/bin/sh\necho {tool} \"$@\" >> {calls}\n")
    (bin_dir / tool).chmod(0o755)
  yield {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "DRY_RUN": "1", "TPU_NAME": "engram",
         "ZONE": "us-central2-b", "PROJECT": "proj"}
  assert not calls.exists(), f"a dry run called: {calls.read_text()}"


def _words(line: str) -> list[str]:
  """The arguments a shell line stands for, as bash reads them (bash's own $'..' quoting included)."""
  out = subprocess.run(["bash", "-c", 'eval "set -- $1"; printf "%s\\0" "$@"', "_", line], capture_output=True,
                       text=True, check=True)
  return out.stdout.split("\0")[:-1]


def _run(cmd, env):
  out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
  assert out.returncode == 0, out.stderr
  return [_words(line) for line in out.stdout.strip().splitlines()]


def test_tpu_vm_scripts_print_their_gcloud_commands(env):
  (create,) = _run(["bash", "launch/tpu_vm_create.sh"], {**env, "ACCELERATOR": "v5p-32"})
  assert create == ["gcloud", "compute", "tpus", "tpu-vm", "create", "engram", "--zone=us-central2-b",
                    "--accelerator-type=v5p-32", "--version=tpu-ubuntu2204-base", "--project=proj"]
  tar, scp, ssh = _run(["bash", "launch/tpu_vm_install.sh"], env)
  assert tar[:3] == ["tar", "czf", "/tmp/engram_jax_src.tgz"] and scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm",
                                                                              "scp"]
  assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "engram"] and "--worker=all" in ssh
  assert "pip install -q -r requirements.txt" in ssh[-1]
  (run,) = _run(["bash", "launch/tpu_vm_run.sh", *TRAIN_ARGS], env)
  assert run[:9] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "engram", "--zone=us-central2-b", "--worker=all",
                     "--project=proj"]
  remote = run[-1].removeprefix("--command=")
  assert ".venv/bin/python -m engram_jax.train --distributed" in remote
  assert shlex.split(remote.split("--distributed", 1)[1].split("2>&1")[0]) == TRAIN_ARGS  # quoting survives ssh


def test_local_cpu_prints_its_command(env):
  (cmd,) = _run(["bash", "launch/local_cpu.sh", "configs/experiments/quickstart.gin", "--gin.TRAIN_STEPS=20"],
                {**env, "FAKE_DEVICES": "8", "XLA_FLAGS": "", "PYTHON": "python3"})
  assert cmd == ["env", "XLA_FLAGS= --xla_force_host_platform_device_count=8", "TF_CPP_MIN_LOG_LEVEL=2", "python3",
                 "-m", "engram_jax.train", "--gin_file=configs/experiments/quickstart.gin", "--gin.TRAIN_STEPS=20"]


def test_multiprocess_prints_one_command_per_process(env):
  lines = _run([sys.executable, "launch/multiprocess.py", "--dry_run", "--port=4321", "--num_processes=3",
                "--devices_per_process=2", "--module=engram_jax.eval", "--", "--gin.CHECKPOINT_PATH=/tmp/x"],
               {**env, "XLA_FLAGS": ""})
  assert len(lines) == 3
  for pid, cmd in enumerate(lines):
    assert cmd == ["env", "ENGRAM_COORDINATOR=127.0.0.1:4321", "ENGRAM_NUM_PROCESSES=3", f"ENGRAM_PROCESS_ID={pid}",
                   "TF_CPP_MIN_LOG_LEVEL=2", "XLA_FLAGS=--xla_force_host_platform_device_count=2", sys.executable,
                   "-m", "engram_jax.eval", "--distributed", "--gin.CHECKPOINT_PATH=/tmp/x"]


def test_gke_xpk_prints_the_workload_command(env):
  (cmd,) = _run([sys.executable, "launch/gke_xpk.py", "--dry_run", "--cluster=pod", "--workload=engram-base",
                 "--tpu_type=v5p-32", "--num_slices=2", "--project=proj", "--zone=us-east5-b",
                 "--docker_image=us-docker.pkg.dev/proj/engram:1", "--env", "JAX_LOG=1", "--", *TRAIN_ARGS], env)
  assert cmd[:-1] == ["xpk", "workload", "create", "--cluster=pod", "--workload=engram-base", "--tpu-type=v5p-32",
                      "--num-slices=2", "--project=proj", "--zone=us-east5-b",
                      "--docker-image=us-docker.pkg.dev/proj/engram:1", "--env", "JAX_LOG=1"]
  inner = shlex.split(cmd[-1].removeprefix("--command="))
  assert inner == ["TF_CPP_MIN_LOG_LEVEL=2", "python3", "-m", "engram_jax.train", "--distributed", *TRAIN_ARGS]
