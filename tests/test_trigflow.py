"""TrigFlow identities, conversions and the Gaussian closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scm_jax.core import analytic, trigflow

SD = 0.5


def _xzt(seed=0, n=64, d=3):
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
  x0 = jax.random.normal(k1, (n, d))
  z = SD * jax.random.normal(k2, (n, d))
  t = jax.random.uniform(k3, (n,), minval=0.05, maxval=jnp.pi / 2 - 0.05)
  return x0, z, t


def test_noising_boundaries_and_velocity():
  x0, z, t = _xzt()
  np.testing.assert_allclose(trigflow.add_noise(x0, z, jnp.zeros(64)), x0, atol=1e-7)
  np.testing.assert_allclose(trigflow.add_noise(x0, z, jnp.full(64, jnp.pi / 2)), z, atol=1e-6)
  # v_t is the time derivative of x_t.
  dx = jax.jvp(lambda tt: trigflow.add_noise(x0, z, tt), (t,), (jnp.ones_like(t),))[1]
  np.testing.assert_allclose(dx, trigflow.velocity_target(x0, z, t), atol=1e-6)


def test_consistency_fn_identity_at_zero():
  x, F, _ = _xzt(1)
  np.testing.assert_allclose(trigflow.consistency_fn(x, F, jnp.zeros(64), SD), x, atol=1e-7)


def test_x0_z_predictions_reconstruct_x_t_and_invert():
  x_t, F, t = _xzt(2)
  x0 = trigflow.x0_from_F(x_t, F, t, SD)
  z = trigflow.z_from_F(x_t, F, t, SD)
  np.testing.assert_allclose(trigflow.add_noise(x0, z, t), x_t, atol=1e-5)
  np.testing.assert_allclose(trigflow.F_from_x0(x_t, x0, t, SD), F, rtol=1e-4, atol=1e-4)
  # sigma_d F is the velocity implied by the two predictions.
  np.testing.assert_allclose(trigflow.velocity_target(x0, z, t), SD * F, atol=1e-5)


def test_edm_round_trips():
  x_t, F, t = _xzt(3)
  sigma = trigflow.sigma_from_t(t, SD)
  np.testing.assert_allclose(trigflow.t_from_sigma(sigma, SD), t, rtol=1e-6)
  x_sigma, sig2 = trigflow.edm_inputs(x_t, t, SD)
  x_back, t_back = trigflow.trigflow_inputs_from_edm(x_sigma, sig2, SD)
  np.testing.assert_allclose(x_back, x_t, atol=1e-5)
  np.testing.assert_allclose(t_back, t, rtol=1e-6)
  # F -> EDM denoiser -> F.
  D = trigflow.edm_denoiser_from_F(x_sigma, sig2, F, SD)
  np.testing.assert_allclose(trigflow.F_from_edm_denoiser(x_t, t, D, SD), F, rtol=1e-3, atol=1e-3)


def test_time_proposal_is_lognormal_in_tan_t():
  t = trigflow.sample_t(jax.random.PRNGKey(0), (200000,), -1.0, 1.4, SD)
  assert float(t.min()) > 0 and float(t.max()) < np.pi / 2
  log_sigma = np.log(SD * np.tan(np.asarray(t, np.float64)))
  assert abs(log_sigma.mean() - (-1.0)) < 0.02
  assert abs(log_sigma.std() - 1.4) < 0.02


def test_all_parameterizations_of_the_exact_gaussian_teacher_agree():
  g = analytic.GaussianData(mu=0.3, s=0.4, sigma_d=SD)
  x_t, _, t = _xzt(4)
  F_ref = g.F_diffusion(x_t / SD, t)
  x_sigma, sigma = trigflow.edm_inputs(x_t, t, SD)
  F_edm = trigflow.F_from_edm_denoiser(x_t, t, g.edm_denoiser(x_sigma, sigma), SD)
  x_vp, alpha, s_vp = trigflow.vp_inputs(x_t, t, SD)
  F_vp = trigflow.F_from_vp_eps(x_t, t, g.vp_eps(x_vp, alpha, s_vp), SD)
  x_fm, s_fm = trigflow.fm_inputs(x_t, t, SD)
  F_fm = trigflow.F_from_fm_velocity(x_t, t, g.fm_velocity(x_fm, s_fm), SD)
  for F in (F_edm, F_vp, F_fm):
    np.testing.assert_allclose(F, F_ref, rtol=1e-3, atol=1e-4)


def test_gaussian_consistency_function_solves_the_pf_ode():
  g = analytic.GaussianData()
  x_t, _, t = _xzt(5)
  np.testing.assert_allclose(g.consistency(x_t, jnp.zeros(64)), x_t, atol=1e-6)
  # df/dt along the exact PF-ODE vanishes.
  f_along = lambda tt: g.consistency(x_t + (tt - t)[:, None] * g.velocity(x_t, t), tt)
  df = jax.jvp(f_along, (t,), (jnp.ones_like(t),))[1]
  np.testing.assert_allclose(df, 0.0, atol=1e-5)
  # f at t=pi/2 of prior noise has the data mean and std.
  z = SD * jax.random.normal(jax.random.PRNGKey(0), (100000, 1))
  x0 = g.consistency(z, jnp.full((100000,), jnp.pi / 2))
  assert abs(float(x0.mean()) - g.mu) < 0.01 and abs(float(x0.std()) - g.s) < 0.01


@pytest.mark.parametrize('t', [0.05, 0.7, 1.5])
def test_exact_consistency_F_reproduces_f(t):
  g = analytic.GaussianData()
  x_t = jnp.linspace(-1, 1, 11)[:, None]
  tt = jnp.full((11,), t)
  f = trigflow.consistency_fn(x_t, g.F_consistency(x_t / SD, tt), tt, SD)
  np.testing.assert_allclose(f, g.consistency(x_t, tt), atol=1e-5)
