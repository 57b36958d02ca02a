"""sCD + adaptive VSD (loss.kind='scd_vsd', core/vsd.py): the VSD gradient on the 1-step
samples, the auxiliary model F_phi in the TrainState (one update per step) and its
checkpoint round trip."""

import dataclasses
import math
from typing import Any

import flax

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scm_jax.core import analytic, vsd
from scm_jax.errors import ConfigError
from scm_jax.infra import checkpoint as ckpt_lib
from scm_jax.train import workdir as workdir_lib
from tests import helpers

SD = 0.5
G = analytic.GaussianData(mu=0.3, s=0.4, sigma_d=SD)
B, D = 64, 2


def _vsd(F_phi_scale):
  """VSD loss (no adaptive weight) of a student whose F is a free array p['F'] [B, D],
  with the exact Gaussian teacher and F_phi = scale * the teacher."""
  student = lambda p, x, t, labels, keys: (p['F'], jnp.zeros_like(t))
  phi = lambda p, x, t, labels, keys: (F_phi_scale * G.F_diffusion(x, t), None)
  keys = jax.random.split(jax.random.PRNGKey(0), B)

  def loss(p):
    loss_i, mse, x_hat = vsd.vsd_loss(
        p, {}, (B, D), None, keys, apply_fn=student, eval_apply_fn=phi,
        dxdt_fn=lambda x_t, t, labels: G.velocity(x_t, t), sigma_d=SD, p_mean=0.4,
        p_std=2.0, sigma_max=80.0, adaptive_weight=False)
    return jnp.mean(loss_i), (mse, x_hat)
  p = {'F': 0.3 * jax.random.normal(jax.random.PRNGKey(1), (B, D))}
  return jax.value_and_grad(loss, has_aux=True)(p), p


def test_vsd_term_vanishes_when_phi_equals_the_teacher():
  (loss, _), grads = _vsd(1.0)[0]
  assert float(loss) < 1e-10 and float(jnp.abs(grads['F']).max()) < 1e-8


def test_vsd_gradient_is_the_x0_difference_through_the_sample():
  """d loss / d x_hat_i = 2 d_i / (B D), d = x0_phi - x0_teacher; x_hat = f(., t_max)."""
  ((loss, (mse, x_hat)), grads), p = _vsd(1.2)
  assert float(loss) > 1e-4
  t_max = math.atan(80.0 / SD)
  d_norm2 = mse * D  # mse_i = ||d_i||^2 / D
  g_xhat = grads['F'] / (-math.sin(t_max) * SD)
  np.testing.assert_allclose(jnp.sum(g_xhat**2, 1), 4 * d_norm2 / (B * D)**2, rtol=1e-4)
  # x_hat is the 1-step sample of the student from sin(t_max) z.
  assert x_hat.shape == (B, D) and float(jnp.abs(x_hat).max()) > 0


@flax.struct.dataclass
class OldTrainState:
  """The TrainState as it was before loss.kind='scd_vsd' (its checkpoints must load)."""
  step: Any
  params: Any
  ema: dict
  opt_state: Any
  rng: Any
  nonfinite_total: Any
  nonfinite_streak: Any


def _experiment(**overrides):
  from scm_jax.train.experiment import Experiment
  c = helpers.toy_config(**{'loss.kind': 'scd_vsd', 'model.width': 32,
                            'train.batch_size': 32, 'train.num_steps': 5, **overrides})
  return Experiment(c, dxdt_fn=lambda x_t, t, labels: G.velocity(x_t, t))


def test_vsd_step_updates_phi_and_checkpoint_round_trip(tmp_path):
  exp = _experiment()
  state = exp.init_state()
  params0 = jax.device_get(state.params)
  for a, b in zip(jax.tree.leaves(params0), jax.tree.leaves(jax.device_get(state.aux_params))):
    np.testing.assert_array_equal(a, b)  # F_phi starts as a copy (here: no teacher weights)
  batch = next(exp.data_stream(prefetch=0))
  state, m = exp.step(state, batch)
  state, m = exp.step(state, batch)
  m = jax.device_get(m)
  for name in ('vsd_loss', 'scd_loss', 'aux_loss', 'aux_grad_norm'):
    assert np.isfinite(m[name]) and m[name] != 0, name
  moved = lambda a, b: max(float(np.abs(x - y).max()) for x, y in
                           zip(jax.tree.leaves(a), jax.tree.leaves(jax.device_get(b))))
  assert moved(params0, state.params) > 0 and moved(params0, state.aux_params) > 0
  assert moved(state.params, state.aux_params) > 0  # two models, two optimizers
  assert int(state.step) == 2

  ckpt = ckpt_lib.Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(2, state, {'data_shape': list(exp.data_shape)})
  ckpt.wait()
  validate = workdir_lib.compatibility(str(tmp_path), exp.abstract_state,
                                       data_shape=exp.data_shape)
  restored, _ = ckpt.restore(2, exp.abstract_state, validate)
  for a, b in zip(jax.tree.leaves(jax.device_get(state)), jax.tree.leaves(jax.device_get(restored))):
    np.testing.assert_array_equal(a, b)
  assert any(k.startswith('aux_params/') for k in ckpt_lib.flat_shapes(exp.abstract_state))
  # A run without F_phi has no aux leaves (older checkpoints keep their layout) and
  # refuses this checkpoint by name.
  sct = _experiment(**{'loss.kind': 'scd'})
  assert not any(k.startswith('aux') for k in ckpt_lib.flat_shapes(sct.abstract_state))
  with pytest.raises(ckpt_lib.IncompatibleCheckpointError, match='aux_params'):
    ckpt.restore(2, sct.abstract_state, workdir_lib.compatibility(
        str(tmp_path), sct.abstract_state, data_shape=exp.data_shape))
  # A checkpoint of the TrainState before the aux fields existed restores into today's
  # state of a run without F_phi.
  state = sct.init_state()
  old = OldTrainState(**{f.name: getattr(state, f.name)
                         for f in dataclasses.fields(OldTrainState)})
  ckpt.save(3, old, {'data_shape': list(exp.data_shape)})
  ckpt.wait()
  restored, _ = ckpt.restore(3, sct.abstract_state, lambda *a: None)
  assert restored.aux_params is None and int(restored.step) == 0
  for a, b in zip(jax.tree.leaves(jax.device_get(state)), jax.tree.leaves(jax.device_get(restored))):
    np.testing.assert_array_equal(a, b)
  ckpt.close()


def test_config_checks():
  with pytest.raises(ConfigError, match='microbatches'):
    _experiment(**{'train.microbatches': 2})
  with pytest.raises(ConfigError, match='segments'):
    _experiment(**{'loss.segments': 2, 'sample.steps': (2,)})
