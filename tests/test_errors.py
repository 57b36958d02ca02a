"""Bad input gets one clear `error:` line naming the problem, and loses nothing."""

import os

import numpy as np
import pytest

from configs import toy2d_sct
from scm_jax import config as config_lib
from scm_jax import models
from scm_jax.errors import ConfigError
from tests import helpers

TINY_TOY = ('--config.model.width=16', '--config.model.depth=1', '--config.model.time_embed_dim=16',
            '--config.model.logvar_channels=8', '--config.train.batch_size=8',
            '--config.train.log_every=2', '--config.train.ckpt_every=2',
            '--config.train.sample_every=0', '--config.data.num_train=64',
            '--config.data.num_test=16', '--config.train.progress_bar=False')


def _train(workdir, *extra, check=False):
  return helpers.run_module('scm_jax.train', '--config=configs/toy2d_sct.py',
                            f'--workdir={workdir}', *TINY_TOY, *extra, check=check)


def _assert_clean_error(p, *needles):
  assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
  assert 'Traceback' not in p.stderr, p.stderr
  assert 'error:' in p.stderr
  for n in needles:
    assert n in p.stderr, (n, p.stderr)


def test_unknown_config_key(tmp_path):
  p = _train(tmp_path / 'w', '--config.model.widht=3')
  _assert_clean_error(p, 'widht', 'Did you mean "width"')
  assert not os.path.exists(tmp_path / 'w')


def test_unknown_dataset(tmp_path):
  p = _train(tmp_path / 'w', '--config.data.name=imagenet_foo')
  _assert_clean_error(p, 'imagenet_foo', 'toy2d', 'digits')


def test_bad_config_values_name_the_field():
  c = toy2d_sct.get_config()
  cases = [('loss', 'kind', 'sCT'), ('trigflow', 'sigma_d', 0.0), ('loss', 'p_std', -1.0),
           ('optim', 'name', 'sgdd'), ('sample', 't_mid', 2.0), ('train', 'keep_ckpts', 0),
           ('sharding', 'strategy', 'zero3'), ('model', 'norm_mode', 'batch')]
  for section, field, value in cases:
    bad = toy2d_sct.get_config()
    bad[section][field] = value
    with pytest.raises(ConfigError, match=field):
      # validate_config checks model fields by name; their values are checked when the
      # model is built (once, by the Experiment).
      config_lib.validate_config(bad)
      models.build_model(bad.model)
  config_lib.validate_config(c)


def _train_on_array(tmp_path, name: str, x: np.ndarray, *overrides: str):
  """Runs the digits recipe on `x` saved as <name>.npz (data.name='array')."""
  path = tmp_path / f'{name}.npz'
  np.savez(path, x=x)
  return helpers.run_module('scm_jax.train', '--config=configs/digits_sct.py',
                            f'--workdir={tmp_path / name}', '--config.data.name=array',
                            f'--config.data.path={path}', *overrides, check=False)


def test_wrong_image_shapes(tmp_path):
  p = _train_on_array(tmp_path, 'nchw', np.zeros((20, 3, 16, 16), np.uint8))
  _assert_clean_error(p, 'nchw.npz', 'transpose')
  # 6x6 images cannot go through a U-Net that halves the resolution twice.
  p = _train_on_array(tmp_path, 'six', np.zeros((20, 6, 6, 1), np.uint8),
                      '--config.model.channel_mult=(1,2,2)')
  _assert_clean_error(p, '6')
  # The config expects 8x8x1 but the file holds 16x16x3.
  p = _train_on_array(tmp_path, 'wrong', np.zeros((20, 16, 16, 3), np.uint8),
                      '--config.data.expected_shape=(8,8,1)')
  _assert_clean_error(p, 'wrong.npz', '(8, 8, 1)')


def test_incompatible_checkpoint_is_refused_and_left_intact(tmp_path):
  workdir = tmp_path / 'run'
  p = _train(workdir, '--config.train.num_steps=4')
  assert p.returncode == 0, p.stderr
  before = helpers.tree_digest(str(workdir / 'checkpoints'))
  assert before
  p = _train(workdir, '--config.train.num_steps=8', '--config.model.width=32')
  _assert_clean_error(p, 'does not match this run', 'checkpoint (16,', 'vs model (32,',
                      'No checkpoint was changed')
  # Different data shape (3-D Gaussian instead of 2-D ring) with the same model.
  p = _train(workdir, '--config.train.num_steps=8', '--config.data.toy=gaussian',
             '--config.data.dim=3')
  _assert_clean_error(p, 'shape')
  assert helpers.tree_digest(str(workdir / 'checkpoints')) == before
  # The original config still resumes.
  p = _train(workdir, '--config.train.num_steps=6')
  assert p.returncode == 0, p.stderr
  assert 'resumed from step 4' in p.stderr


def test_sample_cli_errors(tmp_path):
  p = helpers.run_module('scm_jax.sample', f'--workdir={tmp_path / "nothing"}', check=False)
  _assert_clean_error(p, 'config.json')


def _unconditional_workdir(tmp_path):
  """A workdir holding only the config.json of an unconditional toy run (the checks below
  read nothing else)."""
  from scm_jax.train import workdir as workdir_lib
  workdir = str(tmp_path / 'uncond')
  os.makedirs(workdir)
  workdir_lib.save_config(workdir, toy2d_sct.get_config())
  return workdir


@pytest.mark.parametrize('module, args, needles', [
    ('scm_jax.sample', ['--num=0'], ['--num=0', 'positive']),
    ('scm_jax.sample', ['--guidance=2'], ['--guidance=2 needs a class-conditional model']),
    ('scm_jax.evaluate', ['--guidance=2'], ['needs a class-conditional model']),
])
def test_cli_arguments_are_checked_before_any_work(tmp_path, module, args, needles):
  """One line each, exit 2, and no output written (before: an empty .npz and a grid for
  --num=0, unguided numbers labelled @w2 for --guidance on an unconditional model)."""
  workdir = _unconditional_workdir(tmp_path)
  p = helpers.run_module(module, f'--workdir={workdir}', *args, check=False)
  _assert_clean_error(p, *needles)
  assert len([l for l in p.stderr.splitlines() if l.strip()]) == 1, p.stderr
  assert sorted(os.listdir(workdir)) == ['config.json']


@pytest.mark.parametrize('module, cases', [
    ('scm_jax.sample', {'--steps=-1': '--steps=-1', '--ode=-2': '--ode=-2',
                        '--seed=-1': '--seed=-1', '--ckpt_step=-5': '--ckpt_step=-5',
                        '--labels=1,x': '--labels takes comma-separated integers',
                        '--labels=-1': '--labels takes comma-separated integers >= 0',
                        '--guidance=-1': 'not a non-negative number'}),
    ('scm_jax.evaluate', {'--num=0': '--num=0', '--batch_size=0': '--batch_size=0',
                          '--feature_batch_size=-3': '--feature_batch_size=-3',
                          '--pr_k=0': '--pr_k=0', '--ref_num=-1': '--ref_num=-1',
                          '--steps=1,0': '--steps takes comma-separated integers >= 1',
                          '--steps=a': '--steps takes comma-separated integers'}),
])
def test_every_cli_count_flag_is_range_checked(module, cases):
  """The flag definitions refuse bad values while parsing (before anything runs); the
  CLI prints the parse error as one `error:` line (above)."""
  p = helpers.run_python(f"""
      from absl import flags
      import {module}
      for arg, needle in {cases!r}.items():
        try:
          flags.FLAGS(['prog', '--workdir=w', arg])
        except flags.Error as e:
          assert needle in str(e), (arg, str(e))
        else:
          raise AssertionError(f'{{arg}} was accepted')
      print('OK')
  """)
  assert p.stdout.strip().endswith('OK')
