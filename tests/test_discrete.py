"""Discrete-time sCM (loss.time_derivative='discrete', Appendix E): as dt -> 0 the loss
and its gradient converge to the jvp ones at first order (a backward difference)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scm_jax.core import analytic, losses
from scm_jax.models import build_model, default_model_config
from scm_jax.train import step as step_lib

SD = 0.5
G = analytic.GaussianData(mu=0.3, s=0.4, sigma_d=SD)
DTS = (0.02, 0.01, 0.005)


def _mlp():
  cfg = default_model_config('mlp')
  cfg.width, cfg.depth, cfg.time_embed_dim = 32, 2, 32
  model = build_model(cfg)
  params = model.init({'params': jax.random.PRNGKey(0)}, jnp.zeros((4, 2)), jnp.ones(4))['params']
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.PRNGKey(2), p.shape),
                        params)
  return step_lib.model_apply_fn(model), params


def _oracle():
  """The exact Gaussian consistency model, perturbed along two scalar parameters (so
  the gradient is defined); w = 0. Its F is 0/0 at t = 0 (where f = x whatever F is,
  the discrete target's t' = 0 for t < dt), so F is taken at t >= 1e-4 there."""
  def apply_fn(p, x, t, labels, keys):
    F = p['a'] * G.F_consistency(x, jnp.maximum(t, 1e-4)) + p['b'] * jnp.sin(t)[:, None] * x
    return F, jnp.zeros_like(t)
  return apply_fn, {'a': jnp.float32(1.0), 'b': jnp.float32(0.2)}


def _loss_and_grad_fn(apply_fn, time_derivative, kind, **kw):
  """jitted (params, dt) -> (loss, flat gradient); tangent normalization off so that the
  loss is mean ||g||^2 / D, first order in g's error."""
  batch = {'x': G.mu + G.s * jax.random.normal(jax.random.PRNGKey(3), (256, 2))}
  dxdt = (lambda x_t, t, labels: G.velocity(x_t, t)) if kind == 'scd' else None

  def fn(params, dt):
    loss_fn = lambda p: losses.consistency_loss(
        p, batch, jax.random.PRNGKey(4), 5, apply_fn=apply_fn, sigma_d=SD, p_mean=-1.0,
        p_std=1.4, dxdt_fn=dxdt, time_derivative=time_derivative, discrete_dt=dt,
        tangent_norm=False, **kw)
    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return loss, jnp.concatenate([g.ravel() for g in jax.tree.leaves(grads)])
  return jax.jit(fn)


@pytest.mark.parametrize('net,kind,warmup,shared', [
    ('mlp', 'sct', 0, True), ('mlp', 'scd', 10, False), ('oracle', 'scd', 0, True),
    ('oracle', 'sct', 10, False)])
def test_discrete_converges_to_jvp_at_first_order(net, kind, warmup, shared):
  apply_fn, params = _mlp() if net == 'mlp' else _oracle()
  kw = dict(kind=kind, tangent_warmup_steps=warmup, shared_forward=shared)  # r = 1 or 0.5
  loss_j, grad_j = _loss_and_grad_fn(apply_fn, 'jvp', **kw)(params, 0.01)
  discrete = _loss_and_grad_fn(apply_fn, 'discrete', **kw)
  errs = []
  for dt in DTS:
    loss_d, grad_d = discrete(params, jnp.float32(dt))
    errs.append((abs(float(loss_d - loss_j)) / abs(float(loss_j)),
                 float(jnp.linalg.norm(grad_d - grad_j) / jnp.linalg.norm(grad_j))))
  errs = np.array(errs)
  assert errs[-1].max() < 0.05, errs          # close at small dt
  ratios = errs[:-1] / errs[1:]
  # Halving dt halves the gradient's error: O(dt).
  assert np.all((ratios[:, 1] > 1.6) & (ratios[:, 1] < 2.5)), (errs, ratios)
  # The loss is a batch mean of ||g||^2 whose first-order terms partly cancel: its
  # error falls at least linearly in dt (err / dt does not grow).
  per_dt = errs[:, 0] / np.array(DTS)
  assert np.all(ratios[:, 0] > 1.6) and np.all(per_dt[1:] <= 1.1 * per_dt[0]), errs


def test_discrete_tangent_of_exact_sct_path_is_the_finite_difference():
  """At r = 1 the discrete tangent is cos t (f^-(x_t, t) - f^-(x_{t'}, t')) / dt with
  x_{t'} on the same (x0, z) path: recomputed here from the model directly."""
  apply_fn, params = _mlp()
  x0 = G.mu + G.s * jax.random.normal(jax.random.PRNGKey(5), (64, 2))
  z = SD * jax.random.normal(jax.random.PRNGKey(6), (64, 2))
  t = jax.random.uniform(jax.random.PRNGKey(7), (64,), minval=0.1, maxval=1.5)
  dt = 0.05
  x_t = jnp.cos(t)[:, None] * x0 + jnp.sin(t)[:, None] * z
  v = jnp.cos(t)[:, None] * z - jnp.sin(t)[:, None] * x0
  x_prev, t_prev = losses.previous_point(x_t, t, v, jnp.zeros_like(t), dt)
  np.testing.assert_allclose(
      x_prev, jnp.cos(t - dt)[:, None] * x0 + jnp.sin(t - dt)[:, None] * z, atol=1e-6)
  f = lambda x, tt: apply_fn(params, x / SD, tt, None, None)[0]
  cons = lambda x, tt: jnp.cos(tt)[:, None] * x - jnp.sin(tt)[:, None] * SD * f(x, tt)
  J = losses.discrete_time_term(f(x_t, t), f(x_prev, t_prev), x_t, x_prev, v, t, t_prev, SD)
  g = losses.consistency_tangent(f(x_t, t), J, v, x_t, t, SD, 1.0)
  expected = jnp.cos(t)[:, None] * (cons(x_t, t) - cons(x_prev, t_prev)) / dt
  np.testing.assert_allclose(g, expected, rtol=1e-3, atol=1e-4)
