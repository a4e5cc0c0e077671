#!/usr/bin/env bash
# Copy this repository to every worker of a TPU VM slice and install it (Python 3.12 venv, pinned requirements,
# jax with the TPU runtime). Re-run after code changes (it re-copies the tree; the venv is kept).
#   TPU_NAME=engram ZONE=us-central2-b launch/tpu_vm_install.sh
# DRY_RUN=1 prints the commands instead of running them.
set -euo pipefail
run() { if [[ -n "${DRY_RUN:-}" ]]; then printf '%q ' "$@" | sed 's/ $//'; echo; else "$@"; fi; }
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
REMOTE_DIR="${REMOTE_DIR:-engram_jax}"
cd "$(dirname "$0")/.."
run tar czf /tmp/engram_jax_src.tgz --exclude=.venv --exclude=.git --exclude='__pycache__' .
run gcloud compute tpus tpu-vm scp /tmp/engram_jax_src.tgz "$TPU_NAME":/tmp/ --zone="$ZONE" --worker=all \
  ${PROJECT:+--project="$PROJECT"}
run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all ${PROJECT:+--project="$PROJECT"} --command="
  set -e
  mkdir -p ~/$REMOTE_DIR && tar xzf /tmp/engram_jax_src.tgz -C ~/$REMOTE_DIR && cd ~/$REMOTE_DIR
  command -v python3.12 >/dev/null || (sudo apt-get update -q && sudo apt-get install -yq python3.12 python3.12-venv)
  [ -d .venv ] || python3.12 -m venv .venv
  .venv/bin/pip install -q -r requirements.txt
  .venv/bin/pip install -q \"jax[tpu]==\$(.venv/bin/python -c 'import jax; print(jax.__version__)')\" \
    -f https://storage.googleapis.com/jax-releases/libtpu_releases.html
  .venv/bin/python -c 'import jax; print(jax.process_index(), jax.local_device_count(), jax.device_count())'
"
