"""The sCT/sCD tangent and losses: Gaussian oracle, jvp vs finite differences, dropout."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from scm_jax.core import analytic, losses, trigflow
from scm_jax.models import build_model, default_model_config
from scm_jax.train import step as step_lib

SD = 0.5
G = analytic.GaussianData(mu=0.3, s=0.4, sigma_d=SD)


def _points(n=256, d=2, seed=0):
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  t = jax.random.uniform(k1, (n,), minval=0.05, maxval=jnp.pi / 2 - 0.02)
  x_t = jnp.sqrt(G.var(t))[:, None] * jax.random.normal(k2, (n, d)) + jnp.cos(t)[:, None] * G.mu
  return x_t, t


def _tangent(F_fn, x_t, t, dxdt, r=1.0):
  F_minus, jvp = losses.jvp_F_minus(F_fn, x_t, t, dxdt, SD)
  return losses.consistency_tangent(F_minus, jvp, dxdt, x_t, t, SD, r)


def test_tangent_vanishes_for_exact_consistency_model():
  x_t, t = _points()
  g = _tangent(G.F_consistency, x_t, t, G.velocity(x_t, t))
  assert float(jnp.max(jnp.abs(g))) < 1e-5


@pytest.mark.parametrize('perturb', [
    lambda F, x, t: 1.05 * F,
    lambda F, x, t: F + 0.1 * jnp.sin(t)[:, None],
    lambda F, x, t: F + 0.05 * x,
])
def test_tangent_nonzero_for_perturbed_model(perturb):
  x_t, t = _points()
  F_bad = lambda x, tt: perturb(G.F_consistency(x, tt), x, tt)
  g = _tangent(F_bad, x_t, t, G.velocity(x_t, t))
  assert float(jnp.sqrt(jnp.mean(g**2))) > 1e-3


def test_tangent_nonzero_with_wrong_teacher_velocity():
  x_t, t = _points()
  g = _tangent(G.F_consistency, x_t, t, 0.9 * G.velocity(x_t, t))
  assert float(jnp.sqrt(jnp.mean(g**2))) > 1e-3


def test_tangent_is_cos_t_times_df_dt():
  """g = cos t * d/dt f(x_t, t) along the given dx_t/dt, for any model."""
  x_t, t = _points(d=2)
  dxdt = G.velocity(x_t, t) + 0.1  # not the exact ODE: g must be nonzero
  F_fn = lambda x, tt: 0.5 * jnp.tanh(x) * jnp.cos(tt)[:, None] + 0.2
  g = _tangent(F_fn, x_t, t, dxdt)
  f_along = lambda tt: trigflow.consistency_fn(
      x_t + (tt - t)[:, None] * dxdt, F_fn((x_t + (tt - t)[:, None] * dxdt) / SD, tt), tt, SD)
  df = jax.jvp(f_along, (t,), (jnp.ones_like(t),))[1]
  np.testing.assert_allclose(g, jnp.cos(t)[:, None] * df, atol=1e-5)
  assert float(jnp.abs(g).mean()) > 1e-2


def _mlp(dropout=0.0, width=32, num_classes=0):
  model, params = _mlp_model(dropout, width, num_classes)
  return step_lib.model_apply_fn(model), params


def _mlp_model(dropout=0.0, width=32, num_classes=0):
  cfg = default_model_config('mlp')
  cfg.width, cfg.depth, cfg.dropout, cfg.time_embed_dim = width, 2, dropout, 32
  cfg.num_classes = num_classes
  model = build_model(cfg)
  x = jnp.zeros((4, 2))
  params = model.init({'params': jax.random.PRNGKey(0), 'dropout': jax.random.PRNGKey(1)},
                      x, jnp.ones(4))['params']
  # Perturb the zero-initialized layers (output, logvar head) so F and w are not constant.
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.PRNGKey(2), p.shape),
                        params)
  return model, params


def test_jvp_time_derivative_matches_central_finite_difference():
  apply_fn, params = _mlp()
  x_t, t = _points(n=32)
  dxdt = G.velocity(x_t, t)
  keys = losses.example_keys(jax.random.PRNGKey(0), 32)
  f = lambda x, tt: apply_fn(params, x, tt, None, keys)[0]
  F_minus, jvp = losses.jvp_F_minus(f, x_t, t, dxdt, SD)
  h = 1e-3
  path = lambda s: f((x_t + s * dxdt) / SD, t + s)
  dF_dt = (path(h) - path(-h)) / (2 * h)
  expected = (jnp.cos(t) * jnp.sin(t) * SD)[:, None] * dF_dt
  np.testing.assert_allclose(F_minus, f(x_t / SD, t), atol=1e-6)
  np.testing.assert_allclose(jvp, expected, rtol=2e-2, atol=2e-4)
  # The finite-difference ablation computes the same quantity.
  _, jvp_fd = losses.jvp_F_minus(f, x_t, t, dxdt, SD, time_derivative='finite_difference')
  np.testing.assert_allclose(jvp_fd, jvp, rtol=2e-2, atol=2e-4)


def _sct_kwargs(apply_fn, **kw):
  base = dict(apply_fn=apply_fn, sigma_d=SD, p_mean=-1.0, p_std=1.4, tangent_warmup_steps=0,
              tangent_norm=False, adaptive_weight=False)
  base.update(kw)
  return base


def test_loss_value_is_tangent_norm_and_dropout_key_shared():
  """At the loss's own parameters F_theta = F^- in value, so loss = mean ||g||^2 / D.

  With dropout this holds only if the jvp pass and the theta pass share the dropout key.
  """
  apply_fn, params = _mlp(dropout=0.5)
  batch = {'x': G.mu + G.s * jax.random.normal(jax.random.PRNGKey(3), (64, 2))}
  key = jax.random.PRNGKey(4)
  loss, m = losses.consistency_loss(params, batch, key, 0, **_sct_kwargs(apply_fn))
  # Recompute g exactly as the loss does, from the same per-example keys.
  k_noise, k_drop = losses.split_keys(losses.example_keys(key, 64))
  t, z, x_t = losses._noisy_sample(k_noise, batch['x'], -1.0, 1.4, SD)
  f = lambda x, tt: apply_fn(params, x, tt, None, k_drop)[0]
  g = _tangent(f, x_t, t, trigflow.velocity_target(batch['x'], z, t))
  np.testing.assert_allclose(loss, jnp.mean(jnp.sum(g**2, 1) / 2), rtol=1e-4)
  assert float(m['tangent_norm']) > 0
  # Different dropout keys in the theta pass would change the value.
  f_other = lambda x, tt: apply_fn(params, x, tt, None, losses.example_keys(key, 64))[0]
  assert float(jnp.abs(f(x_t / SD, t) - f_other(x_t / SD, t)).max()) > 1e-3


def test_tangent_normalization_bounds_the_target_step():
  apply_fn, params = _mlp()
  batch = {'x': 3.0 * jax.random.normal(jax.random.PRNGKey(5), (64, 2))}
  loss, _ = losses.consistency_loss(params, batch, jax.random.PRNGKey(6), 0,
                                    **_sct_kwargs(apply_fn, tangent_norm=True))
  # ||g / (||g|| + c)|| < 1 for every sample, so mean ||.||^2 / D < 1 / D.
  assert 0 < float(loss) < 0.5


def test_tangent_warmup_schedule():
  assert float(losses.tangent_warmup(0, 100)) == 0.0
  assert float(losses.tangent_warmup(50, 100)) == pytest.approx(0.5)
  assert float(losses.tangent_warmup(500, 100)) == 1.0
  assert float(losses.tangent_warmup(0, 0)) == 1.0


def test_adaptive_weighting_optimum_and_gradient_direction():
  mse = jnp.array([0.5, 2.0])
  # d/dw (e^w mse - w) = 0 at w = -log(mse).
  w_star = -jnp.log(mse)
  grad = jax.grad(lambda w: jnp.sum(losses.adaptive_weighting(mse, w, True)))(w_star)
  np.testing.assert_allclose(grad, 0.0, atol=1e-6)
  np.testing.assert_allclose(losses.adaptive_weighting(mse, w_star, False), mse)


def test_consistency_gradient_direction_is_scaled_by_adaptive_weight():
  """With a constant weight head, the weighted theta-gradient is e^w times the plain one."""
  apply_fn, params = _mlp()
  w0 = 0.7

  def apply_const_w(p, x, t, labels, key):
    F, _ = apply_fn(p, x, t, labels, key)
    return F, jnp.full((x.shape[0],), w0)
  batch = {'x': G.mu + G.s * jax.random.normal(jax.random.PRNGKey(7), (32, 2))}
  key = jax.random.PRNGKey(8)
  grad = lambda adaptive: jax.grad(lambda p: losses.consistency_loss(
      p, batch, key, 0, **_sct_kwargs(apply_const_w, adaptive_weight=adaptive))[0])(params)
  g_w, g_plain = grad(True), grad(False)
  for a, b in zip(jax.tree.leaves(g_w), jax.tree.leaves(g_plain)):
    np.testing.assert_allclose(a, np.exp(w0) * b, rtol=1e-4, atol=1e-7)


def test_diffusion_loss_is_minimized_by_the_exact_teacher():
  batch = {'x': G.mu + G.s * jax.random.normal(jax.random.PRNGKey(9), (4096, 2))}
  key = jax.random.PRNGKey(10)

  def make(scale):
    return lambda p, x, t, labels, k: (scale * G.F_diffusion(x, t), jnp.zeros(x.shape[0]))
  vals = [float(losses.diffusion_loss(None, batch, key, apply_fn=make(s), sigma_d=SD,
                                      p_mean=-1.0, p_std=1.4, adaptive_weight=False)[0])
          for s in (0.9, 1.0, 1.1)]
  assert vals[1] < vals[0] and vals[1] < vals[2]


def test_time_bucket_stats_partition_the_batch():
  t = jnp.array([0.0, 0.1, 0.8, 1.5, jnp.pi / 2])
  sums, counts = losses.time_bucket_stats(t, jnp.array([1., 2., 3., 4., 5.]), 4)
  np.testing.assert_allclose(counts, [2, 0, 1, 2])
  np.testing.assert_allclose(sums, [3, 0, 3, 9])


def test_make_loss_fn_dispatch():
  apply_fn, params = _mlp()
  c = ml_collections.ConfigDict(dict(
      kind='sct', p_mean=-1.0, p_std=1.4, adaptive_weight=True, num_time_buckets=4,
      tangent_warmup_steps=10, tangent_norm=True, tangent_norm_c=0.1,
      time_derivative='jvp', fd_eps=1e-3))
  batch = {'x': jnp.ones((8, 2))}
  loss, m = losses.make_loss_fn(c, apply_fn, SD)(params, batch, jax.random.PRNGKey(0), 5)
  assert np.isfinite(loss) and float(m['tangent_warmup']) == pytest.approx(0.5)
  c.kind = 'diffusion'
  loss, m = losses.make_loss_fn(c, apply_fn, SD)(params, batch, jax.random.PRNGKey(0), 5)
  assert np.isfinite(loss) and 'tangent_norm' not in m
  c.kind = 'scd'
  with pytest.raises(ValueError, match='teacher'):
    losses.make_loss_fn(c, apply_fn, SD)


def _unet_model(dropout=0.2, num_classes=3):
  cfg = default_model_config('unet')
  cfg.update(channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
             num_heads=1, time_embed_dim=16, logvar_channels=8, dropout=dropout,
             num_classes=num_classes)
  model = build_model(cfg)
  params = model.init({'params': jax.random.PRNGKey(0)}, jnp.zeros((1, 8, 8, 1)),
                      jnp.ones(1), jnp.zeros(1, jnp.int32))['params']
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.PRNGKey(2), p.shape),
                        params)
  return model, params


@pytest.mark.parametrize('net,kind,time_derivative', [
    ('mlp', 'sct', 'jvp'), ('mlp', 'sct', 'finite_difference'), ('mlp', 'scd', 'jvp'),
    ('unet', 'sct', 'jvp'),
    pytest.param('unet', 'scd', 'finite_difference', marks=pytest.mark.slow)])
def test_shared_forward_equals_separate_forward(net, kind, time_derivative):
  """loss.shared_forward: the same loss, metrics and gradients (adaptive-weight head
  included) as the jvp of F^- plus a second forward, with dropout and labels."""
  if net == 'mlp':
    model, params = _mlp_model(dropout=0.3, num_classes=3)
    x = G.mu + G.s * jax.random.normal(jax.random.PRNGKey(11), (16, 2))
  else:
    model, params = _unet_model()
    x = 0.5 * jax.random.normal(jax.random.PRNGKey(11), (8, 8, 8, 1))
  apply_fn, teacher_fn = step_lib.model_apply_fn(model), step_lib.model_apply_fn(model, False)
  batch = {'x': x, 'label': jnp.arange(x.shape[0]) % 4}  # 3 = the null class
  teacher_params = jax.tree.map(lambda p: 0.9 * p, params)
  # An sCD teacher with classifier-free guidance, from another set of weights.
  dxdt = lambda x_t, t, labels: SD * (
      1.5 * teacher_fn(teacher_params, x_t / SD, t, labels, None)[0]
      - 0.5 * teacher_fn(teacher_params, x_t / SD, t, jnp.full_like(labels, 3), None)[0])
  c = ml_collections.ConfigDict(dict(
      kind=kind, p_mean=-1.0, p_std=1.4, adaptive_weight=True, num_time_buckets=4,
      tangent_warmup_steps=10, tangent_norm=True, tangent_norm_c=0.1,
      time_derivative=time_derivative, fd_eps=1e-3, shared_forward=True))
  out = {}
  for shared in (True, False):
    c.shared_forward = shared
    loss_fn = losses.make_loss_fn(c, apply_fn, SD, dxdt if kind == 'scd' else None)
    out[shared] = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
        params, batch, jax.random.PRNGKey(12), 5)
  (loss_a, m_a), g_a = out[True]
  (loss_b, m_b), g_b = out[False]
  np.testing.assert_allclose(loss_a, loss_b, rtol=1e-5, atol=1e-7)
  for name in m_a:
    np.testing.assert_allclose(m_a[name], m_b[name], rtol=1e-5, atol=1e-7, err_msg=name)
  scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g_b))
  for a, b in zip(jax.tree.leaves(g_a), jax.tree.leaves(g_b)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)
  assert float(jnp.abs(g_a['logvar']['dense']['kernel']).max()) > 1e-4  # w_phi learns
