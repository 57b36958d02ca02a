"""EMA: classic and EDM2 power-function averages, several at once, through checkpoints,
and picked by name for sampling (Experiment.sample, the sample CLI, a teacher)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import toy2d_sct
from scm_jax.errors import ConfigError
from scm_jax.train import state as state_lib
from scm_jax.train.experiment import Experiment, load_experiment
from scm_jax.train.loop import train_and_evaluate
from tests import helpers


def tiny_toy_config():
  c = toy2d_sct.get_config()
  c.model.width, c.model.depth = 16, 1
  c.model.time_embed_dim, c.model.logvar_channels = 16, 8
  c.data.num_train, c.data.num_test, c.data.prefetch = 512, 256, 0
  c.train.batch_size, c.train.log_every, c.train.sample_every = 32, 4, 0
  c.train.progress_bar = False
  c.ema.decays = (0.9, 0.5)
  c.ema.sigma_rels = (0.05, 0.2)
  c.sample.num = 64
  return c


def _run_ema(name, values):
  """EMA named `name` over the scalar 'parameter' sequence values[0..T-1] (updates 1..T)."""
  ema = {name: jnp.float32(0.0)}

  def body(e, x):
    step, v = x
    return state_lib.update_ema(e, v, step), None
  steps = jnp.arange(1, len(values) + 1)
  return float(jax.lax.scan(body, ema, (steps, jnp.asarray(values, jnp.float32)))[0][name])


def test_classic_ema_is_geometric_average():
  vals = np.random.default_rng(0).normal(size=50)
  expected = 0.0
  for v in vals:
    expected = 0.9 * expected + 0.1 * v
  assert _run_ema('ema_0.9', vals) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize('sigma_rel', [0.05, 0.1, 0.2])
def test_power_ema_profile_has_width_sigma_rel(sigma_rel):
  """EDM2: the power EMA at step T averages iterate k with weight ~ (k/T)^gamma; as a
  distribution over tau = k/T its std is sigma_rel and its mean (g + 1) / (g + 2)."""
  T = 4000
  tau = np.arange(1, T + 1) / T
  name = f'pema_{sigma_rel:g}'
  m1, m2 = _run_ema(name, tau), _run_ema(name, tau**2)
  g = state_lib.power_ema_gamma(sigma_rel)
  assert m1 == pytest.approx((g + 1) / (g + 2), abs=2e-3)
  assert math.sqrt(m2 - m1**2) == pytest.approx(sigma_rel, rel=0.03)
  # The first update copies the parameters (beta_1 = 0): no memory of the init.
  assert _run_ema(name, [3.0]) == pytest.approx(3.0)


def test_train_step_updates_every_ema_from_the_new_params():
  c = tiny_toy_config()
  exp = Experiment(c)
  state = exp.init_state()
  init = jax.device_get(state.params)
  it = exp.data_stream()
  raws = []
  for _ in range(3):
    state, _ = exp.step(state, next(it))
    raws.append(jax.device_get(state.params))
  it.close()
  for name in ('ema_0.9', 'ema_0.5', 'pema_0.05', 'pema_0.2'):
    beta = state_lib.ema_decay_fn(name)
    expected = init
    for k, p in enumerate(raws, start=1):
      b = float(beta(k))
      expected = jax.tree.map(lambda e, q: b * e + (1 - b) * q, expected, p)
    for a, b in zip(jax.tree.leaves(state.ema[name]), jax.tree.leaves(expected)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  # The copies really differ (a test that cannot fail otherwise).
  leaf = lambda n: jax.tree.leaves(state.ema[n])[0]
  assert not np.allclose(leaf('ema_0.9'), leaf('pema_0.2'))


def test_ema_round_trip_through_checkpoint_and_sampling(tmp_path):
  c = tiny_toy_config()
  c.train.num_steps, c.train.ckpt_every = 8, 4
  workdir = str(tmp_path / 'run')
  final = train_and_evaluate(c, workdir).state
  exp, restored = load_experiment(workdir)
  assert sorted(restored.ema) == ['ema_0.5', 'ema_0.9', 'pema_0.05', 'pema_0.2']
  for a, b in zip(jax.tree.leaves(jax.device_get(final)), jax.tree.leaves(jax.device_get(restored))):
    np.testing.assert_array_equal(a, b)
  # '' = the first EMA in config order (ema_0.9, though 'ema_0.5' sorts first).
  key = jax.random.PRNGKey(3)
  by_name = {n: exp.sample(restored, 64, 1, key=key, ema=n)
             for n in ('', 'params', 'ema_0.9', 'ema_0.5', 'pema_0.2')}
  np.testing.assert_array_equal(by_name[''], by_name['ema_0.9'])
  assert not np.allclose(by_name['ema_0.9'], by_name['ema_0.5'])
  assert not np.allclose(by_name['pema_0.2'], by_name['params'])
  with pytest.raises(ConfigError, match='no EMA named'):
    exp.sample(restored, 64, 1, ema='ema_0.123')

  # The sample CLI picks the same weights.
  out = str(tmp_path / 'pema')
  helpers.run_module('scm_jax.sample', f'--workdir={workdir}', '--steps=1', '--num=64',
                     '--seed=3', '--ema=pema_0.2', f'--out={out}')
  np.testing.assert_allclose(np.load(out + '.npz')['x'], by_name['pema_0.2'], atol=1e-6)
  p = helpers.run_module('scm_jax.sample', f'--workdir={workdir}', '--ema=nope',
                         f'--out={out}', check=False)
  assert p.returncode == 2 and 'error: no EMA named' in p.stderr
  assert 'Traceback' not in p.stderr
