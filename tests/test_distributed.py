"""Multi-host start-up (scm_jax/infra/distributed.py) and a 2-process training run on localhost."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from scm_jax.infra import distributed
from scm_jax.errors import ConfigError
from tests import helpers


def _cfg(**kw):
  c = distributed.default_distributed_config()
  c.update(kw)
  return c


SLURM_ENV = {'SLURM_JOB_ID': '4242', 'SLURM_STEP_NODELIST': 'gpu[001-004]', 'SLURM_NTASKS': '32',
             'SLURM_PROCID': '9', 'SLURM_LOCALID': '1'}


def test_mode_detection_and_initialize_arguments():
  assert distributed.initialize_kwargs(_cfg(), {}) is None
  assert distributed.detect_mode(SLURM_ENV) == 'slurm'
  assert distributed.detect_mode(dict(SLURM_ENV, SLURM_NTASKS='1')) == 'none'
  assert distributed.detect_mode({'TPU_WORKER_HOSTNAMES': 'a,b,c,d'}) == 'tpu'
  assert distributed.detect_mode({'TPU_WORKER_HOSTNAMES': 'a'}) == 'none'
  kw = distributed.initialize_kwargs(_cfg(local_device_ids='0,1,2,3'), SLURM_ENV)
  assert kw['cluster_detection_method'] == 'slurm' and kw['local_device_ids'] == [0, 1, 2, 3]
  env = {'SCM_JAX_COORDINATOR': 'node0:1234', 'SCM_JAX_NUM_PROCESSES': '4',
         'SCM_JAX_PROCESS_ID': '3'}
  kw = distributed.initialize_kwargs(_cfg(), env)
  assert (kw['coordinator_address'], kw['num_processes'], kw['process_id']) == ('node0:1234', 4, 3)
  assert kw['heartbeat_timeout_seconds'] == 10  # a lost process is noticed within 10 s
  assert distributed.initialize_kwargs(_cfg(peer_timeout_s=25), env)[
      'heartbeat_timeout_seconds'] == 25
  for bad in (1, 0, -5):  # (ml_collections keeps it an int)
    with pytest.raises(ConfigError, match='peer_timeout_s'):
      distributed.initialize_kwargs(_cfg(peer_timeout_s=bad), env)
  kw = distributed.initialize_kwargs(_cfg(mode='explicit', process_id=0), env)
  assert kw['process_id'] == 0  # the config wins over the environment
  with pytest.raises(ConfigError, match='num_processes, process_id'):
    distributed.initialize_kwargs(_cfg(mode='explicit', coordinator_address='h:1'), {})
  with pytest.raises(ConfigError, match='must be < num_processes'):
    distributed.initialize_kwargs(_cfg(mode='explicit'), dict(env, SCM_JAX_PROCESS_ID='4'))
  with pytest.raises(ConfigError, match='mode'):
    distributed.initialize_kwargs(_cfg(mode='mpi'), {})
  with pytest.raises(ConfigError, match='device ids'):
    distributed.initialize_kwargs(_cfg(local_device_ids='0;1'), SLURM_ENV)


STEPS = 6
TRAIN_ARGS = ['--config=configs/toy2d_sct.py', '--config.model.width=32', '--config.model.depth=1',
              '--config.model.time_embed_dim=16', '--config.model.logvar_channels=16',
              '--config.train.batch_size=16', f'--config.train.num_steps={STEPS}',
              '--config.train.log_every=1', '--config.train.ckpt_every=3',
              '--config.train.sample_every=0', '--config.train.progress_bar=False',
              '--config.data.prefetch=0', '--config.data.num_train=512']

# One process, 2 devices: the training steps of a P-process job's workdir config on the
# global batches that job saw, process i's stream (data/pipeline.py) giving rows
# [i B/P, (i+1) B/P) of each. `order` = which process's rows fill each slot: (1, 0)
# feeds the halves swapped, a placement error the comparison must catch.
REPLAY = """
import jax
import numpy as np
from scm_jax import data as data_lib
from scm_jax.train import workdir as workdir_lib
from scm_jax.train.experiment import Experiment

c = workdir_lib.load_config(WORKDIR)
exp = Experiment(c)
assert jax.process_count() == 1 and jax.device_count() == NPROC


def replay(order):
  order = list(order)
  streams = [data_lib.make_stream(exp.source, c.train.batch_size, c.seed, process_index=i,
                                  process_count=NPROC, worker_count=c.data.worker_count,
                                  prefetch=0) for i in range(NPROC)]
  state, losses = exp.init_state(), []
  for _ in range(STEPS):
    rows = [next(s) for s in streams]
    batch = {k: np.concatenate([rows[i][k] for i in order]) for k in rows[0]}
    state, metrics = exp.step(state, batch)
    losses.append(float(metrics['loss']))
  return jax.device_get(state), losses


state, losses = replay(range(NPROC))
_, swapped = replay(reversed(range(NPROC)))
leaves = {f'leaf_{i}': np.asarray(x) for i, x in enumerate(jax.tree.leaves(state))}
np.savez(OUT, losses=losses, swapped=swapped, **leaves)
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


@pytest.mark.slow  # a 2-process CLI job and a 2-device replay with their compiles: ~35 s
def test_two_processes_train_in_lockstep_like_one_process(tmp_path):
  """launch/local.sh with NPROC=2 (2 processes x 1 CPU device, gloo collectives, each
  loading its rows of every batch, one shared workdir) computes what 1 process x 2
  devices computes on the same global batches: the same loss at every step and the same
  checkpointed TrainState. The data order depends on the process count, so the one
  process replays the job's global batches (REPLAY) instead of training on its own."""
  multi = str(tmp_path / 'multi')
  env = dict(helpers.env(devices=1), NPROC='2', PORT=str(_free_port()), PYTHON=sys.executable)
  p = subprocess.run(['bash', os.path.join(helpers.REPO, 'launch', 'local.sh'),
                      f'--workdir={multi}', *TRAIN_ARGS, '--config.distributed.timeout_s=120'],
                     cwd=helpers.REPO, env=env, capture_output=True, text=True, timeout=900)
  assert p.returncode == 0, p.stdout + p.stderr
  out = str(tmp_path / 'replay.npz')
  helpers.run_python(f'WORKDIR, OUT, NPROC, STEPS = {multi!r}, {out!r}, 2, {STEPS}\n' + REPLAY,
                     devices=2)
  ref = np.load(out)

  from scm_jax.train.experiment import load_experiment
  _, state = load_experiment(multi)
  assert int(state.step) == STEPS
  leaves = jax.tree.leaves(jax.device_get(state))
  assert len(leaves) == len([k for k in ref.files if k.startswith('leaf_')])
  for i, x in enumerate(leaves):
    np.testing.assert_allclose(x, ref[f'leaf_{i}'], rtol=1e-6, atol=1e-7)
  # Only process 0 logs: one row per step (log_every=1), the replay's loss.
  logs = [json.loads(l) for l in open(os.path.join(multi, 'metrics.jsonl'))]
  assert [l['step'] for l in logs] == list(range(1, STEPS + 1))
  np.testing.assert_allclose([l['loss'] for l in logs], ref['losses'], rtol=1e-6)
  assert p.stderr.count('starting from scratch') == 1  # status lines from process 0 only
  # The comparison sees row placement: with the halves swapped, step 1 (same initial
  # state, same rows) already has another loss.
  assert abs(ref['swapped'][0] / ref['losses'][0] - 1) > 1e-3, (ref['swapped'], ref['losses'])
