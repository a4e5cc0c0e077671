"""Runs an engram_jax entry point on a GKE cluster of TPU slices through xpk (`pip install xpk`), as MaxText does.

    python launch/gke_xpk.py --cluster=my-cluster --project=my-project --zone=us-east5-b --tpu_type=v5p-32 \
        --workload=engram-base --base_docker_image=us-docker.pkg.dev/my-project/engram/base:latest -- \
        --gin_file=configs/models/engram_moe_base.gin --gin_file=configs/runs/pretrain.gin \
        --gin.MODEL_DIR="'gs://my-bucket/engram_moe_base'" --gin.TRAIN_STEPS=20000 \
        --gin.MIXTURE_OR_TASK_NAME="'c4_en_pretrain'" --gin.RunConfig.mesh="'data=-1,expert=8'"

xpk builds an image from --base_docker_image with this repository copied in (--script_dir, default: the repo),
or runs a prebuilt --docker_image, and starts one JAX process per host of every slice; each runs
`python -m ENTRY --distributed ARGS` (jax.distributed.initialize detects the slice). MODEL_DIR and data should be
gs:// paths every host reaches. --dry_run prints the exact command instead of running it.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def entry_command(entry: str, args: list[str]) -> str:
  """The shell command every host runs."""
  return " ".join(["TF_CPP_MIN_LOG_LEVEL=2", "python3", "-m", entry, "--distributed", *map(shlex.quote, args)])


def xpk_command(opts: argparse.Namespace, args: list[str]) -> list[str]:
  """The `xpk workload create` argument vector."""
  cmd = ["xpk", "workload", "create", f"--cluster={opts.cluster}", f"--workload={opts.workload}",
         f"--tpu-type={opts.tpu_type}", f"--num-slices={opts.num_slices}"]
  if opts.project:
    cmd.append(f"--project={opts.project}")
  if opts.zone:
    cmd.append(f"--zone={opts.zone}")
  if opts.docker_image:
    cmd.append(f"--docker-image={opts.docker_image}")
  else:
    cmd += [f"--base-docker-image={opts.base_docker_image}", f"--script-dir={opts.script_dir}"]
  for env in opts.env:
    cmd += ["--env", env]
  return cmd + [f"--command={entry_command(opts.entry, args)}"]


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python launch/gke_xpk.py", description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog="Arguments after -- go to the entry point (see python -m engram_jax.train "
                                     "--help).")
  p.add_argument("--cluster", required=True, help="GKE cluster made by `xpk cluster create`")
  p.add_argument("--workload", required=True, help="workload name (lowercase, digits, dashes)")
  p.add_argument("--tpu_type", required=True, help="e.g. v5p-32, v5litepod-16, v6e-256")
  p.add_argument("--num_slices", type=int, default=1)
  p.add_argument("--project", default=None)
  p.add_argument("--zone", default=None)
  image = p.add_mutually_exclusive_group(required=True)
  image.add_argument("--docker_image", help="a prebuilt image with engram_jax and its requirements installed")
  image.add_argument("--base_docker_image", help="an image with the requirements; xpk adds --script_dir to it")
  p.add_argument("--script_dir", default=str(REPO), help="directory copied into the image (default: this repo)")
  p.add_argument("--entry", default="engram_jax.train", help="engram_jax.train, engram_jax.eval, ...")
  p.add_argument("--env", action="append", default=[], help="KEY=VALUE for every host (repeatable)")
  p.add_argument("--dry_run", action="store_true", help="print the command, run nothing")
  p.add_argument("args", nargs=argparse.REMAINDER, help="after --: the entry point's flags")
  opts = p.parse_args(argv)
  args = opts.args[1:] if opts.args[:1] == ["--"] else opts.args
  cmd = xpk_command(opts, args)
  if opts.dry_run:
    print(shlex.join(cmd))
    return 0
  return subprocess.call(cmd)


if __name__ == "__main__":
  sys.exit(main())
