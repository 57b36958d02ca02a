"""sCD + adaptive variational score distillation (Lu & Song 2024, Appendix C, Table 5).

A stage after sCD: the student's loss is the sCD loss plus lambda_VSD times a VSD term
on its own 1-step samples x_hat = f_theta(sin(t_max) z, t_max), t_max = arctan(sigma_max
/ sigma_d). The VSD gradient on x_hat is the difference of two denoisers at a noisy x_hat
(t' from its own proposal, paper: P_mean 0.4, P_std 2.0), x_t' = cos t' x_hat + sin t' z'.
In F units (the paper's, `residual='F'`):

    d = F_teacher(x_t', t') - F_phi(x_t', t') = (x0_phi - x0_teacher) / (sigma_d sin t'),

(`residual='x0'`: d = x0_phi - x0_teacher, an earlier variant), where F_phi is an
auxiliary diffusion model of the student's samples (initialised from the teacher, no
EMA) trained by the TrigFlow diffusion loss on stop_gradient(x_hat): `phi_updates` phi
updates per theta update, after `phi_warmup_steps` steps in which only phi learns
(train/step.py). With x0 = cos t x_t - sin t sigma_d F, the gradient of
KL(p_theta,t' || p_teacher,t') in x_hat is cos^2 t' / (sigma_d sin t') times the F-unit d
(> 0): moving x_hat along -d lowers it. The term is the surrogate
||x_hat/u - stop_gradient(x_hat/u - d)||^2 / D (u = sigma_d for F units, 1 for x0;
value ||d||^2 / D, gradient 2 d / (u D)) under sCM's adaptive weighting
e^{w(t')} ||.||^2 / D - w(t'), with w from its own head w_psi(t') (`weight_head`; the
paper's) or, in the earlier variant, the student's w head, which then also weights sCD.

Diagnostic (`residual_rms`): the rms of d on student samples vs on real data at the same
t', z'. When they are equal, F_phi differs from the teacher everywhere alike and VSD
pushes the student with an error of F_phi rather than the gap between the two
distributions.
"""

import functools
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from scm_jax.core import losses
from scm_jax.core import trigflow


def t_max(sigma_max: float, sigma_d: float) -> float:
  """The 1-step sampling time arctan(sigma_max / sigma_d) (paper: sigma_max = 80)."""
  return math.atan(sigma_max / sigma_d)


def one_step_samples(apply_fn, params, noise, labels, keys, sigma_d, t_start):
  """x_hat = f_theta(x, t_start) from x = sin(t_start) noise, noise ~ N(0, sigma_d^2 I)."""
  t = jnp.full((noise.shape[0],), t_start, jnp.float32)
  x = jnp.sin(t_start) * noise
  F, _ = apply_fn(params, x / sigma_d, t, labels, keys)
  return trigflow.consistency_fn(x, F.astype(jnp.float32), t, sigma_d)


RESIDUALS = ('F', 'x0')
WEIGHT_HEADS = ('separate', 'student')


def _gaussian(keys, x0_shape, sigma_d):
  """N(0, sigma_d^2 I) of one example's shape from each of `keys` [B]."""
  return jax.vmap(lambda k: sigma_d * jax.random.normal(k, x0_shape[1:], jnp.float32))(keys)


def student_samples(apply_fn, params, x0_shape, labels, noise_keys, drop_keys, sigma_d,
                    sigma_max):
  """1-step samples of the student from t_max, example i's noise from noise_keys[i] and
  its dropout from drop_keys[i]."""
  return one_step_samples(apply_fn, params, _gaussian(noise_keys, x0_shape, sigma_d), labels,
                          drop_keys, sigma_d, t_max(sigma_max, sigma_d))


def init_weight_head(key, hidden: int = 64, num_freqs: int = 16) -> dict:
  """w_psi's parameters: a one-hidden-layer MLP on Fourier features of log(tan t), its
  output layer zero so that w_psi = 0 (weight 1) at the start."""
  k1, k2 = jax.random.split(key)
  fan_in = 2 * num_freqs + 1
  return {'w1': jax.random.normal(k1, (fan_in, hidden)) / math.sqrt(fan_in),
          'b1': 0.1 * jax.random.normal(k2, (hidden,)),
          'w2': jnp.zeros((hidden,)), 'b2': jnp.zeros(())}


def weight_head(psi: dict, t):
  """w_psi(t) [B]: the VSD term's adaptive weight, a function of t alone (log(tan t) =
  log(sigma / sigma_d) spans the proposal's range; frequencies 1/8 .. 4)."""
  u = jnp.log(jnp.tan(t.astype(jnp.float32)))
  num_freqs = (psi['w1'].shape[0] - 1) // 2
  freqs = jnp.geomspace(0.125, 4.0, num_freqs)
  feats = jnp.concatenate([u[:, None] / 4, jnp.cos(u[:, None] * freqs),
                           jnp.sin(u[:, None] * freqs)], axis=1)
  h = jax.nn.silu(feats @ psi['w1'] + psi['b1'])
  return h @ psi['w2'] + psi['b2']


def residual(phi_params, x0, z, t, labels, *, eval_apply_fn, dxdt_fn, sigma_d: float,
             units: str = 'F'):
  """d at x_t = cos t x0 + sin t z (module docstring), under stop_gradient."""
  x_t = trigflow.add_noise(x0, z, t)
  F_teacher = dxdt_fn(x_t, t, labels) / sigma_d
  F_phi, _ = eval_apply_fn(jax.lax.stop_gradient(phi_params), x_t / sigma_d, t, labels, None)
  F_phi = F_phi.astype(jnp.float32)
  if units == 'F':
    d = F_teacher - F_phi
  else:
    d = trigflow.x0_from_F(x_t, F_phi, t, sigma_d) - trigflow.x0_from_F(x_t, F_teacher, t,
                                                                      sigma_d)
  return jax.lax.stop_gradient(d), x_t


def residual_rms(d):
  return jnp.sqrt(jnp.mean(jnp.square(d)))


def vsd_loss(params, phi_params, x0_shape, labels, keys, *, apply_fn, eval_apply_fn,
             dxdt_fn, sigma_d: float, p_mean: float, p_std: float, sigma_max: float,
             adaptive_weight: bool = True, units: str = 'F', weight_fn=None,
             data=None):
  """(per-example VSD loss [B], its mse [B], the 1-step samples under stop_gradient,
  diagnostics).

  `keys` [B]: example i's noise, time, dropout from keys[i] alone. F_phi (phi_params)
  is evaluated without dropout (eval_apply_fn) and without gradient. `weight_fn(t)` is
  w_psi; None: the student's w head at t' (only its time path is live once jitted).
  With `data` (real examples [B, ...]) the diagnostics hold d's rms on them too, at the
  same t' and z'.
  """
  k_noise, k_t, k_z, k_drop = losses.split_keys(keys, 4)
  x_hat = student_samples(apply_fn, params, x0_shape, labels, k_noise, k_drop, sigma_d,
                          sigma_max)
  t = jax.vmap(lambda k: trigflow.sample_t(k, (), p_mean, p_std, sigma_d))(k_t)
  x_hat_sg = jax.lax.stop_gradient(x_hat)
  z = _gaussian(k_z, x0_shape, sigma_d)
  res = functools.partial(residual, eval_apply_fn=eval_apply_fn, dxdt_fn=dxdt_fn,
                          sigma_d=sigma_d, units=units)
  d, x_t = res(phi_params, x_hat_sg, z, t, labels)
  u = sigma_d if units == 'F' else 1.0
  mse = losses.per_sample_mean(jnp.square(x_hat / u - (x_hat_sg / u - d)))
  if weight_fn is None:
    _, w = apply_fn(params, x_t / sigma_d, t, labels, k_drop)
  else:
    w = weight_fn(t)
  diag = {'vsd_d_rms_student': residual_rms(d), 'vsd_w_mean': jnp.mean(w)}
  if data is not None:
    diag['vsd_d_rms_data'] = residual_rms(res(phi_params, data, z, t, labels)[0])
    # 0 / 0 while F_phi is still the teacher (d = 0 on both): equal.
    diag['vsd_d_rms_ratio'] = jnp.where(diag['vsd_d_rms_data'] > 0, diag['vsd_d_rms_student']
                                        / jnp.maximum(diag['vsd_d_rms_data'], 1e-30), 1.0)
  return losses.adaptive_weighting(mse, w, adaptive_weight), mse, x_hat_sg, diag


def make_scd_vsd_loss_fns(loss_config: Any, apply_fn: Callable, eval_apply_fn: Callable,
                          sigma_d: float, dxdt_fn: Optional[losses.DxdtFn]):
  """(student_loss_fn, aux_loss_fn) for loss.kind='scd_vsd'.

  student_loss_fn((params, psi), phi_params, batch, keys, step) -> (loss, (metrics,
  x_hat)): the sCD loss + vsd_weight * the VSD term (psi: w_psi's parameters, None with
  loss.vsd_weight_head='student'); aux_loss_fn(phi_params, x_hat, labels, keys) -> (loss,
  metrics): the diffusion loss of F_phi on the student's samples, its own proposal
  (loss.vsd_phi_p_mean / _p_std).
  """
  c = loss_config
  if dxdt_fn is None:
    raise ValueError('loss.kind="scd_vsd" needs a teacher (dxdt_fn)')
  scd_config = c.copy_and_resolve_references()
  scd_config.kind = 'scd'
  scd = losses.make_loss_fn(scd_config, apply_fn, sigma_d, dxdt_fn)

  def student_loss_fn(trainable, phi_params, batch, keys, step):
    params, psi = trainable
    k_scd, k_vsd = losses.split_keys(keys)
    loss, metrics = scd(params, batch, k_scd, step)
    loss_i, mse, x_hat, diag = vsd_loss(
        params, phi_params, batch['x'].shape, batch.get('label'), k_vsd,
        apply_fn=apply_fn, eval_apply_fn=eval_apply_fn, dxdt_fn=dxdt_fn, sigma_d=sigma_d,
        p_mean=c.vsd_p_mean, p_std=c.vsd_p_std, sigma_max=c.vsd_sigma_max,
        adaptive_weight=c.adaptive_weight, units=c.get('vsd_residual', 'F'),
        weight_fn=None if psi is None else functools.partial(weight_head, psi),
        data=batch['x'] if c.get('vsd_diagnostic', True) else None)
    vsd = jnp.mean(loss_i)
    metrics = dict(metrics, **diag, scd_loss=loss, vsd_loss=vsd, vsd_mse=jnp.mean(mse))
    total = loss + c.vsd_weight * vsd
    metrics['loss'] = total
    return total, (metrics, x_hat)

  def aux_loss_fn(phi_params, x_hat, labels, keys):
    batch = {'x': x_hat} if labels is None else {'x': x_hat, 'label': labels}
    return losses.diffusion_loss(phi_params, batch, keys, apply_fn=apply_fn,
                                 sigma_d=sigma_d, p_mean=c.vsd_phi_p_mean,
                                 p_std=c.vsd_phi_p_std, adaptive_weight=c.adaptive_weight,
                                 num_buckets=c.num_time_buckets)

  return student_loss_fn, aux_loss_fn
