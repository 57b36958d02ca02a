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


TRAIN_ARGS = ['--config=configs/toy2d_sct.py', '--config.model.width=32', '--config.model.depth=1',
              '--config.model.time_embed_dim=16', '--config.model.logvar_channels=16',
              '--config.train.batch_size=16', '--config.train.num_steps=6',
              '--config.train.log_every=3', '--config.train.ckpt_every=3',
              '--config.train.sample_every=0', '--config.train.progress_bar=False',
              '--config.data.prefetch=0', '--config.data.num_train=512']


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


@pytest.mark.slow  # three CLI runs with their compiles: ~2-4 min on 2 busy cores
def test_two_processes_train_in_lockstep_like_one_process(tmp_path):
  """launch/local.sh with NPROC=2: 2 processes x 1 CPU device (gloo collectives, each
  loading half of every batch, one shared workdir) end with the same TrainState as
  1 process x 2 devices."""
  multi, single = str(tmp_path / 'multi'), str(tmp_path / 'single')
  env = dict(helpers.env(devices=1), NPROC='2', PORT=str(_free_port()), PYTHON=sys.executable)
  p = subprocess.run(['bash', os.path.join(helpers.REPO, 'launch', 'local.sh'),
                      f'--workdir={multi}', *TRAIN_ARGS, '--config.distributed.timeout_s=120'],
                     cwd=helpers.REPO, env=env, capture_output=True, text=True, timeout=900)
  assert p.returncode == 0, p.stdout + p.stderr
  helpers.run_module('scm_jax.train', f'--workdir={single}', *TRAIN_ARGS, devices=2)

  from scm_jax.train.experiment import load_experiment
  (_, a), (_, b) = load_experiment(multi), load_experiment(single)
  assert int(a.step) == int(b.step) == 6
  for x, y in zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
  # Only process 0 logs: one line per log step, identical to the single process's.
  logs = [json.loads(l) for l in open(os.path.join(multi, 'metrics.jsonl'))]
  ref = [json.loads(l) for l in open(os.path.join(single, 'metrics.jsonl'))]
  assert [l['step'] for l in logs] == [3, 6]
  np.testing.assert_allclose([l['loss'] for l in logs], [l['loss'] for l in ref], rtol=1e-6)
  assert p.stderr.count('starting from scratch') == 1  # status lines from process 0 only
