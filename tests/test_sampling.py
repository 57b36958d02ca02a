"""Samplers against the Gaussian closed forms."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scm_jax.core import analytic, sampling

SD = 0.5
G = analytic.GaussianData(mu=0.3, s=0.4, sigma_d=SD)
T_MAX = math.atan(80 / SD)  # where EDM and the paper start sampling (sigma_max = 80)


@pytest.mark.parametrize('times', [(T_MAX,), (T_MAX, 1.1), (T_MAX, 1.1, 0.5)])
def test_exact_consistency_model_samples_the_data_distribution(times):
  x = jax.jit(lambda k: sampling.sample_consistency(G.F_consistency, k, (50000, 2), SD, times))(
      jax.random.PRNGKey(0))
  assert abs(float(x.mean()) - G.mu) < 0.01
  assert abs(float(x.std()) - G.s) < 0.01


def test_one_step_is_the_consistency_function_of_the_noise_at_t_max():
  key = jax.random.PRNGKey(1)
  assert sampling.t_max(SD) == pytest.approx(1.5645, abs=1e-4)
  x = sampling.sample_consistency(G.F_consistency, key, (16, 3), SD, (T_MAX,))
  z = SD * jax.random.normal(jax.random.split(key, 1)[0], (16, 3))
  x_start = math.sin(T_MAX) * z   # EDM's sigma_max * n in TrigFlow coordinates
  np.testing.assert_allclose(x, G.consistency(x_start, jnp.full((16,), T_MAX)), atol=1e-5)


def test_sampling_is_deterministic_given_key():
  f = lambda k: sampling.sample_consistency(G.F_consistency, k, (8, 2), SD, (T_MAX, 1.1))
  np.testing.assert_array_equal(f(jax.random.PRNGKey(3)), f(jax.random.PRNGKey(3)))
  assert not np.allclose(f(jax.random.PRNGKey(3)), f(jax.random.PRNGKey(4)))


def test_pf_ode_solvers_converge_at_their_order():
  """Exact teacher of Gaussian data, EDM schedule (rho = 7) from t_max: as the steps
  double (16 -> 32 -> 64) the error to the exact PF-ODE endpoint halves for the
  first-order solvers (Euler, DDIM) and quarters for the second-order ones (EDM Heun,
  DPM-Solver++(2M)). Measured ratios: 1.9-2.0 and 4.3-4.6."""
  z = SD * jax.random.normal(jax.random.PRNGKey(5), (256, 2))
  ratios = {}
  for solver in sampling.ODE_SOLVERS:
    errs = []
    for n in (16, 32, 64):
      ts = sampling.pf_ode_times(n, SD, 'edm')
      x_init = jnp.sin(ts[0]) * z
      exact = G.consistency(x_init, jnp.full((256,), ts[0]))
      x = jax.jit(sampling.solve_pf_ode, static_argnums=(0, 3, 4))(
          G.F_diffusion, x_init, ts, SD, solver)
      errs.append(float(jnp.max(jnp.abs(x - exact))))
    ratios[solver] = [a / b for a, b in zip(errs, errs[1:])]
    if solver in ('heun', 'dpmpp_2m'):
      assert errs[-1] < 1e-2, (solver, errs)
  for solver in ('euler', 'ddim'):
    assert all(1.6 < r < 2.5 for r in ratios[solver]), ratios
  for solver in ('heun', 'dpmpp_2m'):
    assert all(3.5 < r < 5.5 for r in ratios[solver]), ratios


def test_edm_heun_is_edms_sampler_in_sigma():
  """One 'heun' step is EDM's Heun step on x_sigma = x_t / cos t with the denoiser
  D(x_sigma, sigma) = x0 (Karras et al. 2022, Alg. 1), written out in sigma here."""
  x = SD * jax.random.normal(jax.random.PRNGKey(2), (64, 2))
  t, t_next = 1.2, 0.7
  s, s_next = SD * math.tan(t), SD * math.tan(t_next)
  D = lambda x_sig, sig: G.edm_denoiser(x_sig, jnp.full((64,), sig))
  x_sig = x / math.cos(t)
  d = (x_sig - D(x_sig, s)) / s
  x_e = x_sig + (s_next - s) * d
  d2 = (x_e - D(x_e, s_next)) / s_next
  expected = math.cos(t_next) * (x_sig + (s_next - s) * 0.5 * (d + d2))
  np.testing.assert_allclose(sampling.ode_step(G.F_diffusion, x, t, t_next, SD, 'heun'),
                             expected, rtol=1e-4, atol=1e-5)


def test_pf_ode_sample_distribution_and_trajectory():
  # EDM Heun with 18 steps is 6% off in std on this Gaussian (an independent NumPy
  # transcription of EDM's Alg. 1 agrees: 0.4228); 40 steps are within 1%.
  x, traj = sampling.sample_pf_ode(G.F_diffusion, jax.random.PRNGKey(6), (20000, 1), SD, 40,
                                   'heun', 'edm', return_trajectory=True)
  assert abs(float(x.mean()) - G.mu) < 0.01 and abs(float(x.std()) - G.s) < 0.005
  assert traj.shape == (41, 20000, 1)
  np.testing.assert_array_equal(traj[-1], x)
  assert float(traj[0].std()) == pytest.approx(80 * math.cos(T_MAX), rel=0.02)
  assert sampling.pf_ode_nfe(18, 'heun') == 35 and sampling.pf_ode_nfe(18, 'euler') == 18
  assert sampling.pf_ode_nfe(32, 'dpmpp_2m') == 32


def test_schedules():
  ts = np.asarray(sampling.pf_ode_times(18, SD, 'edm'))
  assert len(ts) == 19
  assert ts[0] == pytest.approx(T_MAX) and ts[-1] == 0.0 and np.all(np.diff(ts) < 0)
  assert ts[-2] == pytest.approx(math.atan(0.002 / SD), rel=1e-4)
  np.testing.assert_allclose(sampling.pf_ode_times(1, SD, 'edm'), [T_MAX, 0.0], rtol=1e-6)
  assert float(sampling.pf_ode_times(4, SD, 'uniform')[0]) == pytest.approx(T_MAX)
  assert sampling.consistency_times(1, t_start=T_MAX) == (T_MAX,)
  assert sampling.consistency_times(2, 1.1, t_start=T_MAX) == (T_MAX, 1.1)
  assert len(sampling.consistency_times(4, t_start=T_MAX)) == 4
  with pytest.raises(ValueError):
    sampling.consistency_times(2, times=(1.0, 1.2), t_start=T_MAX)
  with pytest.raises(ValueError):
    sampling.ode_step(G.F_diffusion, jnp.zeros((1, 1)), 1.0, 0.5, SD, 'rk45')
