#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: runs the same command on every worker VM, where
# jax.distributed.initialize() finds the other workers by itself (distributed.mode=tpu).
#
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a launch/tpu_pod.sh \
#       --config=configs/imagenet512_scd.py:xxl --workdir=gs://my-bucket/runs/in512_xxl
#
# Env: TPU_NAME, ZONE (required), PROJECT (optional), REMOTE_REPO (the checkout on the
# workers, default ~/scm-jax), PYTHON (default python3). Every worker needs the repo and
# `pip install -r requirements.txt -e . "jax[tpu]"`; --workdir must be shared (a GCS bucket).
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
REMOTE_REPO="${REMOTE_REPO:-~/scm-jax}"
PYTHON="${PYTHON:-python3}"
ARGS="$(printf '%q ' "$@")"
CMD="cd $REMOTE_REPO && $PYTHON -m scm_jax.train $ARGS --config.distributed.mode=tpu"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" ${PROJECT:+--project "$PROJECT"} \
  --worker=all --command "$CMD"
