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
T_MAX = math.atan(80.0 / SD)


def _teacher(x_t, t, labels):
  return G.velocity(x_t, t)


def _vsd(F_phi_scale, units='F', weight_fn=None, data=None):
  """VSD loss (no adaptive weight) of a student whose F is a free array p['F'] [B, D],
  with the exact Gaussian teacher and F_phi = scale * the teacher."""
  student = lambda p, x, t, labels, keys: (p['F'], jnp.zeros_like(t))
  phi = lambda p, x, t, labels, keys: (F_phi_scale * G.F_diffusion(x, t), None)
  keys = jax.random.split(jax.random.PRNGKey(0), B)

  def loss(p):
    loss_i, mse, x_hat, diag = vsd.vsd_loss(
        p, {}, (B, D), None, keys, apply_fn=student, eval_apply_fn=phi, dxdt_fn=_teacher,
        sigma_d=SD, p_mean=0.4, p_std=2.0, sigma_max=80.0, adaptive_weight=False,
        units=units, weight_fn=weight_fn, data=data)
    return jnp.mean(loss_i), (mse, x_hat, diag)
  p = {'F': 0.3 * jax.random.normal(jax.random.PRNGKey(1), (B, D))}
  return jax.value_and_grad(loss, has_aux=True)(p), p


@pytest.mark.parametrize('units', vsd.RESIDUALS)
def test_vsd_term_vanishes_when_phi_equals_the_teacher(units):
  (loss, (_, _, diag)), grads = _vsd(1.0, units)[0]
  assert float(loss) < 1e-10 and float(jnp.abs(grads['F']).max()) < 1e-8
  assert float(diag['vsd_d_rms_student']) < 1e-5


@pytest.mark.parametrize('units', vsd.RESIDUALS)
def test_vsd_gradient_is_the_residual_through_the_sample(units):
  """d loss / d x_hat_i = 2 d_i / (u B D): u = sigma_d with d = F_teacher - F_phi (the
  paper's F units), u = 1 with d = x0_phi - x0_teacher; x_hat = f(., t_max)."""
  ((loss, (mse, x_hat, _)), grads), p = _vsd(1.2, units)
  assert float(loss) > 1e-4
  u = SD if units == 'F' else 1.0
  d_norm2 = mse * D  # mse_i = ||d_i||^2 / D
  g_xhat = grads['F'] / (-math.sin(T_MAX) * SD)
  np.testing.assert_allclose(jnp.sum(g_xhat**2, 1), 4 * d_norm2 / (u * B * D)**2, rtol=1e-4)
  assert x_hat.shape == (B, D) and float(jnp.abs(x_hat).max()) > 0


def test_F_residual_is_the_x0_residual_over_sigma_d_sin_t():
  phi = lambda p, x, t, labels, keys: (1.3 * G.F_diffusion(x, t), None)
  k1, k2 = jax.random.split(jax.random.PRNGKey(3))
  x0, z = 0.4 * jax.random.normal(k1, (B, D)), SD * jax.random.normal(k2, (B, D))
  t = jnp.linspace(0.05, 1.5, B)
  res = lambda units: vsd.residual({}, x0, z, t, None, eval_apply_fn=phi, dxdt_fn=_teacher,
                                   sigma_d=SD, units=units)[0]
  np.testing.assert_allclose(res('F'), res('x0') / (SD * jnp.sin(t))[:, None], rtol=1e-4,
                             atol=1e-6)


@pytest.mark.parametrize('units', vsd.RESIDUALS)
@pytest.mark.parametrize('mu_student', [0.0, 0.6])
def test_vsd_moves_the_student_toward_the_teacher(units, mu_student):
  """Gaussian case: the student's samples are N(mu_s, 0.4^2), the teacher's data
  N(0.3, 0.4^2) and F_phi the exact model of the student's samples. The VSD gradient in
  mu_s has the sign of mu_s - 0.3 (descending it closes the gap)."""
  student_data = analytic.GaussianData(mu=mu_student, s=G.s, sigma_d=SD)
  n = 4096

  def loss(mu):
    def student(p, x, t, labels, keys):  # x_hat = mu + s * noise
      te = t[:, None]
      x_hat = mu + G.s * x / (SD * jnp.sin(te))
      return (jnp.cos(te) * x - x_hat) / (jnp.sin(te) * SD), jnp.zeros_like(t)
    phi = lambda p, x, t, labels, keys: (student_data.F_diffusion(x, t), None)
    loss_i = vsd.vsd_loss({}, {}, (n, 1), None, jax.random.split(jax.random.PRNGKey(5), n),
                          apply_fn=student, eval_apply_fn=phi, dxdt_fn=_teacher, sigma_d=SD,
                          p_mean=0.4, p_std=2.0, sigma_max=80.0, adaptive_weight=False,
                          units=units)[0]
    return jnp.mean(loss_i)
  g = float(jax.grad(loss)(jnp.float32(mu_student)))
  assert np.sign(g) == np.sign(mu_student - G.mu) and abs(g) > 1e-4, g


def test_residual_diagnostic_is_equal_on_student_samples_and_data_of_one_law():
  """d's rms on the student's samples vs on real data, at the same t' and z': ~1 when
  both come from one distribution (then d is F_phi's own error and VSD has nothing to
  push on), 0 when F_phi is exact."""
  n = 4096
  law = analytic.GaussianData(mu=0.2, s=0.4, sigma_d=SD)  # data ~ N(0.2, 0.4^2)
  k_student, k_data, k_keys = jax.random.split(jax.random.PRNGKey(9), 3)
  x_hat = 0.2 + 0.4 * jax.random.normal(k_student, (n, D))
  F = -x_hat / (SD * math.sin(T_MAX))  # f(x, t_max) = cos(t_max) x - sin(t_max) SD F

  def diagnostics(phi_scale):
    student = lambda p, x, t, labels, keys: (F, jnp.zeros_like(t))
    phi = lambda p, x, t, labels, keys: (phi_scale * law.F_diffusion(x, t), None)
    return vsd.vsd_loss({}, {}, (n, D), None, jax.random.split(k_keys, n), apply_fn=student,
                        eval_apply_fn=phi, dxdt_fn=lambda x_t, t, l: law.velocity(x_t, t),
                        sigma_d=SD, p_mean=0.4, p_std=2.0, sigma_max=80.0,
                        adaptive_weight=False,
                        data=0.2 + 0.4 * jax.random.normal(k_data, (n, D)))[3]
  diag = diagnostics(1.3)
  assert float(diag['vsd_d_rms_data']) > 0.05
  assert abs(float(diag['vsd_d_rms_ratio']) - 1) < 0.1, diag
  exact = diagnostics(1.0)
  assert float(exact['vsd_d_rms_student']) < 1e-5 and float(exact['vsd_d_rms_data']) < 1e-5
  assert np.isfinite(float(exact['vsd_d_rms_ratio']))  # also where d = 0 exactly


def test_weight_head_starts_at_zero_and_learns_the_inverse_error():
  """w_psi(t) = 0 at init; trained on e^{w} mse(t) - w alone it reaches e^{w} ~ 1 / mse
  (the adaptive weighting's optimum) for an error that varies 100x across t."""
  import optax
  psi = vsd.init_weight_head(jax.random.PRNGKey(0))
  t = jnp.linspace(0.02, 1.55, 256)
  np.testing.assert_array_equal(vsd.weight_head(psi, t), 0.0)
  mse = 0.01 + 0.99 * jnp.sin(t)**2
  obj = lambda p: jnp.mean(jnp.exp(vsd.weight_head(p, t)) * mse - vsd.weight_head(p, t))
  tx = optax.adam(1e-2)
  opt = tx.init(psi)
  for _ in range(600):
    g = jax.grad(obj)(psi)
    u, opt = tx.update(g, opt)
    psi = optax.apply_updates(psi, u)
  ratio = jnp.exp(vsd.weight_head(psi, t)) * mse
  assert float(jnp.abs(ratio - 1).max()) < 0.25, ratio


def _moved(a, b):
  return max(float(np.abs(x - y).max()) for x, y in
             zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))))


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
                            'train.batch_size': 32, 'train.num_steps': 5,
                            'optim.warmup_steps': 0, **overrides})
  return Experiment(c, dxdt_fn=lambda x_t, t, labels: G.velocity(x_t, t))


def test_vsd_step_updates_phi_and_checkpoint_round_trip(tmp_path):
  exp = _experiment()
  state = exp.init_state()
  params0 = jax.device_get(state.params)
  for a, b in zip(jax.tree.leaves(params0),
                  jax.tree.leaves(jax.device_get(state.aux_params['phi']))):
    np.testing.assert_array_equal(a, b)  # F_phi starts as a copy (here: no teacher weights)
  batch = next(exp.data_stream(prefetch=0))
  state, m = exp.step(state, batch)
  state, m = exp.step(state, batch)
  m = jax.device_get(m)
  for name in ('vsd_loss', 'scd_loss', 'aux_loss', 'aux_grad_norm', 'vsd_d_rms_student',
               'vsd_d_rms_data', 'vsd_d_rms_ratio'):
    assert np.isfinite(m[name]) and m[name] != 0, name
  assert set(state.aux_params) == {'phi', 'psi'}  # F_phi and the VSD weight head w_psi
  phi = state.aux_params['phi']
  assert _moved(params0, state.params) > 0 and _moved(params0, phi) > 0
  assert _moved(state.params, phi) > 0  # two models, two optimizers
  assert _moved(vsd.init_weight_head(jax.random.PRNGKey(0)), state.aux_params['psi']) > 0
  w = vsd.weight_head(state.aux_params['psi'], jnp.linspace(0.1, 1.5, 8))
  assert float(jnp.abs(w).max()) > 0  # w_psi has learned, from 0
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


def _steps(exp, n):
  state = exp.init_state()
  batch = next(exp.data_stream(prefetch=0))
  history = [jax.device_get(state)]
  for _ in range(n):
    state, m = exp.step(state, batch)
    history.append(jax.device_get(state))
  return history, jax.device_get(m)


def test_phi_warmup_holds_the_student_and_trains_phi():
  """The first vsd_phi_warmup_steps steps move F_phi (and w_psi) only."""
  history, m = _steps(_experiment(**{'loss.vsd_phi_warmup_steps': 2}), 3)
  s0, s1, s2, s3 = history
  for a, b in ((s0, s1), (s1, s2)):
    assert _moved(a.params, b.params) == 0 and _moved(a.ema, b.ema) == 0
    assert _moved(a.opt_state, b.opt_state) == 0
    assert _moved(a.aux_params['phi'], b.aux_params['phi']) > 0
  assert _moved(s2.params, s3.params) > 0 and float(m['vsd_student_moves']) == 1
  assert int(s3.nonfinite_total) == 0


def test_phi_updates_per_student_update():
  """vsd_phi_updates = 3: F_phi's optimizer counts 3 updates per step, the student's 1,
  and the first step's F_phi differs from the one-update run's."""
  count = lambda opt: [int(x) for x in jax.tree.leaves(opt) if np.ndim(x) == 0][0]
  k3, _ = _steps(_experiment(**{'loss.vsd_phi_updates': 3}), 2)
  k1, _ = _steps(_experiment(), 1)
  assert count(k3[2].aux_opt_state['phi']) == 6 and count(k3[2].opt_state) == 2
  assert count(k3[2].aux_opt_state['psi']) == 2
  assert _moved(k1[1].aux_params['phi'], k3[1].aux_params['phi']) > 0
  assert _moved(k1[1].params, k3[1].params) > 0  # the student saw another F_phi


def test_shared_weight_head_keeps_the_earlier_layout():
  """vsd_weight_head='student' (the earlier variant): aux_params is F_phi itself, as in
  the checkpoints of earlier VSD runs, and the x0-unit residual still trains."""
  exp = _experiment(**{'loss.vsd_weight_head': 'student', 'loss.vsd_residual': 'x0'})
  history, m = _steps(exp, 1)
  flat = ckpt_lib.flat_shapes(exp.abstract_state)
  assert not any(k.startswith(('aux_params/phi', 'aux_params/psi')) for k in flat)
  assert _moved(history[0].aux_params, history[1].aux_params) > 0
  assert np.isfinite(m['vsd_loss']) and m['vsd_loss'] != 0


def test_config_checks():
  with pytest.raises(ConfigError, match='microbatches'):
    _experiment(**{'train.microbatches': 2})
  with pytest.raises(ConfigError, match='segments'):
    _experiment(**{'loss.segments': 2, 'sample.steps': (2,)})
  for field, value, match in (('vsd_residual', 'v', 'vsd_residual'),
                              ('vsd_weight_head', 'shared', 'vsd_weight_head'),
                              ('vsd_phi_updates', 0, 'vsd_phi_updates'),
                              ('vsd_phi_warmup_steps', 5, 'vsd_phi_warmup_steps')):
    with pytest.raises(ConfigError, match=match):
      _experiment(**{f'loss.{field}': value})
