"""Runs N local processes of `python -m engram_jax.train --distributed ...` that form one JAX job (CPU, gloo).

    python launch/multiprocess.py --num_processes=2 -- --gin_file=configs/experiments/quickstart.gin \
        --gin.MODEL_DIR="'/tmp/mp'" --gin.TRAIN_STEPS=20

Each process gets ENGRAM_COORDINATOR / ENGRAM_NUM_PROCESSES / ENGRAM_PROCESS_ID (read by
engram_jax.cli.initialize_distributed) and --devices_per_process fake CPU devices; the global mesh spans all
processes' devices, each process feeds its own slice of the batch. This rehearses multi-host code paths (data
sharding, checkpointing, logging on process 0 only) on one machine; on Cloud TPU use launch/tpu_vm_run.sh.
Exit status: the first non-zero child status, else 0. Process 0 prints to this terminal; the others log to
MODEL_DIR-independent files under --log_dir. --dry_run prints each process's exact command (with its environment)
instead of starting it.
"""

from __future__ import annotations

import argparse
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--num_processes", type=int, default=2)
  parser.add_argument("--devices_per_process", type=int, default=1)
  parser.add_argument("--module", default="engram_jax.train", help="entry point (engram_jax.train / engram_jax.eval)")
  parser.add_argument("--log_dir", default="/tmp/engram_multiprocess_logs")
  parser.add_argument("--port", type=int, default=0, help="coordinator port on 127.0.0.1 (default: a free one)")
  parser.add_argument("--dry_run", action="store_true", help="print the commands, start nothing")
  parser.add_argument("args", nargs=argparse.REMAINDER, help="after --: the entry point's flags")
  opts = parser.parse_args(argv)
  args = opts.args[1:] if opts.args[:1] == ["--"] else opts.args
  repo = Path(__file__).resolve().parent.parent
  log_dir = Path(opts.log_dir)
  coordinator = f"127.0.0.1:{opts.port or free_port()}"
  commands = []
  for pid in range(opts.num_processes):
    env = {"ENGRAM_COORDINATOR": coordinator, "ENGRAM_NUM_PROCESSES": str(opts.num_processes),
           "ENGRAM_PROCESS_ID": str(pid), "TF_CPP_MIN_LOG_LEVEL": "2",
           "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") +
                         f" --xla_force_host_platform_device_count={opts.devices_per_process}").strip()}
    commands.append((env, [sys.executable, "-m", opts.module, "--distributed", *args]))
  if opts.dry_run:
    for env, cmd in commands:
      print(shlex.join(["env", *(f"{k}={v}" for k, v in env.items()), *cmd]))
    return 0
  log_dir.mkdir(parents=True, exist_ok=True)
  procs = []
  for pid, (env, cmd) in enumerate(commands):
    out = None if pid == 0 else open(log_dir / f"process_{pid}.log", "w")
    procs.append(subprocess.Popen(cmd, cwd=repo, env={**os.environ, **env}, stdout=out,
                                  stderr=subprocess.STDOUT if out else None))
  codes = [p.wait() for p in procs]
  bad = [c for c in codes if c]
  if bad:
    print(f"exit codes {codes}; logs of processes 1..: {log_dir}", file=sys.stderr)
  return bad[0] if bad else 0


if __name__ == "__main__":
  sys.exit(main())
