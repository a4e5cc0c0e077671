#!/usr/bin/env bash
# Train on this machine's CPU: python -m engram_jax.train with the repo's venv.
#   launch/local_cpu.sh                                    # the quickstart (~10 min on 2 cores)
#   launch/local_cpu.sh configs/experiments/quickstart.gin --gin.TRAIN_STEPS=20   # smoke mode
#   FAKE_DEVICES=8 launch/local_cpu.sh ... --gin.RunConfig.mesh="'data=2,expert=4'"   # try a mesh on fake devices
set -euo pipefail
cd "$(dirname "$0")/.."
GIN_FILE="${1:-configs/experiments/quickstart.gin}"
shift || true
PY="${PYTHON:-.venv/bin/python}"
if [[ -n "${FAKE_DEVICES:-}" ]]; then
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${FAKE_DEVICES}"
fi
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
exec "$PY" -m engram_jax.train --gin_file="$GIN_FILE" "$@"
