#!/usr/bin/env bash
# Multi-node training on a SLURM cluster of A100/H100 nodes.
#
#   sbatch --nodes=4 launch/slurm.sh --config=configs/imagenet512_scd.py:xxl \
#       --workdir=/shared/runs/in512_xxl --config.data.path=/shared/data/in512_{split}.npy
#
# Two layouts, chosen by the task count:
#   one process per GPU (default below: --ntasks-per-node = GPUs per node): each task
#     uses GPU $SLURM_LOCALID (SCM_JAX_LOCAL_DEVICE_IDS);
#   one process per node (sbatch --ntasks-per-node=1): each task uses all its GPUs.
# The coordinator is process 0 on the first node of the job; every process gets
# SCM_JAX_COORDINATOR / SCM_JAX_NUM_PROCESSES / SCM_JAX_PROCESS_ID (see
# scm_jax/infra/distributed.py). --workdir must be on a filesystem all nodes share
# (checkpoints are written collectively). Every node needs the package installed
# (`pip install -r requirements.txt -e .` in the environment PYTHON runs); run sbatch from
# the repository root so that relative --config paths resolve.
#SBATCH --job-name=scm_jax
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=48:00:00
#SBATCH --output=slurm-%j.out
set -euo pipefail
PYTHON="${PYTHON:-python}"
HEAD="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
PORT="${PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
export SCM_JAX_COORDINATOR="$HEAD:$PORT"
export SCM_JAX_NUM_PROCESSES="$SLURM_NTASKS"
PER_GPU=0
if [[ "$SLURM_NTASKS" -gt "$SLURM_JOB_NUM_NODES" ]]; then PER_GPU=1; fi
export PER_GPU PYTHON
echo "scm_jax: $SLURM_NTASKS processes on $SLURM_JOB_NUM_NODES nodes, coordinator $SCM_JAX_COORDINATOR, per_gpu=$PER_GPU"

srun --kill-on-bad-exit=1 bash -c '
  export SCM_JAX_PROCESS_ID="$SLURM_PROCID"
  if [[ "$PER_GPU" == 1 ]]; then export SCM_JAX_LOCAL_DEVICE_IDS="$SLURM_LOCALID"; fi
  exec "$PYTHON" -m scm_jax.train "$@" --config.distributed.mode=explicit
' scm_jax "$@"
