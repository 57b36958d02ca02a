#!/usr/bin/env bash
# Train on this machine: one process (all local GPUs/TPU chips), or NPROC processes on
# localhost joined by jax.distributed (to try multi-host code on one box, e.g. on CPU).
#
#   launch/local.sh --config=configs/digits_sct.py --workdir=runs/digits
#   JAX_PLATFORMS=cpu NPROC=2 launch/local.sh --config=configs/toy2d_sct.py --workdir=runs/toy2p
#
# Env: NPROC (default 1), PORT (coordinator port, default: a free one), PYTHON. Extra
# arguments go to `python -m scm_jax.train`. If one process fails, the others are
# stopped and the script exits non-zero. Needs the package installed (`pip install -e .`).
set -euo pipefail
NPROC="${NPROC:-1}"
PYTHON="${PYTHON:-python}"

if [[ "$NPROC" -le 1 ]]; then
  exec "$PYTHON" -m scm_jax.train "$@" --config.distributed.mode=none
fi

PORT="${PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')}"
pids=()
for ((i = 0; i < NPROC; i++)); do
  SCM_JAX_COORDINATOR="localhost:$PORT" SCM_JAX_NUM_PROCESSES="$NPROC" SCM_JAX_PROCESS_ID="$i" \
    "$PYTHON" -m scm_jax.train "$@" --config.distributed.mode=explicit &
  pids+=("$!")
done
status=0
for _ in "${pids[@]}"; do
  if ! wait -n; then
    status=1
    kill "${pids[@]}" 2>/dev/null || true  # the others would wait for the dead one
  fi
done
exit "$status"
