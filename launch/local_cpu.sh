#!/usr/bin/env bash
# Train on this machine's CPU: python -m engram_jax.train with the repo's venv.
#   launch/local_cpu.sh                                    # the quickstart (~10 min on 2 cores)
#   launch/local_cpu.sh configs/experiments/quickstart.gin --gin.TRAIN_STEPS=20   # smoke mode
#   FAKE_DEVICES=8 launch/local_cpu.sh ... --gin.RunConfig.mesh="'data=2,expert=4'"   # try a mesh on fake devices
#   DRY_RUN=1 launch/local_cpu.sh                          # print the command instead
set -euo pipefail
# DRY_RUN=1 prints each command (shell-quoted) instead of running it.
run() { if [[ -n "${DRY_RUN:-}" ]]; then printf '%q ' "$@" | sed 's/ $//'; echo; else "$@"; fi; }
cd "$(dirname "$0")/.."
GIN_FILE="${1:-configs/experiments/quickstart.gin}"
shift || true
PY="${PYTHON:-.venv/bin/python}"
if [[ -n "${FAKE_DEVICES:-}" ]]; then
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${FAKE_DEVICES}"
fi
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
run env XLA_FLAGS="${XLA_FLAGS:-}" TF_CPP_MIN_LOG_LEVEL="$TF_CPP_MIN_LOG_LEVEL" "$PY" -m engram_jax.train \
  --gin_file="$GIN_FILE" "$@"
