"""Teachers for consistency distillation (sCD): any diffusion model as a TrigFlow F.

sCD (Lu & Song 2024, Sec. 4) replaces the data velocity of sCT by the teacher's PF-ODE
drift dx_t/dt = sigma_d F_teacher(x_t / sigma_d, t). Everything here works on pure
functions in the params-first form of Flax's `apply`:

    F_apply(params, x_scaled, t, labels) -> F        (x_scaled = x_t / sigma_d, t [B])

Wrappers turn an EDM denoiser, a VP epsilon-prediction model or a flow-matching velocity
model into that form through its data prediction x0_hat at the point with the same
signal-to-noise ratio (Sec. 3; conversions in `trigflow`). `guided` adds classifier-free
guidance in F-space, `guided_by_network` EDM2's guidance by a separate guiding network,
and `make_dxdt_fn` binds the parameters into the drift the loss takes, as a
`jax.tree_util.Partial`: the teacher's parameters stay pytree leaves, so a jitted train
step receives them as arguments instead of baking them in as constants.
"""

import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from scm_jax.core import trigflow

# F_apply(params, x_scaled, t, labels) -> F.
FApply = Callable[[Any, jax.Array, jax.Array, Optional[jax.Array]], jax.Array]

EDM_SIGMA_MAX = 80.0  # EDM's largest training noise level (Karras et al. 2022).


def _conversion_time(t, sigma_d, sigma_max):
  """t capped at arctan(sigma_max / sigma_d), the largest noise a teacher was trained on.

  At t = pi/2 the other parameterizations are singular (sigma = inf; in float32
  tan(pi/2) is even negative), while the PF-ODE starts there; beyond sigma_max the
  teacher's data prediction is the data mean anyway, so holding it fixed is exact to
  the teacher's own accuracy. None disables the cap.
  """
  t = jnp.asarray(t, jnp.float32)
  if sigma_max is None:
    return t
  return jnp.minimum(t, trigflow.t_from_sigma(jnp.float32(sigma_max), sigma_d))


def _F_from_x0_predictor(x0_fn, sigma_d, sigma_max):
  """F_apply from x0_fn(params, x_t, t, labels) -> x0_hat, evaluated at the capped time."""
  def F_apply(params, x_scaled, t, labels=None):
    x_t = sigma_d * x_scaled
    tc = _conversion_time(t, sigma_d, sigma_max)
    return trigflow.F_from_x0(x_t, x0_fn(params, x_t, tc, labels), tc, sigma_d)
  return F_apply


def flax_model_F(model) -> FApply:
  """A TrigFlow model of this project as F_apply, unguided: F = model(x_scaled, t, labels)[0]
  (evaluation mode; an unconditional model gets labels=None)."""
  num_classes = getattr(model, 'num_classes', 0)

  def F_apply(params, x_scaled, t, labels=None):
    return model.apply({'params': params}, x_scaled, t,
                       labels if num_classes > 0 else None)[0]
  return F_apply


def from_flax_model(model, guidance: float = 1.0) -> FApply:
  """A TrigFlow model of this project (MLP/U-Net/DiT/EDM2): F = model(x_scaled, t, labels)[0].

  Evaluation mode (no dropout). Unconditional models get labels=None; conditional ones
  get classifier-free guidance with scale `guidance` (1 = the conditional model itself),
  or a per-example scale passed at each call (`F_apply(..., guidance=s)`, s [B]). A
  guidance-conditioned student (`model.guidance_embed`) takes s as its input instead:
  one evaluation, no CFG on its outputs.
  """
  num_classes = getattr(model, 'num_classes', 0)
  if getattr(model, 'guidance_embed', False):
    fixed = float(guidance)

    def F_student(params, x_scaled, t, labels=None, guidance=None):
      return model.apply({'params': params}, x_scaled, t, labels,
                         fixed if guidance is None else guidance)[0]
    return F_student
  F_apply = flax_model_F(model)
  return guided(F_apply, guidance, num_classes) if num_classes > 0 else F_apply


def from_edm_denoiser(denoise_fn: Callable, sigma_d: float,
                      sigma_max: Optional[float] = EDM_SIGMA_MAX) -> FApply:
  """EDM denoiser denoise_fn(params, x_sigma, sigma, labels) -> x0_hat as a TrigFlow F.

  x_sigma = x0 + sigma n with n ~ N(0, I); the matching TrigFlow point has
  sigma = sigma_d tan t and x_sigma = x_t / cos t (SCM_NOTES: Conversions). `sigma` is
  passed with shape [B]; include EDM's preconditioning inside denoise_fn.
  """
  def x0_fn(params, x_t, t, labels):
    x_sigma, sigma = trigflow.edm_inputs(x_t, t, sigma_d)
    return denoise_fn(params, x_sigma, sigma, labels)
  return _F_from_x0_predictor(x0_fn, sigma_d, sigma_max)


def from_vp_eps(eps_fn: Callable, sigma_d: float,
                sigma_max: Optional[float] = EDM_SIGMA_MAX) -> FApply:
  """VP epsilon prediction eps_fn(params, x_vp, alpha, s, labels) -> eps_hat as a TrigFlow F.

  x_vp = alpha x0 + s eps with alpha^2 + s^2 = 1 (DDPM / VP-SDE); alpha and s have
  shape [B]. Map them to the model's own time inside eps_fn, e.g. with
  `vp_linear_time(alpha)` (continuous VP-SDE) or `ddpm_timestep(alpha, alphas_cumprod)`.
  """
  def x0_fn(params, x_t, t, labels):
    x_vp, alpha, s = trigflow.vp_inputs(x_t, t, sigma_d)
    eps_hat = eps_fn(params, x_vp, alpha, s, labels)
    return (x_vp - trigflow.expand_t(s, x_t) * eps_hat) / trigflow.expand_t(alpha, x_t)
  return _F_from_x0_predictor(x0_fn, sigma_d, sigma_max)


def from_flow_matching(velocity_fn: Callable, sigma_d: float, data_at_one: bool = False,
                       sigma_max: Optional[float] = EDM_SIGMA_MAX) -> FApply:
  """Flow-matching velocity velocity_fn(params, x_s, s, labels) -> u_hat as a TrigFlow F.

  Default convention (rectified flow): x_s = (1 - s) x0 + s eps, s = 1 is noise,
  u = d x_s / ds = eps - x0. With data_at_one=True the model's time runs the other way:
  x_tau = tau x0 + (1 - tau) eps, u = x0 - eps (e.g. flow matching as in Lipman et al.);
  it is called at tau = 1 - s and its output negated.
  """
  def x0_fn(params, x_t, t, labels):
    x_s, s = trigflow.fm_inputs(x_t, t, sigma_d)
    if data_at_one:
      u_hat = -velocity_fn(params, x_s, 1.0 - s, labels)
    else:
      u_hat = velocity_fn(params, x_s, s, labels)
    return x_s - trigflow.expand_t(s, x_t) * u_hat
  return _F_from_x0_predictor(x0_fn, sigma_d, sigma_max)


# ----------------------------------------------------------- VP time helpers

def vp_linear_time(alpha, beta_min: float = 0.1, beta_max: float = 20.0):
  """Continuous VP-SDE time tau in [0, 1] with signal scale alpha (Song et al. 2021).

  log alpha(tau) = -tau^2 (beta_max - beta_min) / 4 - tau beta_min / 2; solved for tau.
  """
  a, b = (beta_max - beta_min) / 4.0, beta_min / 2.0
  c = jnp.log(alpha)
  return (-b + jnp.sqrt(b * b - 4.0 * a * c)) / (2.0 * a)


def ddpm_timestep(alpha, alphas_cumprod):
  """Fractional DDPM timestep whose alpha_bar equals alpha^2, by interpolation in log-SNR.

  alphas_cumprod: the model's decreasing table of alpha_bar_i (i = 0..T-1). Values
  outside the table are clamped to its ends.
  """
  abar = jnp.asarray(alphas_cumprod, jnp.float32)
  log_snr_table = jnp.log(abar) - jnp.log1p(-abar)        # decreasing in i
  log_snr = 2.0 * jnp.log(alpha) - jnp.log1p(-jnp.square(alpha))
  idx = jnp.arange(abar.shape[0], dtype=jnp.float32)
  return jnp.interp(-log_snr, -log_snr_table, idx)         # interp needs increasing xp


# ---------------------------------------------------------------- guidance

def _extrapolate(F_ref, F_pos, w):
  """F_ref + w (F_pos - F_ref), w a scalar or one scale per example [B]."""
  w = jnp.broadcast_to(jnp.asarray(w, jnp.float32), (F_pos.shape[0],))
  return F_ref + trigflow.expand_t(w, F_pos) * (F_pos - F_ref)


def guided(F_apply: FApply, guidance: float, null_label: int) -> FApply:
  """Classifier-free guidance in F-space: F_null + w (F_cond - F_null).

  F is linear in the velocity, so this is the guided teacher velocity of sCD. One
  forward pass on the doubled batch evaluates both terms; w = 1 is the conditional
  model itself (one pass). Labels equal to `null_label` give F_null. A call may pass its
  own scale, `guidance=w` (a scalar or one per example [B]: the guidance-conditioned
  student's s ~ U[1, s_max], App. G.2), instead of the fixed `guidance`.
  """
  fixed = float(guidance)

  def F_guided(params, x_scaled, t, labels, guidance=None):
    if guidance is None and fixed == 1.0:
      return F_apply(params, x_scaled, t, labels)
    if labels is None:
      raise ValueError('classifier-free guidance needs labels')
    n = x_scaled.shape[0]
    null = jnp.full_like(labels, null_label)
    both = F_apply(params, jnp.concatenate([x_scaled, x_scaled]), jnp.concatenate([t, t]),
                   jnp.concatenate([labels, null]))
    return _extrapolate(both[n:], both[:n], fixed if guidance is None else guidance)
  return F_guided


def guided_by_network(F_main: FApply, F_guide: FApply, guidance: float = 1.0,
                      guide_labels: bool = True) -> FApply:
  """Guidance by a separate guiding network (EDM2; Karras et al. 2024, "Guiding a
  diffusion model with a bad version of itself"): D = D_guide + w (D_main - D_guide).

  The TrigFlow denoiser D(x_t, t) = cos(t) x_t - sin(t) sigma_d F(x_t / sigma_d, t) is
  affine in F with coefficients that depend on (x_t, t) only, so at the same point the
  guided denoiser is that of

      F = F_guide + w (F_main - F_guide),

  and the guided PF-ODE drift is sigma_d F (what sCD distills). The guide is either
  EDM2's CFG guide, a separate unconditional model (guide_labels=False: it never sees
  the labels), or its autoguidance guide, a smaller / less-trained conditional model
  (guide_labels=True: the main model's labels). `params` = {'main': ..., 'guide': ...};
  a call may pass its own scale `guidance=w` (scalar or [B]) as in `guided`; w = 1 is
  the main model alone (the guide is not evaluated).
  """
  fixed = float(guidance)

  def F_guided(params, x_scaled, t, labels=None, guidance=None):
    F_m = F_main(params['main'], x_scaled, t, labels)
    if guidance is None and fixed == 1.0:
      return F_m
    F_g = F_guide(params['guide'], x_scaled, t, labels if guide_labels else None)
    return _extrapolate(F_g, F_m, fixed if guidance is None else guidance)
  return F_guided


# ------------------------------------------------------------------- drift

def _drift(F_apply, sigma_d, params, x_t, t, labels, guidance=None):
  kwargs = {} if guidance is None else {'guidance': guidance}
  return trigflow.pf_ode_drift(F_apply(params, x_t / sigma_d, t, labels, **kwargs), sigma_d)


def make_dxdt_fn(F_apply: FApply, params: Any, sigma_d: float) -> jax.tree_util.Partial:
  """The sCD teacher drift dxdt(x_t, t, labels[, guidance]) = sigma_d F_teacher(x_t /
  sigma_d, t); `guidance` (per example) reaches F_apply for a `guided` teacher.

  Returned as a `Partial` over `params` (pass None or () for parameter-free teachers
  such as the analytic oracle): a pytree whose leaves are the teacher's weights.
  """
  return jax.tree_util.Partial(functools.partial(_drift, F_apply, sigma_d), params)


def has_params(dxdt_fn) -> bool:
  """True for a drift carrying array leaves (to be passed to jit as an argument)."""
  return (isinstance(dxdt_fn, jax.tree_util.Partial)
          and len(jax.tree_util.tree_leaves(dxdt_fn)) > 0)
