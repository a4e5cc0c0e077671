#!/usr/bin/env bash
# Run training on every worker of a TPU VM slice at once (one JAX process per host, jax.distributed auto-detects
# the slice). Arguments go to python -m engram_jax.train; MODEL_DIR must be a directory every host sees
# (e.g. a gcsfuse mount of a bucket at /mnt/gcs/BUCKET on all workers); process 0 writes logs, orbax all hosts.
#   TPU_NAME=engram ZONE=us-central2-b launch/tpu_vm_run.sh --gin_file=configs/models/engram_moe_base.gin \
#     --gin_file=configs/runs/pretrain.gin --gin.MODEL_DIR="'/mnt/gcs/BUCKET/engram_moe_base'" --gin.TRAIN_STEPS=20000 \
#     --gin.BATCH_SIZE=256 --gin.SEQ_LEN=1024 --gin.MIXTURE_OR_TASK_NAME="'c4_en_pretrain'" \
#     --gin.RunConfig.mesh="'data=-1,expert=8'"
# Logs: process 0's output streams here; every worker also writes ~/engram_train.log. Stop with
#   gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="pkill -f engram_jax.train"
# DRY_RUN=1 prints the gcloud command instead of running it.
set -euo pipefail
run() { if [[ -n "${DRY_RUN:-}" ]]; then printf '%q ' "$@" | sed 's/ $//'; echo; else "$@"; fi; }
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
REMOTE_DIR="${REMOTE_DIR:-engram_jax}"
ENTRY="${ENTRY:-engram_jax.train}"
ARGS=$(printf ' %q' "$@")
run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all ${PROJECT:+--project="$PROJECT"} --command="
  cd ~/$REMOTE_DIR && TF_CPP_MIN_LOG_LEVEL=2 .venv/bin/python -m $ENTRY --distributed $ARGS 2>&1 | tee ~/engram_train.log
"
