"""Training objectives: the TrigFlow diffusion loss and the sCT/sCD consistency loss.

Both take a model function
    apply_fn(params, x_scaled, t, labels, dropout_key) -> (F, w)
where x_scaled = x_t / sigma_d, F is the network output and w = w_phi(t) the adaptive
log-weight head (Lu & Song 2024, Sec. 4.2), and return `(loss, metrics)`.

The consistency loss uses ONE `jax.jvp` of the stop-gradient model F^- that returns both
F^- and cos(t) sin(t) sigma_d dF^-/dt (Sec. 4, "continuous-time consistency objective").
"""

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from scm_jax.core import trigflow

LOSS_KINDS = ('sct', 'scd', 'diffusion')
CONSISTENCY_KINDS = ('sct', 'scd')  # trained as consistency models (sampled in 1-2 steps)
TIME_DERIVATIVES = ('jvp', 'finite_difference')

ApplyFn = Callable[..., tuple[jax.Array, jax.Array]]
# dxdt_fn(x_t, t, labels) -> dx_t/dt: the teacher PF-ODE drift for sCD.
DxdtFn = Callable[[jax.Array, jax.Array, Optional[jax.Array]], jax.Array]


def per_sample_mean(x):
  """Mean over all non-batch axes: ||x||^2 / D once squared."""
  return jnp.mean(x.reshape(x.shape[0], -1), axis=1)


def per_sample_norm(x):
  """L2 norm of each sample, in float32."""
  x = x.astype(jnp.float32).reshape(x.shape[0], -1)
  return jnp.sqrt(jnp.sum(jnp.square(x), axis=1))


def tangent_warmup(step, warmup_steps):
  """r in the tangent: grows linearly 0 -> 1 over `warmup_steps` (paper: 10k)."""
  if warmup_steps <= 0:
    return jnp.float32(1.0)
  return jnp.minimum(jnp.asarray(step, jnp.float32) / warmup_steps, 1.0)


def normalize_tangent(g, c):
  """Tangent normalization g / (||g|| + c), norm per sample, in float32."""
  norm = per_sample_norm(g)
  return g / trigflow.expand_t(norm + c, g)


def adaptive_weighting(mse, w, enabled):
  """Per-sample loss e^{w} mse - w (Sec. 4.2), or plain mse when disabled.

  Minimizing over w gives e^{w} = 1 / mse, so the weighted loss balances the scale of
  the error across times; its gradient in theta is the unweighted one up to scale.
  """
  if not enabled:
    return mse
  return jnp.exp(w) * mse - w


def time_bucket_stats(t, per_sample, num_buckets):
  """Sums and counts of a per-sample quantity in equal-width buckets of t in [0, pi/2]."""
  ids = jnp.clip((t / trigflow.HALF_PI * num_buckets).astype(jnp.int32), 0, num_buckets - 1)
  onehot = jax.nn.one_hot(ids, num_buckets, dtype=jnp.float32)
  return onehot.T @ per_sample.astype(jnp.float32), jnp.sum(onehot, axis=0)


def _noisy_sample(key, x0, p_mean, p_std, sigma_d):
  """Draws (t, z, x_t) from the time proposal and the TrigFlow forward process."""
  k_t, k_z = jax.random.split(key)
  t = trigflow.sample_t(k_t, (x0.shape[0],), p_mean, p_std, sigma_d)
  z = sigma_d * jax.random.normal(k_z, x0.shape, jnp.float32)
  return t, z, trigflow.add_noise(x0, z, t)


def _common_metrics(loss_i, mse, w, t, adaptive, num_buckets):
  bucket_sum, bucket_count = time_bucket_stats(t, mse, num_buckets)
  metrics = {
      'loss': jnp.mean(loss_i),
      'mse': jnp.mean(mse),
      't_bucket_mse_sum': bucket_sum,
      't_bucket_count': bucket_count,
  }
  if adaptive:
    metrics['weight'] = jnp.mean(jnp.exp(w))
  return metrics


def diffusion_loss(params, batch, key, *, apply_fn: ApplyFn, sigma_d: float,
                   p_mean: float, p_std: float, adaptive_weight: bool = True,
                   num_buckets: int = 8):
  """TrigFlow diffusion (teacher) loss E[e^{w}/D ||sigma_d F - v_t||^2 - w].

  v_t = cos(t) z - sin(t) x0 is the conditional PF-ODE velocity.
  """
  x0, labels = batch['x'], batch.get('label')
  k_noise, k_drop = jax.random.split(key)
  t, z, x_t = _noisy_sample(k_noise, x0, p_mean, p_std, sigma_d)
  F, w = apply_fn(params, x_t / sigma_d, t, labels, k_drop)
  mse = per_sample_mean(jnp.square(sigma_d * F - trigflow.velocity_target(x0, z, t)))
  loss_i = adaptive_weighting(mse, w, adaptive_weight)
  return jnp.mean(loss_i), _common_metrics(loss_i, mse, w, t, adaptive_weight, num_buckets)


def consistency_tangent(F_minus, dF_dt_term, dxt_dt, x_t, t, sigma_d, r):
  """The sCM tangent g (Lu & Song 2024, eq. for the continuous-time objective).

  g = -cos^2(t) (sigma_d F^- - dx_t/dt) - r cos(t) sin(t) x_t - r * jvp,
  with jvp = cos(t) sin(t) sigma_d dF^-/dt as returned by `jvp_F_minus`.
  With the exact consistency model and exact dx_t/dt, g = 0.
  """
  te = trigflow.expand_t(t, x_t)
  cos, sin = jnp.cos(te), jnp.sin(te)
  return (-jnp.square(cos) * (sigma_d * F_minus - dxt_dt)
          - r * cos * sin * x_t - r * dF_dt_term)


def jvp_F_minus(f, x_t, t, dxt_dt, sigma_d, *, time_derivative='jvp', fd_eps=1e-3):
  """Returns (F^-, cos t sin t sigma_d dF^-/dt) with one `jax.jvp` of f(x_scaled, t).

  Primals (x_t / sigma_d, t), tangents (cos t sin t dx_t/dt, cos t sin t sigma_d): the
  chain rule through the input scaling gives exactly the needed total derivative.
  time_derivative='finite_difference' keeps the jvp in x but takes the t-part by a
  central difference (an ablation for kernels without a jvp rule; 2 extra forwards).
  """
  cs = jnp.cos(t) * jnp.sin(t)
  tx = trigflow.expand_t(cs, x_t) * dxt_dt
  x_in = x_t / sigma_d
  if time_derivative == 'jvp':
    return jax.jvp(f, (x_in, t), (tx, cs * sigma_d))
  if time_derivative == 'finite_difference':
    F_minus, jvp_x = jax.jvp(f, (x_in, t), (tx, jnp.zeros_like(t)))
    dF_dt = (f(x_in, t + fd_eps) - f(x_in, t - fd_eps)) / (2 * fd_eps)
    return F_minus, jvp_x + trigflow.expand_t(cs * sigma_d, x_t) * dF_dt
  raise ValueError(f'unknown time_derivative {time_derivative!r}; use one of {TIME_DERIVATIVES}')


def consistency_loss(params, batch, key, step, *, apply_fn: ApplyFn, sigma_d: float,
                     p_mean: float, p_std: float, tangent_warmup_steps: int = 10000,
                     tangent_norm: bool = True, tangent_norm_c: float = 0.1,
                     adaptive_weight: bool = True, dxdt_fn: Optional[DxdtFn] = None,
                     time_derivative: str = 'jvp', fd_eps: float = 1e-3,
                     num_buckets: int = 8):
  """sCT (dxdt_fn=None: dx_t/dt = v_t from data) or sCD (dxdt_fn = teacher drift) loss.

  loss = E[e^{w}/D ||F_theta - F^- - g||^2 - w], target F^- + g under stop_gradient.
  Dropout uses the same key in the jvp pass and in the theta pass, so F^- and F_theta
  differ only by the stop-gradient on the parameters.
  """
  x0, labels = batch['x'], batch.get('label')
  # Guidance-conditioned sCD student (App. G.2): its per-example input s (drawn in the
  # train step) is also the scale of the guided teacher.
  cond = {'guidance': batch['guidance']} if 'guidance' in batch else {}
  k_noise, k_drop = jax.random.split(key)
  t, z, x_t = _noisy_sample(k_noise, x0, p_mean, p_std, sigma_d)
  if dxdt_fn is None:
    dxt_dt = trigflow.velocity_target(x0, z, t)
  else:
    dxt_dt = jax.lax.stop_gradient(dxdt_fn(x_t, t, labels, **cond))

  params_sg = jax.lax.stop_gradient(params)
  f = lambda x_in, t_in: apply_fn(params_sg, x_in, t_in, labels, k_drop, **cond)[0]
  F_minus, dF_dt_term = jvp_F_minus(f, x_t, t, dxt_dt, sigma_d,
                                    time_derivative=time_derivative, fd_eps=fd_eps)
  r = tangent_warmup(step, tangent_warmup_steps)
  g = consistency_tangent(F_minus, dF_dt_term, dxt_dt, x_t, t, sigma_d, r)
  g_norm = per_sample_norm(g)
  if tangent_norm:
    g = normalize_tangent(g, tangent_norm_c)
  target = jax.lax.stop_gradient(F_minus + g)

  F, w = apply_fn(params, x_t / sigma_d, t, labels, k_drop, **cond)
  mse = per_sample_mean(jnp.square(F.astype(jnp.float32) - target))
  loss_i = adaptive_weighting(mse, w, adaptive_weight)
  metrics = _common_metrics(loss_i, mse, w, t, adaptive_weight, num_buckets)
  metrics['tangent_norm'] = jnp.mean(g_norm)
  metrics['tangent_warmup'] = r
  return jnp.mean(loss_i), metrics


def make_loss_fn(loss_config: Any, apply_fn: ApplyFn, sigma_d: float,
                 dxdt_fn: Optional[DxdtFn] = None):
  """Binds a loss ConfigDict: returns loss_fn(params, batch, key, step) -> (loss, metrics)."""
  c = loss_config
  common = dict(apply_fn=apply_fn, sigma_d=sigma_d, p_mean=c.p_mean, p_std=c.p_std,
                adaptive_weight=c.adaptive_weight, num_buckets=c.num_time_buckets)
  if c.kind == 'diffusion':
    return lambda params, batch, key, step: diffusion_loss(params, batch, key, **common)
  if c.kind in CONSISTENCY_KINDS:
    if c.kind == 'scd' and dxdt_fn is None:
      raise ValueError('loss.kind="scd" needs a teacher (dxdt_fn)')
    kwargs = dict(common, tangent_warmup_steps=c.tangent_warmup_steps,
                  tangent_norm=c.tangent_norm, tangent_norm_c=c.tangent_norm_c,
                  dxdt_fn=dxdt_fn if c.kind == 'scd' else None,
                  time_derivative=c.time_derivative, fd_eps=c.fd_eps)
    return lambda params, batch, key, step: consistency_loss(params, batch, key, step, **kwargs)
  raise ValueError(f'unknown loss.kind {c.kind!r}; use one of {LOSS_KINDS}')
