"""sCD + adaptive variational score distillation (Lu & Song 2024, Appendix C, Table 5).

A stage after sCD: the student's loss is the sCD loss plus lambda_VSD times a VSD term
on its own 1-step samples x_hat = f_theta(sin(t_max) z, t_max), t_max = arctan(sigma_max
/ sigma_d). The VSD gradient on x_hat is the difference of two x0-predictions at a noisy
x_hat (t' from its own proposal, paper: P_mean 0.4, P_std 2.0):

    d = x0_phi(x_t', t') - x0_teacher(x_t', t'),   x_t' = cos t' x_hat + sin t' z',

where F_phi is an auxiliary diffusion model of the student's samples (initialised from
the teacher, no EMA) trained by the TrigFlow diffusion loss on stop_gradient(x_hat), one
phi update per theta update (train/step.py). d points along the gradient of
KL(p_theta,t' || p_teacher,t') in x_hat (the score difference scaled by cos t' /
sin^2 t' > 0): moving x_hat along -d lowers it. The term is the surrogate
||x_hat - stop_gradient(x_hat - d)||^2 / D (value ||d||^2 / D, gradient 2 d / D), under
the same adaptive weighting as sCM: e^{w(t')} ||.||^2 / D - w(t'), with the student's
w head at t' (it depends on t' only; its trunk is not evaluated once jitted).
"""

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


def vsd_loss(params, aux_params, x0_shape, labels, keys, *, apply_fn, eval_apply_fn,
             dxdt_fn, sigma_d: float, p_mean: float, p_std: float, sigma_max: float,
             adaptive_weight: bool = True):
  """(per-example VSD loss [B], its mse [B], the 1-step samples under stop_gradient).

  `keys` [B]: example i's noise, time, dropout from keys[i] alone. F_phi (aux_params)
  is evaluated without dropout (eval_apply_fn) and without gradient.
  """
  k_noise, k_t, k_z, k_drop = losses.split_keys(keys, 4)
  draw = jax.vmap(lambda k: sigma_d * jax.random.normal(k, x0_shape[1:], jnp.float32))
  x_hat = one_step_samples(apply_fn, params, draw(k_noise), labels, k_drop, sigma_d,
                           t_max(sigma_max, sigma_d))
  t = jax.vmap(lambda k: trigflow.sample_t(k, (), p_mean, p_std, sigma_d))(k_t)
  x_hat_sg = jax.lax.stop_gradient(x_hat)
  x_t = trigflow.add_noise(x_hat_sg, draw(k_z), t)
  x0_teacher = trigflow.x0_from_F(x_t, dxdt_fn(x_t, t, labels) / sigma_d, t, sigma_d)
  F_phi, _ = eval_apply_fn(jax.lax.stop_gradient(aux_params), x_t / sigma_d, t, labels, None)
  x0_phi = trigflow.x0_from_F(x_t, F_phi.astype(jnp.float32), t, sigma_d)
  d = jax.lax.stop_gradient(x0_phi - x0_teacher)
  mse = losses.per_sample_mean(jnp.square(x_hat - (x_hat_sg - d)))
  # w(t') from the student's head: only the time path of this call is live.
  _, w = apply_fn(params, x_t / sigma_d, t, labels, k_drop)
  return losses.adaptive_weighting(mse, w, adaptive_weight), mse, x_hat_sg


def make_scd_vsd_loss_fns(loss_config: Any, apply_fn: Callable, eval_apply_fn: Callable,
                          sigma_d: float, dxdt_fn: Optional[losses.DxdtFn]):
  """(student_loss_fn, aux_loss_fn) for loss.kind='scd_vsd'.

  student_loss_fn(params, aux_params, batch, keys, step) -> (loss, (metrics, x_hat)):
  the sCD loss + vsd_weight * the VSD term; aux_loss_fn(aux_params, x_hat, labels, keys)
  -> (loss, metrics): the diffusion loss of F_phi on the student's samples, its own
  proposal (loss.vsd_phi_p_mean / _p_std).
  """
  c = loss_config
  if dxdt_fn is None:
    raise ValueError('loss.kind="scd_vsd" needs a teacher (dxdt_fn)')
  scd_config = c.copy_and_resolve_references()
  scd_config.kind = 'scd'
  scd = losses.make_loss_fn(scd_config, apply_fn, sigma_d, dxdt_fn)

  def student_loss_fn(params, aux_params, batch, keys, step):
    k_scd, k_vsd = losses.split_keys(keys)
    loss, metrics = scd(params, batch, k_scd, step)
    loss_i, mse, x_hat = vsd_loss(
        params, aux_params, batch['x'].shape, batch.get('label'), k_vsd,
        apply_fn=apply_fn, eval_apply_fn=eval_apply_fn, dxdt_fn=dxdt_fn, sigma_d=sigma_d,
        p_mean=c.vsd_p_mean, p_std=c.vsd_p_std, sigma_max=c.vsd_sigma_max,
        adaptive_weight=c.adaptive_weight)
    vsd = jnp.mean(loss_i)
    metrics = dict(metrics, scd_loss=loss, vsd_loss=vsd, vsd_mse=jnp.mean(mse))
    total = loss + c.vsd_weight * vsd
    metrics['loss'] = total
    return total, (metrics, x_hat)

  def aux_loss_fn(aux_params, x_hat, labels, keys):
    batch = {'x': x_hat} if labels is None else {'x': x_hat, 'label': labels}
    return losses.diffusion_loss(aux_params, batch, keys, apply_fn=apply_fn,
                                 sigma_d=sigma_d, p_mean=c.vsd_phi_p_mean,
                                 p_std=c.vsd_phi_p_std, adaptive_weight=c.adaptive_weight,
                                 num_buckets=c.num_time_buckets)

  return student_loss_fn, aux_loss_fn
