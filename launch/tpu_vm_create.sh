#!/usr/bin/env bash
# Create a Cloud TPU VM slice for engram_jax (needs gcloud, a project with TPU quota).
#   TPU_NAME=engram ZONE=us-central2-b ACCELERATOR=v4-32 launch/tpu_vm_create.sh
# Then: launch/tpu_vm_install.sh, launch/tpu_vm_run.sh. Delete with:
#   gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE"
# DRY_RUN=1 prints the gcloud command instead of running it.
set -euo pipefail
run() { if [[ -n "${DRY_RUN:-}" ]]; then printf '%q ' "$@" | sed 's/ $//'; echo; else "$@"; fi; }
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE, e.g. us-central2-b}"
ACCELERATOR="${ACCELERATOR:-v4-8}"
RUNTIME="${RUNTIME:-tpu-ubuntu2204-base}"
run gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" --accelerator-type="$ACCELERATOR" \
  --version="$RUNTIME" ${PROJECT:+--project="$PROJECT"} ${SPOT:+--spot}
