"""Multistep sCM (loss.segments = M): segment-aware consistency function, tangent,
loss and sampler, checked on the Gaussian oracle (core/analytic.py)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from scm_jax import config as config_lib
from scm_jax.core import analytic, losses, sampling, segments
from scm_jax.errors import ConfigError
from scm_jax.models import build_model, default_model_config
from scm_jax.train import step as step_lib

SD = 0.5
G = analytic.GaussianData(mu=0.3, s=0.4, sigma_d=SD)


def _points(M, n=256, seed=0):
  """Points with t at least 0.02 past its segment start (F = (.)/sin(t - s) there)."""
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  t = jax.random.uniform(k1, (n,), minval=0.05, maxval=jnp.pi / 2 - 0.02)
  s = segments.segment_start(t, M)
  t = jnp.maximum(t, s + 0.02)
  x_t = jnp.sqrt(G.var(t))[:, None] * jax.random.normal(k2, (n, 2)) + jnp.cos(t)[:, None] * G.mu
  return x_t, t, s


def _tangent(F_fn, x_t, t, s):
  dxdt = G.velocity(x_t, t)
  F_minus, jvp = losses.jvp_F_minus(F_fn, x_t, t, dxdt, SD, tau=t - s)
  return losses.consistency_tangent(F_minus, jvp, dxdt, x_t, t - s, SD, 1.0)


def test_segment_start_and_boundary_condition():
  t = jnp.array([1e-3, 0.39, 0.40, np.pi / 4, 0.8, 1.2, np.pi / 2])
  np.testing.assert_allclose(segments.segment_start(t, 4),
                             np.pi / 8 * np.array([0, 0, 1, 1, 2, 3, 3]), atol=1e-6)
  np.testing.assert_array_equal(segments.segment_start(t, 1), 0)
  x = jnp.ones((7, 2))
  np.testing.assert_allclose(segments.jump(x, 5.0 * x, t, t, SD), x)  # f(x, s) = x


@pytest.mark.parametrize('M', [2, 4])
def test_exact_multistep_consistency_function_has_zero_tangent(M):
  x_t, t, s = _points(M)
  g = _tangent(lambda x, tt: G.F_multistep(x, tt, s), x_t, t, s)
  assert float(jnp.max(jnp.abs(g))) < 2e-5
  # Perturbed: nonzero. The one-step consistency function is not a fixed point either.
  for F_bad in (lambda x, tt: 1.05 * G.F_multistep(x, tt, s),
                lambda x, tt: G.F_multistep(x, tt, s) + 0.05 * x,
                G.F_consistency):
    assert float(jnp.sqrt(jnp.mean(_tangent(F_bad, x_t, t, s)**2))) > 1e-3


@pytest.mark.parametrize('time_derivative', ['jvp', 'discrete'])
def test_loss_is_minimized_by_the_exact_multistep_model(time_derivative):
  """sCD with the exact teacher: the exact M-segment model has zero loss with segments=M
  (discrete: O(dt^2) from the teacher's DDIM step), the 1-segment model does not."""
  batch = {'x': G.mu + G.s * jax.random.normal(jax.random.PRNGKey(3), (256, 2))}
  M = 4

  def loss(F_fn, segs):
    apply_fn = lambda p, x, t, labels, keys: (F_fn(x, t), jnp.zeros_like(t))
    return float(losses.consistency_loss(
        {}, batch, jax.random.PRNGKey(4), 0, apply_fn=apply_fn, sigma_d=SD, p_mean=-1.0,
        p_std=1.4, tangent_warmup_steps=0, tangent_norm=False, adaptive_weight=False,
        dxdt_fn=lambda x_t, t, labels: G.velocity(x_t, t), segments=segs,
        time_derivative=time_derivative, discrete_dt=1e-3)[0])
  exact = lambda x, t: G.F_multistep(x, jnp.maximum(t, 1e-4),
                                     segments.segment_start(t, M))
  assert loss(exact, M) < 1e-7
  assert loss(exact, 1) > 1e-3
  assert loss(G.F_consistency, M) > 1e-3


def test_sampler_follows_the_segments():
  """With the exact multistep model, M deterministic jumps give the exact ODE map
  z -> mu + (s / sigma_d) z at every M."""
  shape = (512, 2)
  key = jax.random.PRNGKey(5)
  exact = G.mu + G.s / SD * SD * jax.random.normal(key, shape)
  for M in (1, 2, 4):
    F_fn = lambda x, t, M=M: G.F_multistep(x, t, segments.segment_start(t, M))
    x = sampling.sample_segments(F_fn, key, shape, SD, M)
    np.testing.assert_allclose(x, exact, atol=1e-4)
  # A wrong model lands elsewhere.
  x = sampling.sample_segments(lambda x, t: 1.05 * G.F_multistep(
      x, t, segments.segment_start(t, 2)), key, shape, SD, 2)
  assert float(jnp.abs(x - exact).max()) > 1e-2


def test_config_checks():
  c = config_lib.base_config('mlp')
  c.loss.segments = 4
  with pytest.raises(ConfigError, match='sample.steps'):
    config_lib.validate_config(c)
  c.sample.steps = (4,)
  config_lib.validate_config(c)
  c.loss.kind = 'diffusion'
  with pytest.raises(ConfigError, match='segments'):
    config_lib.validate_config(c)
  c.loss.kind, c.loss.discrete_dt = 'sct', 0.0
  with pytest.raises(ConfigError, match='discrete_dt'):
    config_lib.validate_config(c)


@pytest.mark.parametrize('time_derivative', ['jvp', 'discrete'])
def test_shared_forward_equals_separate_forward(time_derivative):
  """Both forward paths give the same loss and gradients for multistep / discrete."""
  cfg = default_model_config('mlp')
  cfg.width, cfg.depth, cfg.time_embed_dim, cfg.dropout = 32, 2, 32, 0.3
  model = build_model(cfg)
  params = model.init({'params': jax.random.PRNGKey(0)}, jnp.zeros((4, 2)), jnp.ones(4))['params']
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.PRNGKey(2), p.shape),
                        params)
  c = ml_collections.ConfigDict(dict(
      kind='scd', p_mean=-1.0, p_std=1.4, adaptive_weight=True, num_time_buckets=4,
      tangent_warmup_steps=10, tangent_norm=True, tangent_norm_c=0.1,
      time_derivative=time_derivative, fd_eps=1e-3, discrete_dt=0.02, segments=2,
      shared_forward=True))
  batch = {'x': G.mu + G.s * jax.random.normal(jax.random.PRNGKey(11), (16, 2))}
  dxdt = lambda x_t, t, labels: G.velocity(x_t, t)
  out = {}
  for shared in (True, False):
    c.shared_forward = shared
    loss_fn = losses.make_loss_fn(c, step_lib.model_apply_fn(model), SD, dxdt)
    out[shared] = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
        params, batch, jax.random.PRNGKey(12), 5)
  np.testing.assert_allclose(out[True][0][0], out[False][0][0], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(out[True][1]), jax.tree.leaves(out[False][1])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
