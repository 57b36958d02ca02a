"""Closed forms for Gaussian data x0 ~ N(mu, s^2 I): an oracle for tests and notebooks.

With z ~ N(0, sigma_d^2 I) and x_t = cos t x0 + sin t z, x_t ~ N(cos t mu, var_t I) with
var_t = cos^2 t s^2 + sin^2 t sigma_d^2. The PF-ODE keeps the standardized value
(x_t - cos t mu) / sqrt(var_t) constant, which gives the consistency function in closed
form; the posterior means give the exact teacher in every parameterization.
"""

import dataclasses

import jax.numpy as jnp

from scm_jax.core import trigflow


@dataclasses.dataclass(frozen=True)
class GaussianData:
  mu: float = 0.3
  s: float = 0.4
  sigma_d: float = 0.5

  def var(self, t):
    return jnp.cos(t)**2 * self.s**2 + jnp.sin(t)**2 * self.sigma_d**2

  def posterior_x0(self, x_t, t):
    """E[x0 | x_t]."""
    te = trigflow.expand_t(t, x_t)
    return self.mu + jnp.cos(te) * self.s**2 / self.var(te) * (x_t - jnp.cos(te) * self.mu)

  def posterior_z(self, x_t, t):
    """E[z | x_t]."""
    te = trigflow.expand_t(t, x_t)
    return jnp.sin(te) * self.sigma_d**2 / self.var(te) * (x_t - jnp.cos(te) * self.mu)

  def velocity(self, x_t, t):
    """Exact PF-ODE drift dx_t/dt = E[v_t | x_t] = cos t E[z|x_t] - sin t E[x0|x_t]."""
    te = trigflow.expand_t(t, x_t)
    return jnp.cos(te) * self.posterior_z(x_t, t) - jnp.sin(te) * self.posterior_x0(x_t, t)

  def F_diffusion(self, x_scaled, t):
    """The exact diffusion-model output: F = velocity / sigma_d at x_t = sigma_d x_scaled."""
    return self.velocity(self.sigma_d * x_scaled, t) / self.sigma_d

  def consistency(self, x_t, t):
    """Exact consistency function: the PF-ODE endpoint f(x_t, t)."""
    te = trigflow.expand_t(t, x_t)
    return self.mu + self.s * (x_t - jnp.cos(te) * self.mu) / jnp.sqrt(self.var(te))

  def F_consistency(self, x_scaled, t):
    """The exact consistency-model output: F = (cos t x_t - f(x_t, t)) / (sigma_d sin t)."""
    x_t = self.sigma_d * x_scaled
    return trigflow.F_from_x0(x_t, self.consistency(x_t, t), t, self.sigma_d)

  def ode_solution(self, x_t, t, s):
    """The PF-ODE solution at time s <= t from x_t: the standardized value is constant."""
    te, se = trigflow.expand_t(t, x_t), trigflow.expand_t(s, x_t)
    return (jnp.cos(se) * self.mu
            + jnp.sqrt(self.var(se) / self.var(te)) * (x_t - jnp.cos(te) * self.mu))

  def F_multistep(self, x_scaled, t, s):
    """The exact multistep consistency-model output for segment start s (core/segments.py):
    f(x_t, t) = cos(t-s) x_t - sin(t-s) sigma_d F = the ODE solution at s."""
    x_t = self.sigma_d * x_scaled
    return trigflow.F_from_x0(x_t, self.ode_solution(x_t, t, s), jnp.asarray(t) - s,
                              self.sigma_d)

  # Exact teachers in other parameterizations (for the conversion wrappers).

  def edm_denoiser(self, x_sigma, sigma):
    """EDM D(x_sigma, sigma) = E[x0 | x0 + sigma n = x_sigma]."""
    sig = trigflow.expand_t(sigma, x_sigma)
    return self.mu + self.s**2 / (self.s**2 + sig**2) * (x_sigma - self.mu)

  def vp_eps(self, x_vp, alpha, s_vp):
    """VP eps-prediction E[eps | alpha x0 + s eps = x_vp]."""
    a, b = trigflow.expand_t(alpha, x_vp), trigflow.expand_t(s_vp, x_vp)
    var = a**2 * self.s**2 + b**2
    return b / var * (x_vp - a * self.mu)

  def fm_velocity(self, x_s, s_fm):
    """Rectified-flow velocity E[eps - x0 | (1 - s) x0 + s eps = x_s]."""
    s = trigflow.expand_t(s_fm, x_s)
    var = (1 - s)**2 * self.s**2 + s**2
    resid = x_s - (1 - s) * self.mu
    e_eps = s / var * resid
    e_x0 = self.mu + (1 - s) * self.s**2 / var * resid
    return e_eps - e_x0
