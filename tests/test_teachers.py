"""sCD teachers: parameterization wrappers against the Gaussian oracle, guidance, the
drift as a jit argument, and sCD with the exact teacher converging to the exact
consistency function."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import toy2d_scd
from scm_jax.core import analytic, teachers, trigflow
from scm_jax.data import toy2d
from scm_jax.train.experiment import Experiment

SD = 0.5
G = analytic.GaussianData(mu=0.3, s=0.4, sigma_d=SD)


def _points(n=512, d=3, t_max=1.56, seed=0):
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  t = jax.random.uniform(k1, (n,), minval=0.02, maxval=t_max)
  x_t = jnp.sqrt(G.var(t))[:, None] * jax.random.normal(k2, (n, d)) + jnp.cos(t)[:, None] * G.mu
  return x_t, t


# Every parameterization of the exact model: all must give the exact TrigFlow F.
WRAPPED = {
    'edm': teachers.from_edm_denoiser(lambda p, x, sigma, l: G.edm_denoiser(x, sigma), SD),
    'vp': teachers.from_vp_eps(lambda p, x, a, s, l: G.vp_eps(x, a, s), SD),
    'flow_matching': teachers.from_flow_matching(lambda p, x, s, l: G.fm_velocity(x, s), SD),
    # Noise at 0, data at 1 (x_tau = tau x0 + (1 - tau) eps, u = x0 - eps).
    'flow_matching_data_at_one': teachers.from_flow_matching(
        lambda p, x, tau, l: -G.fm_velocity(x, 1.0 - tau), SD, data_at_one=True),
    'vp_linear_sde_time': teachers.from_vp_eps(
        # A model indexed by VP-SDE time: recover alpha from tau to call the oracle.
        lambda p, x, a, s, l: G.vp_eps(x, *_vp_alpha_s(teachers.vp_linear_time(a))), SD),
}


def _vp_alpha_s(tau, beta_min=0.1, beta_max=20.0):
  log_alpha = -0.25 * tau**2 * (beta_max - beta_min) - 0.5 * tau * beta_min
  alpha = jnp.exp(log_alpha)
  return alpha, jnp.sqrt(1.0 - alpha**2)


@pytest.mark.parametrize('name', sorted(WRAPPED))
def test_wrapper_gives_the_exact_velocity(name):
  x_t, t = _points()
  F = WRAPPED[name](None, x_t / SD, t, None)
  np.testing.assert_allclose(F, G.F_diffusion(x_t / SD, t), atol=5e-5)
  drift = teachers.make_dxdt_fn(WRAPPED[name], None, SD)
  np.testing.assert_allclose(drift(x_t, t, None), G.velocity(x_t, t), atol=3e-5)


@pytest.mark.parametrize('name', sorted(WRAPPED))
def test_wrapper_is_finite_at_the_prior_and_capped_beyond_sigma_max(name):
  """t = pi/2 (the PF-ODE start) is singular for EDM/VP/FM; above sigma_max = 80 the
  wrapper holds the teacher's x0 prediction, which there is the data mean to <1%."""
  x = jnp.linspace(-2.0, 2.0, 12).reshape(4, 3)
  for t in (jnp.pi / 2, 1.567):
    tt = jnp.full((4,), t)
    F = WRAPPED[name](None, x, tt, None)
    assert bool(jnp.all(jnp.isfinite(F)))
    np.testing.assert_allclose(F, G.F_diffusion(x, tt), atol=0.01)


def test_uncapped_edm_wrapper_breaks_at_the_prior():
  """Why the cap exists: in float32 tan(pi/2) < 0, so a real EDM network (which embeds
  c_noise = log(sigma) / 4) gets NaN at the PF-ODE start without it."""
  def edm_net(p, x, sigma, l):
    c_noise = jnp.log(sigma) / 4
    return G.edm_denoiser(x, sigma) + 0.0 * c_noise[:, None]
  x, t = jnp.ones((4, 3)), jnp.full((4,), jnp.pi / 2)
  assert not bool(jnp.all(jnp.isfinite(teachers.from_edm_denoiser(edm_net, SD, None)(None, x, t, None))))
  assert bool(jnp.all(jnp.isfinite(teachers.from_edm_denoiser(edm_net, SD)(None, x, t, None))))


def test_vp_time_helpers_invert_their_schedules():
  tau = jnp.linspace(1e-3, 1.0, 50)
  alpha, _ = _vp_alpha_s(tau)
  np.testing.assert_allclose(teachers.vp_linear_time(alpha), tau, rtol=1e-4, atol=1e-5)
  betas = np.linspace(1e-4, 0.02, 1000)
  abar = np.cumprod(1.0 - betas)
  i = jnp.array([0.0, 10.0, 123.0, 500.0, 999.0])
  alpha_i = jnp.sqrt(jnp.asarray(abar)[i.astype(int)])
  np.testing.assert_allclose(teachers.ddpm_timestep(alpha_i, abar), i, atol=1e-2)


def _label_model(params, x, t, labels):
  """A toy conditional F: class k shifts the output by params[k] (null = last row)."""
  return jnp.tanh(x) * jnp.cos(t)[:, None] + params[labels]


def test_guidance_mixes_conditional_and_null_outputs():
  params = jnp.array([[1.0, -1.0], [0.5, 2.0], [0.0, 0.0]])  # 2 classes + null
  x, t = jnp.ones((4, 2)), jnp.full((4,), 0.7)
  labels = jnp.array([0, 1, 1, 0])
  F_c = _label_model(params, x, t, labels)
  F_u = _label_model(params, x, t, jnp.full((4,), 2))
  calls = []
  counting = lambda p, x, t, l: calls.append(len(x)) or _label_model(p, x, t, l)
  np.testing.assert_array_equal(teachers.guided(counting, 1.0, 2)(params, x, t, labels), F_c)
  assert calls == [4]  # w = 1 is the conditional model itself: one pass, no null batch
  for w in (0.0, 2.5):
    F_w = teachers.guided(_label_model, w, 2)(params, x, t, labels)
    np.testing.assert_allclose(F_w, F_u + w * (F_c - F_u), atol=1e-6)
  np.testing.assert_allclose(teachers.guided(_label_model, 0.0, 2)(params, x, t, labels), F_u)
  # A per-example scale given at the call (the guidance-conditioned student's s) wins.
  s = jnp.array([1.0, 1.5, 2.0, 3.0])
  F_s = teachers.guided(_label_model, 1.0, 2)(params, x, t, labels, guidance=s)
  np.testing.assert_allclose(F_s, F_u + s[:, None] * (F_c - F_u), atol=1e-6)


def _guide_model(params, x, t, labels=None):
  """Another toy F with its own parameter structure: a conditional guide uses the
  labels (autoguidance), an unconditional one (EDM2's CFG guide) gets labels=None."""
  out = params['a'] * jnp.sin(x) + params['b'] * t[:, None]
  return out if labels is None else out + 0.3 * labels[:, None].astype(jnp.float32)


def test_guidance_by_a_guiding_network_is_the_edm2_formula_in_F_and_in_D():
  """D = D_guide + w (D_main - D_guide) (EDM2), computed on F: for a conditional and an
  unconditional guide, a fixed and a per-example w; the denoisers x0 = cos t x_t -
  sin t sigma_d F of the two networks mix the same way; w = 1 never runs the guide."""
  main = jnp.array([[1.0, -1.0], [0.5, 2.0], [0.0, 0.0]])
  guide = {'a': jnp.array([0.7, -0.2]), 'b': jnp.float32(1.3)}
  params = {'main': main, 'guide': guide}
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 2))
  t, labels = jnp.array([0.2, 0.7, 1.1, 1.5]), jnp.array([0, 1, 1, 0])
  F_m = _label_model(main, x, t, labels)
  w_each = jnp.array([0.0, 1.5, 2.0, 3.0])
  for conditional in (True, False):
    F_g = _guide_model(guide, x, t, labels if conditional else None)
    assert float(jnp.abs(F_g - F_m).max()) > 0.1
    for fixed, w in ((2.5, 2.5), (1.0, w_each)):
      F = teachers.guided_by_network(_label_model, _guide_model, fixed, conditional)
      got = F(params, x, t, labels, guidance=None if fixed != 1.0 else w)
      np.testing.assert_allclose(got, F_g + jnp.reshape(w, (-1, 1)) * (F_m - F_g), atol=1e-6)
      D = lambda F_: trigflow.x0_from_F(SD * x, F_, t, SD)
      np.testing.assert_allclose(D(got), D(F_g) + jnp.reshape(w, (-1, 1)) * (D(F_m) - D(F_g)),
                                 atol=1e-6)
  calls = []
  counting = lambda p, x, t, l: calls.append(1) or _guide_model(p, x, t, l)
  F1 = teachers.guided_by_network(_label_model, counting, 1.0)(params, x, t, labels)
  np.testing.assert_array_equal(F1, F_m)
  assert not calls
  # The drift of a guided teacher carries both networks' weights as leaves.
  drift = teachers.make_dxdt_fn(teachers.guided_by_network(_label_model, _guide_model, 2.0),
                                params, SD)
  assert len(jax.tree_util.tree_leaves(drift)) == 3
  np.testing.assert_allclose(
      drift(SD * x, t, labels),
      SD * (_guide_model(guide, x, t, labels) + 2.0 * (F_m - _guide_model(guide, x, t, labels))),
      atol=1e-6)


def test_drift_carries_teacher_params_as_jit_arguments():
  """The teacher's weights are pytree leaves of the drift, so jit takes them as
  arguments: the program does not grow with the teacher and is reused across teachers."""
  big = jax.random.normal(jax.random.PRNGKey(0), (3, 4096))
  drift = teachers.make_dxdt_fn(lambda p, x, t, l: x * p[0, :2] + p[1, :2], big, SD)
  assert teachers.has_params(drift)
  assert not teachers.has_params(teachers.make_dxdt_fn(WRAPPED['edm'], None, SD))
  f = jax.jit(lambda d, x, t: d(x, t, None))
  x, t = jnp.ones((8, 2)), jnp.full((8,), 0.5)
  hlo = f.lower(drift, x, t).as_text()
  assert len(hlo) < 10_000  # a baked-in constant of 3x4096 floats would be ~100 KB
  np.testing.assert_allclose(f(drift, x, t), SD * (x / SD * big[0, :2] + big[1, :2]), rtol=1e-6)


def test_scd_with_exact_teacher_learns_exact_consistency_function():
  """Gaussian oracle: sCD with the analytic teacher drives the student's consistency
  function f(x_t, t) towards the closed form; the RMS error falls by over 15x."""
  c = toy2d_scd.get_config()
  c.model.width, c.model.depth, c.model.time_embed_dim, c.model.logvar_channels = 64, 2, 32, 16
  c.loss.tangent_warmup_steps = 100
  c.teacher.init_student = False
  c.optim.lr, c.optim.warmup_steps, c.optim.schedule = 2e-3, 0, 'cosine'
  c.train.num_steps, c.train.batch_size, c.data.prefetch = 600, 256, 0
  source = toy2d.make_toy2d('gaussian', 'train', mean=G.mu, std=G.s, num_train=20000)
  exact = lambda p, x, t, l: G.F_diffusion(x, t)
  exp = Experiment(c, dxdt_fn=teachers.make_dxdt_fn(exact, None, SD), source=source)

  k1, k2 = jax.random.split(jax.random.PRNGKey(7))
  t = trigflow.sample_t(k1, (4096,), c.loss.p_mean, c.loss.p_std, SD)
  x_t = jnp.sqrt(G.var(t))[:, None] * jax.random.normal(k2, (4096, 2)) + jnp.cos(t)[:, None] * G.mu

  def rms_error(params):
    F = exp.model.apply({'params': params}, x_t / SD, t)[0]
    f = trigflow.consistency_fn(x_t, F, t, SD)
    return float(jnp.sqrt(jnp.mean(jnp.square(f - G.consistency(x_t, t)))))

  state = exp.init_state()
  before = rms_error(state.params)
  state, history = exp.train(state, c.train.num_steps)
  after = rms_error(state.params)
  assert all(h['skipped'] == 0 for h in history)
  assert after < before / 15, (before, after)
