"""Train step, sharding, checkpoint resume and the training loop end to end."""

import os

import jax
import numpy as np

from configs import digits_sct
from scm_jax.train.experiment import Experiment, load_experiment
from scm_jax.train.loop import train_and_evaluate
from scm_jax.train import state as state_lib
from tests import helpers


def tiny_digits_config():
  c = digits_sct.get_config()
  c.model.channels = 8
  c.model.num_heads = 1
  c.model.time_embed_dim = 32
  c.model.logvar_channels = 16
  c.train.batch_size = 16
  c.train.log_every = 5
  c.train.sample_every = 0
  c.train.progress_bar = False
  c.data.prefetch = 0
  c.sample.num = 8
  return c


def test_sharded_fsdp_step_equals_single_device():
  """data=4 x fsdp=2 on 8 CPU devices vs one device: same loss, same updated state."""
  helpers.run_python('''
      import jax
      from tests import helpers
      from tests.test_train import tiny_digits_config
      from scm_jax.train.experiment import Experiment
      assert jax.device_count() == 8
      c8 = tiny_digits_config()
      c8.sharding.strategy = 'fsdp'
      c8.sharding.fsdp_min_size = 64
      c8.mesh.data, c8.mesh.fsdp = 4, 2
      c1 = tiny_digits_config()
      c1.mesh.data, c1.mesh.fsdp = 1, 1
      e8, e1 = Experiment(c8), Experiment(c1, devices=jax.devices()[:1])
      specs = [s.spec for s in jax.tree.leaves(e8.state_shardings)]
      assert any('fsdp' in tuple(sp) for sp in specs), 'nothing was sharded'
      m8 = helpers.assert_same_steps(e8, e1, 3)
      print('OK', float(m8['loss']))
  ''', devices=8)


def _train_cli(workdir, steps, *extra):
  return helpers.run_module(
      'scm_jax.train', '--config=configs/digits_sct.py', f'--workdir={workdir}',
      '--config.model.channels=8', '--config.model.num_heads=1', '--config.model.time_embed_dim=32',
      '--config.train.batch_size=16', '--config.train.sample_every=0',
      '--config.train.log_every=5', '--config.train.ckpt_every=10', '--config.data.prefetch=1',
      f'--config.train.num_steps={steps}', *extra)


def test_resume_after_process_exit_is_bit_exact(tmp_path):
  straight, resumed = str(tmp_path / 'straight'), str(tmp_path / 'resumed')
  _train_cli(straight, 20)
  _train_cli(resumed, 10)
  _train_cli(resumed, 20)
  _, a = load_experiment(straight)
  _, b = load_experiment(resumed)
  assert int(a.step) == int(b.step) == 20
  leaves_a, leaves_b = jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))
  assert len(leaves_a) == len(leaves_b)
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(x, y)
  lines = open(os.path.join(resumed, 'metrics.jsonl')).read().splitlines()
  assert len(lines) == 4  # steps 5, 10 (first run) and 15, 20 (resumed run)


def test_digits_sct_short_schedule_and_sample_cli(tmp_path):
  workdir = str(tmp_path / 'digits')
  c = tiny_digits_config()
  c.train.num_steps = 30
  c.train.ckpt_every = 30
  c.train.sample_every = 30
  state = train_and_evaluate(c, workdir).state
  assert int(state.step) == 30
  import json
  logs = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert all(np.isfinite(l['loss']) for l in logs) and logs[-1]['skipped'] == 0
  assert any(k.startswith('mse_by_t/') for k in logs[-1])
  assert os.path.exists(os.path.join(workdir, 'samples', 'samples_2step_00000030.png'))
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(os.path.join(workdir, 'tb')))
  out = str(tmp_path / 'grid')
  p = helpers.run_module('scm_jax.sample', f'--workdir={workdir}', '--steps=2', '--num=16',
                         f'--out={out}')
  assert 'wrote' in p.stdout
  x = np.load(out + '.npz')['x']
  assert x.shape == (16, 8, 8, 1) and np.all(np.isfinite(x))
  assert np.abs(x).max() < 3.0
  assert os.path.exists(out + '.png')


def test_nonfinite_steps_are_skipped_and_counted():
  c = tiny_digits_config()
  exp = Experiment(c)
  state = exp.init_state()
  batch = next(exp.data_stream(prefetch=0))
  bad = dict(batch, x=np.full_like(batch['x'], np.nan))
  new, m = exp.step(state, bad)
  assert float(m['skipped']) == 1.0 and int(new.nonfinite_streak) == 1
  for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(exp.init_state().params)):
    np.testing.assert_array_equal(a, b)
  new, m = exp.step(new, batch)
  assert float(m['skipped']) == 0.0 and int(new.nonfinite_streak) == 0
  assert int(new.nonfinite_total) == 1 and int(new.step) == 2


def test_power_ema_gamma_matches_edm2():
  # The defining identity sigma_rel^2 = (g + 1) / ((g + 2)^2 (g + 3)) (EDM2, eq. 3).
  for s in (0.05, 0.1, 0.2):
    g = state_lib.power_ema_gamma(s)
    assert np.isclose(np.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3))), s, rtol=1e-6)
