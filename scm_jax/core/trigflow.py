"""TrigFlow: the diffusion process sCM is built on (Lu & Song 2024, Sec. 2-3).

Everything here is a pure function of arrays. Conventions:
  x0: data, z ~ N(0, sigma_d^2 I), t in [0, pi/2] with shape [B] (broadcast against
  the trailing axes of a sample), F(x / sigma_d, c_noise(t)) the network output.
  c_noise(t) = t: the network embeds t itself (with a small scale), see models/layers.py.

Conversions to/from EDM, VP (epsilon prediction) and flow matching let a teacher trained
in any of those parameterizations act as a TrigFlow velocity model (used by sCD).
"""

import jax
import jax.numpy as jnp

HALF_PI = jnp.pi / 2


def expand_t(t, x):
  """Reshapes per-sample times [B] to broadcast against x [B, ...]."""
  t = jnp.asarray(t, jnp.float32)
  return t.reshape(t.shape + (1,) * (x.ndim - t.ndim))


def add_noise(x0, z, t):
  """Noising: x_t = cos(t) x0 + sin(t) z (TrigFlow forward process)."""
  t = expand_t(t, x0)
  return jnp.cos(t) * x0 + jnp.sin(t) * z


def velocity_target(x0, z, t):
  """Conditional velocity v_t = d x_t / dt = cos(t) z - sin(t) x0."""
  t = expand_t(t, x0)
  return jnp.cos(t) * z - jnp.sin(t) * x0


def pf_ode_drift(F, sigma_d):
  """PF-ODE: dx_t/dt = sigma_d F(x_t / sigma_d, t); F is the network output."""
  return sigma_d * F


def consistency_fn(x_t, F, t, sigma_d):
  """f(x_t, t) = cos(t) x_t - sin(t) sigma_d F(x_t / sigma_d, t); f(x, 0) = x."""
  t = expand_t(t, x_t)
  return jnp.cos(t) * x_t - jnp.sin(t) * sigma_d * F


def x0_from_F(x_t, F, t, sigma_d):
  """The data prediction implied by F: the same formula as the consistency function.

  For a diffusion model this is the one-step (Tweedie) estimate E[x0 | x_t]; for a
  consistency model it is the ODE endpoint.
  """
  return consistency_fn(x_t, F, t, sigma_d)


def z_from_F(x_t, F, t, sigma_d):
  """The noise prediction implied by F: z_hat = sin(t) x_t + cos(t) sigma_d F."""
  t = expand_t(t, x_t)
  return jnp.sin(t) * x_t + jnp.cos(t) * sigma_d * F


def F_from_x0(x_t, x0_hat, t, sigma_d):
  """Inverts x0 = cos t x_t - sin t sigma_d F: F = (cos t x_t - x0_hat) / (sigma_d sin t)."""
  t = expand_t(t, x_t)
  return (jnp.cos(t) * x_t - x0_hat) / (sigma_d * jnp.sin(t))


def F_from_velocity(v, sigma_d):
  """F = v / sigma_d for a TrigFlow velocity v = dx_t/dt."""
  return v / sigma_d


# --------------------------------------------------------------------------- time

def sample_t(key, shape, p_mean, p_std, sigma_d):
  """Time proposal: tau ~ N(P_mean, P_std^2), t = arctan(exp(tau) / sigma_d).

  Equivalently EDM's log-normal sigma = exp(tau) mapped by sigma = sigma_d tan t.
  """
  tau = p_mean + p_std * jax.random.normal(key, shape, jnp.float32)
  return jnp.arctan(jnp.exp(tau) / sigma_d)


def t_from_sigma(sigma, sigma_d):
  """EDM noise level -> TrigFlow time: t = arctan(sigma / sigma_d)."""
  return jnp.arctan(sigma / sigma_d)


def sigma_from_t(t, sigma_d):
  """TrigFlow time -> EDM noise level: sigma = sigma_d tan t."""
  return sigma_d * jnp.tan(t)


# ------------------------------------------------------------------ conversions
# Each converter returns F given the other model's prediction at the matching point.
# Points: TrigFlow x_t = cos t x0 + sin t z with z ~ N(0, sigma_d^2).
#   EDM:  x_sigma = x0 + sigma n, n ~ N(0, I)       ->  x_sigma = x_t / cos t, sigma = sigma_d tan t
#   VP:   x_s = alpha x0 + s_ eps, alpha^2 + s_^2 = 1 ->  alpha = cos t' ... via sigma = s_/alpha
#   FM (rectified flow): x_s = (1 - s) x0 + s eps    ->  sigma = s / (1 - s)


def edm_inputs(x_t, t, sigma_d):
  """Maps a TrigFlow point to the EDM point with the same x0: (x_t / cos t, sigma_d tan t)."""
  return x_t / jnp.cos(expand_t(t, x_t)), sigma_from_t(t, sigma_d)


def F_from_edm_denoiser(x_t, t, denoised, sigma_d):
  """F from an EDM denoiser output D(x_t / cos t, sigma_d tan t) (= x0_hat)."""
  return F_from_x0(x_t, denoised, t, sigma_d)


def edm_denoiser_from_F(x_sigma, sigma, F, sigma_d):
  """EDM denoiser D(x_sigma, sigma) from F evaluated at the TrigFlow point.

  The TrigFlow point is t = arctan(sigma / sigma_d), x_t = cos(t) x_sigma; F must be the
  network output there. Returns x0_hat = cos t x_t - sin t sigma_d F.
  """
  t = t_from_sigma(sigma, sigma_d)
  x_t = jnp.cos(expand_t(t, x_sigma)) * x_sigma
  return x0_from_F(x_t, F, t, sigma_d)


def trigflow_inputs_from_edm(x_sigma, sigma, sigma_d):
  """The TrigFlow point (x_t, t) with the same x0 as the EDM point (x_sigma, sigma)."""
  t = t_from_sigma(sigma, sigma_d)
  return jnp.cos(expand_t(t, x_sigma)) * x_sigma, t


def vp_inputs(x_t, t, sigma_d):
  """TrigFlow point -> VP point (x_vp, alpha, s) with x_vp = alpha x0 + s eps, eps ~ N(0, I).

  sigma = sigma_d tan t is the VP noise-to-signal ratio s / alpha, so
  alpha = 1 / sqrt(1 + sigma^2) and x_vp = alpha x_t / cos t.
  """
  x_edm, sigma = edm_inputs(x_t, t, sigma_d)
  alpha = 1.0 / jnp.sqrt(1.0 + sigma**2)
  s = sigma * alpha
  return expand_t(alpha, x_t) * x_edm, alpha, s


def F_from_vp_eps(x_t, t, eps_hat, sigma_d):
  """F from a VP epsilon prediction eps_hat(x_vp, .) at the matching VP point.

  x0_hat = (x_vp - s eps_hat) / alpha, then F = F_from_x0.
  """
  x_vp, alpha, s = vp_inputs(x_t, t, sigma_d)
  x0_hat = (x_vp - expand_t(s, x_t) * eps_hat) / expand_t(alpha, x_t)
  return F_from_x0(x_t, x0_hat, t, sigma_d)


def fm_inputs(x_t, t, sigma_d):
  """TrigFlow point -> rectified-flow point (x_s, s) with x_s = (1 - s) x0 + s eps.

  Noise-to-signal ratio sigma = s / (1 - s) = sigma_d tan t, so s = sigma / (1 + sigma)
  and x_s = (1 - s) x_t / cos t.
  """
  x_edm, sigma = edm_inputs(x_t, t, sigma_d)
  s = sigma / (1.0 + sigma)
  return expand_t(1.0 - s, x_t) * x_edm, s


def F_from_fm_velocity(x_t, t, u_hat, sigma_d):
  """F from a flow-matching velocity u_hat(x_s, s) = E[eps - x0 | x_s] at the matching point.

  x0_hat = x_s - s u_hat, then F = F_from_x0.
  """
  x_s, s = fm_inputs(x_t, t, sigma_d)
  x0_hat = x_s - expand_t(s, x_t) * u_hat
  return F_from_x0(x_t, x0_hat, t, sigma_d)
