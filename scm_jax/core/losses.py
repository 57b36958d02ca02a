"""Training objectives: the TrigFlow diffusion loss and the sCT/sCD consistency loss.

Both take a model function
    apply_fn(params, x_scaled, t, labels, dropout_keys) -> (F, w)
where x_scaled = x_t / sigma_d, F is the network output, w = w_phi(t) the adaptive
log-weight head (Lu & Song 2024, Sec. 4.2) and dropout_keys holds one key per example
[B, 2], and return `(loss, metrics)`.

Randomness is per example: the losses take a key, or one key per example, and example
i's time, noise and dropout come from its own key alone, so they do not depend on the
batch (or microbatch, see train/step.py) the example is in.

The consistency loss uses ONE `jax.jvp` of the network F that returns both F and
cos(t) sin(t) sigma_d dF/dt (Sec. 4, "continuous-time consistency objective"). With
`shared_forward` (the default) the primal output of that jvp IS F_theta: the parameter
gradient is taken through it, F^- is its stop-gradient, so one forward serves all three.
"""

import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from scm_jax.core import segments as segments_lib
from scm_jax.core import trigflow

LOSS_KINDS = ('sct', 'scd', 'diffusion', 'scd_vsd')
# Trained as consistency models (sampled in 1-2 steps); 'scd_vsd' = sCD + VSD (core/vsd.py).
CONSISTENCY_KINDS = ('sct', 'scd', 'scd_vsd')
DISTILLATION_KINDS = ('scd', 'scd_vsd')  # need a teacher
# 'jvp': exact dF/dt; 'finite_difference': jvp in x, central difference in t (ablation);
# 'discrete': discrete-time sCM (Appendix E), a backward difference over dt, no jvp.
TIME_DERIVATIVES = ('jvp', 'finite_difference', 'discrete')

ApplyFn = Callable[..., tuple[jax.Array, jax.Array]]
# dxdt_fn(x_t, t, labels) -> dx_t/dt: the teacher PF-ODE drift for sCD.
DxdtFn = Callable[[jax.Array, jax.Array, Optional[jax.Array]], jax.Array]


# --------------------------------------------------------------- per-example keys

def example_keys(key, batch_size: int) -> jax.Array:
  """One key per example [B, ...]: `key` itself when it already is one, else
  fold_in(key, i) for example i (its position in the batch)."""
  typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
  if key.ndim > (0 if typed else 1):
    return key
  return jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(batch_size))


def split_keys(keys, num: int = 2) -> tuple[jax.Array, ...]:
  """Splits every example's key into `num` independent keys: num arrays of [B, ...]."""
  split = jax.vmap(lambda k: jax.random.split(k, num))(keys)
  return tuple(split[:, i] for i in range(num))


# ------------------------------------------------------------------ the math

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


def _noisy_sample(keys, x0, p_mean, p_std, sigma_d):
  """Draws (t, z, x_t) from the time proposal and the TrigFlow forward process;
  example i from keys[i] alone."""
  def one(key):
    k_t, k_z = jax.random.split(key)
    t = trigflow.sample_t(k_t, (), p_mean, p_std, sigma_d)
    return t, sigma_d * jax.random.normal(k_z, x0.shape[1:], jnp.float32)
  t, z = jax.vmap(one)(keys)
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
  k_noise, k_drop = split_keys(example_keys(key, x0.shape[0]))
  t, z, x_t = _noisy_sample(k_noise, x0, p_mean, p_std, sigma_d)
  F, w = apply_fn(params, x_t / sigma_d, t, labels, k_drop)
  mse = per_sample_mean(jnp.square(sigma_d * F - trigflow.velocity_target(x0, z, t)))
  loss_i = adaptive_weighting(mse, w, adaptive_weight)
  return jnp.mean(loss_i), _common_metrics(loss_i, mse, w, t, adaptive_weight, num_buckets)


def consistency_tangent(F_minus, dF_dt_term, dxt_dt, x_t, t, sigma_d, r):
  """The sCM tangent g (Lu & Song 2024, eq. for the continuous-time objective).

  g = -cos^2(t) (sigma_d F^- - dx_t/dt) - r cos(t) sin(t) x_t - r * jvp,
  with jvp = cos(t) sin(t) sigma_d dF^-/dt as returned by `jvp_F_minus`; at r = 1,
  g = cos(t) df^-/dt. With the exact consistency model and exact dx_t/dt, g = 0.
  Multistep models pass t - s (s = the segment start) here: g = cos(t-s) df^-/dt for
  f = cos(t-s) x_t - sin(t-s) sigma_d F (core/segments.py).
  """
  te = trigflow.expand_t(t, x_t)
  cos, sin = jnp.cos(te), jnp.sin(te)
  return (-jnp.square(cos) * (sigma_d * F_minus - dxt_dt)
          - r * cos * sin * x_t - r * dF_dt_term)


def consistency_target(F_minus, dF_dt_term, dxt_dt, x_t, t, sigma_d, r, tangent_norm, c):
  """(target F^- + g under stop_gradient, ||g|| per sample before normalization).

  Minimizing ||F_theta - target||^2 takes the gradient step of the continuous-time
  consistency objective in direction g (Sec. 4); tangent normalization g / (||g|| + c)
  (Sec. 4.2) bounds its size.
  """
  g = consistency_tangent(F_minus, dF_dt_term, dxt_dt, x_t, t, sigma_d, r)
  g_norm = per_sample_norm(g)
  if tangent_norm:
    g = normalize_tangent(g, c)
  return jax.lax.stop_gradient(F_minus + g), g_norm


def jvp_F_minus(f, x_t, t, dxt_dt, sigma_d, *, time_derivative='jvp', fd_eps=1e-3,
                has_aux=False, tau=None):
  """Returns (F, cos t sin t sigma_d dF/dt) with one `jax.jvp` of f(x_scaled, t).

  Primals (x_t / sigma_d, t), tangents (cos t sin t dx_t/dt, cos t sin t sigma_d): the
  chain rule through the input scaling gives exactly the needed total derivative.
  time_derivative='finite_difference' keeps the jvp in x but takes the t-part by a
  central difference (an ablation for kernels without a jvp rule; 2 extra forwards).
  With has_aux, f returns (F, aux) and the result is (F, term, aux), aux at the primal.
  `tau` (default t) replaces t in the factor cos sin: t - s for multistep models.
  """
  tau = t if tau is None else tau
  cs = jnp.cos(tau) * jnp.sin(tau)
  tx = trigflow.expand_t(cs, x_t) * dxt_dt
  x_in = x_t / sigma_d
  if time_derivative == 'jvp':
    return jax.jvp(f, (x_in, t), (tx, cs * sigma_d), has_aux=has_aux)
  if time_derivative == 'finite_difference':
    out = jax.jvp(f, (x_in, t), (tx, jnp.zeros_like(t)), has_aux=has_aux)
    F_only = (lambda *a: f(*a)[0]) if has_aux else f
    dF_dt = (F_only(x_in, t + fd_eps) - F_only(x_in, t - fd_eps)) / (2 * fd_eps)
    term = out[1] + trigflow.expand_t(cs * sigma_d, x_t) * dF_dt
    return (out[0], term) + tuple(out[2:])
  raise ValueError(f'unknown time_derivative {time_derivative!r}; use one of {TIME_DERIVATIVES}')


def discrete_time_term(F_minus, F_prev, x_t, x_prev, dxt_dt, tau, tau_prev, sigma_d):
  """Discrete-time sCM (Lu & Song 2024, Appendix E, Algorithm 2): the stand-in J for
  the jvp term cos(t) sin(t) sigma_d dF^-/dt (tau = t - s in place of t).

  J is chosen so that consistency_tangent at r = 1 gives the discrete-time tangent
  g = cos(tau) (f^-(x_t, t) - f^-(x_{t'}, t')) / (t - t'), a backward difference of the
  stop-gradient consistency function along the trajectory (x_{t'} one step back, t' =
  t - dt): the target uses F^- at t - dt, no jvp. As dt -> 0, J -> jvp at rate O(dt); the
  tangent warmup r keeps its meaning (it scales the same terms as in continuous time).
  """
  h = trigflow.expand_t(jnp.maximum(tau - tau_prev, 1e-12), x_t)
  diff = (segments_lib.jump(x_t, F_minus, tau, 0.0, sigma_d)
          - segments_lib.jump(x_prev, F_prev, tau_prev, 0.0, sigma_d))
  te = trigflow.expand_t(tau, x_t)
  cos, sin = jnp.cos(te), jnp.sin(te)
  return (-jnp.square(cos) * (sigma_d * F_minus - dxt_dt) - cos * sin * x_t
          - cos * diff / h)


def _discrete_term(apply_fn, params, F_minus, x_t, t, labels, keys, dxt_dt, sigma_d, tau,
                   prev):
  """discrete_time_term with F^- at `prev` = (x_{t'}, t') from one more stop-gradient
  forward (same dropout keys)."""
  x_prev, t_prev = prev
  params_sg = jax.lax.stop_gradient(params)
  F_prev = jax.lax.stop_gradient(apply_fn(params_sg, x_prev / sigma_d, t_prev, labels, keys)[0])
  tau_prev = tau - (t - t_prev)
  return discrete_time_term(F_minus, F_prev, x_t, x_prev, dxt_dt, tau, tau_prev, sigma_d)


def shared_forward_pass(apply_fn, params, x_t, t, labels, keys, dxt_dt, sigma_d, *,
                        tau=None, prev=None, **jvp_kw):
  """(F_theta, w, F^-, jvp) from ONE forward: the jvp of the network at `params`.

  F_theta and w are the primal outputs (the loss differentiates through them), F^- and
  the tangent term are their stop-gradients, so the step costs the forward, its tangent
  and the backward: about 4 forwards instead of 5, with the same numbers. Discrete time
  (`prev` given): a plain forward and the stop-gradient forward at t' instead of the jvp.
  """
  if prev is not None:
    F, w = apply_fn(params, x_t / sigma_d, t, labels, keys)
    F_minus = jax.lax.stop_gradient(F)
    return F, w, F_minus, _discrete_term(apply_fn, params, F_minus, x_t, t, labels, keys,
                                         dxt_dt, sigma_d, tau, prev)
  f = lambda x_in, t_in: apply_fn(params, x_in, t_in, labels, keys)
  F, jvp, w = jvp_F_minus(f, x_t, t, dxt_dt, sigma_d, has_aux=True, tau=tau, **jvp_kw)
  return F, w, jax.lax.stop_gradient(F), jax.lax.stop_gradient(jvp)


def separate_forward_pass(apply_fn, params, x_t, t, labels, keys, dxt_dt, sigma_d, *,
                          tau=None, prev=None, **jvp_kw):
  """(F_theta, w, F^-, jvp) as the jvp of the stop-gradient network F^- plus a second
  forward F_theta at `params` (loss.shared_forward=False; same dropout keys, so the two
  differ only by the stop-gradient). Discrete time: F^- by a stop-gradient forward."""
  params_sg = jax.lax.stop_gradient(params)
  if prev is not None:
    F_minus = apply_fn(params_sg, x_t / sigma_d, t, labels, keys)[0]
    jvp = _discrete_term(apply_fn, params, F_minus, x_t, t, labels, keys, dxt_dt, sigma_d,
                         tau, prev)
  else:
    f = lambda x_in, t_in: apply_fn(params_sg, x_in, t_in, labels, keys)[0]
    F_minus, jvp = jvp_F_minus(f, x_t, t, dxt_dt, sigma_d, tau=tau, **jvp_kw)
  F, w = apply_fn(params, x_t / sigma_d, t, labels, keys)
  return F, w, F_minus, jvp


def previous_point(x_t, t, dxt_dt, s, dt):
  """(x_{t'}, t') with t' = max(t - dt, s) for discrete-time sCM: the DDIM step
  cos(h) x_t - sin(h) dx_t/dt (h = t - t'). With the teacher drift (sCD) that is the
  teacher's first-order ODE step; with v_t (sCT) it is exactly the noisy point at t' on
  the same (x0, z) path."""
  t_prev = jnp.maximum(t - dt, s)
  h = trigflow.expand_t(t - t_prev, x_t)
  return jnp.cos(h) * x_t - jnp.sin(h) * dxt_dt, t_prev


def consistency_loss(params, batch, key, step, *, apply_fn: ApplyFn, sigma_d: float,
                     p_mean: float, p_std: float, tangent_warmup_steps: int = 10000,
                     tangent_norm: bool = True, tangent_norm_c: float = 0.1,
                     adaptive_weight: bool = True, dxdt_fn: Optional[DxdtFn] = None,
                     time_derivative: str = 'jvp', fd_eps: float = 1e-3,
                     num_buckets: int = 8, shared_forward: bool = True,
                     segments: int = 1, discrete_dt: float = 0.01):
  """sCT (dxdt_fn=None: dx_t/dt = v_t from data) or sCD (dxdt_fn = teacher drift) loss.

  loss = E[e^{w}/D ||F_theta - F^- - g||^2 - w], target F^- + g under stop_gradient.
  `shared_forward` picks how F_theta, F^- and dF^-/dt are computed (see
  shared_forward_pass / separate_forward_pass): the same numbers either way.
  `segments` = M > 1: multistep sCM, f jumps to the start s of t's segment
  (core/segments.py), g = cos(t-s) df^-/dt. time_derivative='discrete': the tangent is
  a backward difference over `discrete_dt` (discrete_time_term), not a jvp.
  """
  x0, labels = batch['x'], batch.get('label')
  # Guidance-conditioned sCD student (App. G.2): its per-example input s (drawn in the
  # train step) is also the scale of the guided teacher.
  cond = {'guidance': batch['guidance']} if 'guidance' in batch else {}
  if cond:
    apply_fn = functools.partial(apply_fn, **cond)
  k_noise, k_drop = split_keys(example_keys(key, x0.shape[0]))
  t, z, x_t = _noisy_sample(k_noise, x0, p_mean, p_std, sigma_d)
  if dxdt_fn is None:
    dxt_dt = trigflow.velocity_target(x0, z, t)
  else:
    dxt_dt = jax.lax.stop_gradient(dxdt_fn(x_t, t, labels, **cond))
  s = segments_lib.segment_start(t, segments)
  tau = t - s  # = t for M = 1

  kw = dict(tau=tau)
  if time_derivative == 'discrete':
    kw['prev'] = previous_point(x_t, t, dxt_dt, s, discrete_dt)
  else:
    kw.update(time_derivative=time_derivative, fd_eps=fd_eps)
  forward = shared_forward_pass if shared_forward else separate_forward_pass
  F, w, F_minus, jvp = forward(apply_fn, params, x_t, t, labels, k_drop, dxt_dt, sigma_d,
                               **kw)
  r = tangent_warmup(step, tangent_warmup_steps)
  target, g_norm = consistency_target(F_minus, jvp, dxt_dt, x_t, tau, sigma_d, r,
                                      tangent_norm, tangent_norm_c)
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
  if c.kind == 'scd_vsd':
    raise ValueError('loss.kind="scd_vsd" has two losses: core.vsd.make_scd_vsd_loss_fns')
  if c.kind in CONSISTENCY_KINDS:
    if c.kind == 'scd' and dxdt_fn is None:
      raise ValueError('loss.kind="scd" needs a teacher (dxdt_fn)')
    kwargs = dict(common, tangent_warmup_steps=c.tangent_warmup_steps,
                  tangent_norm=c.tangent_norm, tangent_norm_c=c.tangent_norm_c,
                  dxdt_fn=dxdt_fn if c.kind == 'scd' else None,
                  time_derivative=c.time_derivative, fd_eps=c.fd_eps,
                  shared_forward=c.get('shared_forward', True),
                  segments=c.get('segments', 1), discrete_dt=c.get('discrete_dt', 0.01))
    return lambda params, batch, key, step: consistency_loss(params, batch, key, step, **kwargs)
  raise ValueError(f'unknown loss.kind {c.kind!r}; use one of {LOSS_KINDS}')
