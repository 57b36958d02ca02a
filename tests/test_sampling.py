"""Samplers against the Gaussian closed forms."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scm_jax.core import analytic, sampling

SD = 0.5
G = analytic.GaussianData(mu=0.3, s=0.4, sigma_d=SD)


@pytest.mark.parametrize('times', [(math.pi / 2,), (math.pi / 2, 1.1), (math.pi / 2, 1.1, 0.5)])
def test_exact_consistency_model_samples_the_data_distribution(times):
  x = jax.jit(lambda k: sampling.sample_consistency(G.F_consistency, k, (50000, 2), SD, times))(
      jax.random.PRNGKey(0))
  assert abs(float(x.mean()) - G.mu) < 0.01
  assert abs(float(x.std()) - G.s) < 0.01


def test_one_step_is_the_consistency_function_of_the_noise():
  key = jax.random.PRNGKey(1)
  x = sampling.sample_consistency(G.F_consistency, key, (16, 3), SD)
  z = SD * jax.random.normal(jax.random.split(key, 1)[0], (16, 3))
  np.testing.assert_allclose(x, G.consistency(z, jnp.full((16,), jnp.pi / 2)), atol=1e-5)


def test_sampling_is_deterministic_given_key():
  f = lambda k: sampling.sample_consistency(G.F_consistency, k, (8, 2), SD, (math.pi / 2, 1.1))
  np.testing.assert_array_equal(f(jax.random.PRNGKey(3)), f(jax.random.PRNGKey(3)))
  assert not np.allclose(f(jax.random.PRNGKey(3)), f(jax.random.PRNGKey(4)))


def test_pf_ode_solvers_converge_to_the_exact_map():
  z = SD * jax.random.normal(jax.random.PRNGKey(5), (256, 2))
  exact = G.consistency(z, jnp.full((256,), jnp.pi / 2))
  err = {}
  for solver in ('euler', 'heun', 'ddim'):
    for n in (10, 40):
      ts = sampling.pf_ode_times(n, SD, 'uniform')
      x = sampling.solve_pf_ode(G.F_diffusion, z, ts, SD, solver)
      err[solver, n] = float(jnp.max(jnp.abs(x - exact)))
  assert err['heun', 40] < 1e-3
  assert err['heun', 10] < err['euler', 10]
  assert err['euler', 40] < err['euler', 10] / 3   # first order: ~4x
  assert err['heun', 40] < err['heun', 10] / 8     # second order: ~16x (last step Euler)
  assert err['ddim', 40] < err['ddim', 10]


def test_pf_ode_sample_distribution_and_trajectory():
  x, traj = sampling.sample_pf_ode(G.F_diffusion, jax.random.PRNGKey(6), (20000, 1), SD, 18,
                                   'heun', 'edm', return_trajectory=True)
  assert abs(float(x.mean()) - G.mu) < 0.01 and abs(float(x.std()) - G.s) < 0.01
  assert traj.shape == (19, 20000, 1)
  np.testing.assert_array_equal(traj[-1], x)
  assert sampling.pf_ode_nfe(18, 'heun') == 35 and sampling.pf_ode_nfe(18, 'euler') == 18


def test_schedules():
  ts = np.asarray(sampling.pf_ode_times(18, SD, 'edm'))
  assert len(ts) == 19
  assert ts[0] == pytest.approx(math.pi / 2) and ts[-1] == 0.0 and np.all(np.diff(ts) < 0)
  assert ts[-2] == pytest.approx(math.atan(0.002 / SD), rel=1e-4)
  np.testing.assert_allclose(sampling.pf_ode_times(1, SD, 'edm'), [math.pi / 2, 0.0])
  assert sampling.consistency_times(1) == (math.pi / 2,)
  assert sampling.consistency_times(2, 1.1) == (math.pi / 2, 1.1)
  assert len(sampling.consistency_times(4)) == 4
  with pytest.raises(ValueError):
    sampling.consistency_times(2, times=(1.0, 1.2))
  with pytest.raises(ValueError):
    sampling.ode_step(G.F_diffusion, jnp.zeros((1, 1)), 1.0, 0.5, SD, 'rk45')
