"""Digits classifier and metrics, sharded sample generation, and the evaluate CLI."""

import json
import os

import numpy as np
import pytest

from scm_jax.data.digits import load_digits_split
from scm_jax.errors import ConfigError
from scm_jax.evaluation import digits_classifier as dc
from scm_jax.evaluation import evaluator, generate
from tests import helpers


def test_committed_digits_classifier_is_accurate():
  variables = dc.load_classifier()
  x, y = load_digits_split('test')
  assert dc.accuracy(variables, x, y) >= 0.98


def test_digits_classifier_training_reaches_high_accuracy():
  x, y = load_digits_split('train')
  xt, yt = load_digits_split('test')
  variables = dc.train_classifier(x, y, steps=300, seed=1)
  assert dc.accuracy(variables, xt, yt) >= 0.93


def test_digits_metrics_rank_real_digits_above_noise_and_blur():
  ref, _ = load_digits_split('train')
  test_x, test_y = load_digits_split('test')
  ev = evaluator.Evaluator(['fd_digits', 'pr_digits', 'digits_cls'], ref, batch_size=100)
  real = ev.evaluate([(test_x[:150], test_y[:150]), (test_x[150:], test_y[150:])])
  rng = np.random.default_rng(0)
  noise = ev.evaluate([(rng.uniform(-1, 1, test_x.shape).astype(np.float32), test_y)])
  blurred = 0.5 * test_x + 0.5 * test_x.mean(0, keepdims=True)
  blur = ev.evaluate([(blurred, test_y)])
  assert real['num_samples'] == 300 and real['cls_accuracy'] >= 0.98
  assert real['fd_digits'] < 0.2 * blur['fd_digits'] and blur['fd_digits'] < noise['fd_digits']
  assert real['precision_digits'] > 0.8 and real['recall_digits'] > 0.8
  assert noise['precision_digits'] < 0.2
  assert real['cls_entropy'] < 0.2 and real['cls_marginal_entropy'] > 0.95 * np.log(10)
  assert noise['cls_accuracy'] < 0.3


def test_metric_names_are_checked_against_the_data():
  assert evaluator.default_metrics((8, 8, 1)) == ['fd_digits', 'pr_digits', 'digits_cls']
  assert evaluator.default_metrics((32, 32, 3)) == ['fid', 'pr']
  assert evaluator.default_metrics((2,)) == ['energy', 'swd']
  with pytest.raises(ConfigError, match='8x8x1'):
    evaluator.check_metrics(['fd_digits'], (2,))
  with pytest.raises(ConfigError, match='unknown metrics'):
    evaluator.check_metrics(['fjd'], (2,))
  with pytest.raises(ConfigError, match='Inception weights'):
    evaluator.Evaluator(['fid'], np.zeros((4, 8, 8, 3)))


def test_sharded_sample_batches_equal_single_device():
  """8 CPU devices: samples and features split over the mesh equal single-device ones."""
  helpers.run_python('''
      import jax, numpy as np
      from configs import toy2d_sct
      from scm_jax.train.experiment import Experiment
      from scm_jax.evaluation import generate
      c = toy2d_sct.get_config()
      c.model.width, c.model.depth, c.train.batch_size = 32, 2, 16
      e8, e1 = Experiment(c), Experiment(c, devices=jax.devices()[:1])
      p8, p1 = e8.init_state().params, e1.init_state().params
      s = generate.Sampler('consistency', 2)
      a = np.concatenate([x for x, _ in generate.sample_batches(e8, p8, 40, 16, s, seed=3)])
      b = np.concatenate([x for x, _ in generate.sample_batches(e1, p1, 40, 16, s, seed=3)])
      assert a.shape == (40, 2)
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
      sharded = e8._sampler(16, 'consistency', 2, 1.0, 'heun')(p8, jax.random.PRNGKey(0), None)
      assert len(sharded.sharding.device_set) == 8, sharded.sharding
      # Feature batches split over the 8 devices (20 rounds up to 24) equal one device.
      from scm_jax.data.digits import load_digits_split
      from scm_jax.evaluation import digits_classifier as dc, features
      x = load_digits_split('test')[0][:50]
      v = dc.load_classifier()
      f8 = features.Extractor(dc.features_and_probs_fn, v, 20, e8.mesh)(x)
      f1 = features.Extractor(dc.features_and_probs_fn, v, 20)(x)
      assert f8[0].shape == (50, 64)
      np.testing.assert_allclose(f8[0], f1[0], rtol=1e-5, atol=1e-5)
      print('OK')
  ''', devices=8)


def test_sampler_names_and_nfe():
  ode = generate.samplers_for(False, ['1', '18'], 'heun')
  assert [(s.name, s.nfe) for s in ode] == [('heun1', 1), ('heun18', 35)]
  cm = generate.samplers_for(True, ['1', '2'], 'heun')
  assert [(s.name, s.nfe) for s in cm] == [('1step', 1), ('2step', 2)]


def _toy_workdir(tmp_path):
  workdir = str(tmp_path / 'toy')
  helpers.run_module('scm_jax.train', '--config=configs/toy2d_sct.py', f'--workdir={workdir}',
                     '--config.model.width=32', '--config.model.depth=2',
                     '--config.train.batch_size=64', '--config.train.num_steps=4',
                     '--config.train.sample_every=0', '--config.train.log_every=2',
                     '--config.train.ckpt_every=4', '--config.train.progress_bar=False')
  return workdir


def test_evaluate_cli_writes_json_and_tensorboard(tmp_path):
  workdir = _toy_workdir(tmp_path)
  p = helpers.run_module('scm_jax.evaluate', f'--workdir={workdir}', '--num=300',
                         '--batch_size=128', '--steps=1,2', '--ref_num=500')
  assert 'wrote' in p.stdout and '2step' in p.stdout
  result = json.load(open(os.path.join(workdir, 'eval', 'metrics_4.json')))
  assert result['step'] == 4 and result['settings']['metrics'] == ['energy', 'swd']
  for name, nfe in (('1step', 1), ('2step', 2)):
    r = result['results'][name]
    assert r['nfe'] == nfe and r['num_samples'] == 300
    assert np.isfinite(r['energy_distance']) and r['sliced_wasserstein'] > 0
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(os.path.join(workdir, 'eval', 'tb')))
  # A second run adds its entries and keeps the first run's.
  helpers.run_module('scm_jax.evaluate', f'--workdir={workdir}', '--num=100', '--steps=3',
                     '--batch_size=100', '--ref_num=200')
  result = json.load(open(os.path.join(workdir, 'eval', 'metrics_4.json')))
  assert set(result['results']) == {'1step', '2step', '3step'}
  # User errors: one line, exit code 2, nothing written.
  bad = helpers.run_module('scm_jax.evaluate', f'--workdir={workdir}', '--metrics=fid',
                           check=False)
  assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith('error:')
  assert 'needs images' in bad.stderr and 'Traceback' not in bad.stderr
  bad = helpers.run_module('scm_jax.evaluate', f'--workdir={workdir}', '--batch_size=0',
                           '--num=10', check=False)
  assert bad.returncode == 2 and 'error:' in bad.stderr
