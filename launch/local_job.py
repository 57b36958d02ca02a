"""N training processes on localhost joined by jax.distributed, one Popen each.

launch/local.sh is the user's way to try multi-host code on one machine; this is the same
job for programs that must act on one process of it (fault-injection tests, the
benchmarks/peer_loss.py latency measurements): each process is started with
SCM_JAX_COORDINATOR / SCM_JAX_NUM_PROCESSES / SCM_JAX_PROCESS_ID, its stderr in its own
log file, and can be signalled alone.
"""

import os
import socket
import subprocess
import sys
from typing import Mapping, Optional, Sequence


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def start(train_args: Sequence[str], logs: Sequence[str], env: Mapping[str, str],
          cwd: Optional[str] = None, port: int = 0) -> list:
  """Starts `python -m scm_jax.train *train_args` as len(logs) processes; process i
  writes its stderr to logs[i]. Returns the Popen objects, process 0 first."""
  port = port or free_port()
  procs = []
  for i, log_path in enumerate(logs):
    proc_env = dict(env, SCM_JAX_COORDINATOR=f'localhost:{port}',
                    SCM_JAX_NUM_PROCESSES=str(len(logs)), SCM_JAX_PROCESS_ID=str(i))
    with open(log_path, 'w') as log:
      procs.append(subprocess.Popen(
          [sys.executable, '-m', 'scm_jax.train', *train_args,
           '--config.distributed.mode=explicit'],
          cwd=cwd, env=proc_env, stdout=subprocess.DEVNULL, stderr=log))
  return procs


def stop(procs) -> None:
  """Kills the processes still running (stopped ones too) and reaps all."""
  for p in procs:
    if p.poll() is None:
      p.kill()
    p.wait()
