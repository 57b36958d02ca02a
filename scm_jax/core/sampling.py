"""Samplers: consistency sampling (1-step, 2-step, multistep) and PF-ODE solvers.

All samplers take F_fn(x_scaled, t) -> F, the network with its parameters (and labels /
guidance) closed over, where x_scaled = x_t / sigma_d and t has shape [B]. They are pure:
the same key gives the same samples, and they jit as a whole (`jax.jit` a lambda that
builds F_fn from params).

Every sampler starts where EDM/EDM2 start, at sigma_max = 80: t_max = arctan(sigma_max /
sigma_d), x = sin(t_max) z with z ~ N(0, sigma_d^2 I) (EDM's x = sigma_max n in TrigFlow
coordinates; Lu & Song 2024, App. G.2). t = pi/2 is the zero-SNR limit, not sampled from.

PF-ODE solvers (Lu & Song 2024, App. B.1 and G.1), N steps on decreasing times:
  euler     x' = x + (t' - t) sigma_d F                                   NFE N
  ddim      x' = cos(t - t') x - sin(t - t') sigma_d F (Eq. 26)            NFE N
  heun      EDM's Heun sampler in sigma = sigma_d tan t (= DPM-Solver-2S with Heun's
            intermediate step, the paper's teacher sampler); last step Euler  NFE 2N - 1
  dpmpp_2m  DPM-Solver++(2M) in TrigFlow form (cf. Eq. 28): multistep, second order
            in the data prediction x0 = cos t x - sin t sigma_d F           NFE N
"""

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from scm_jax.core import segments as segments_lib
from scm_jax.core import trigflow

FFn = Callable[[jax.Array, jax.Array], jax.Array]

DEFAULT_T_MID = 1.1       # 2-step intermediate time used by the paper.
DEFAULT_SIGMA_MAX = 80.0  # EDM / EDM2 largest noise level: where sampling starts.
ODE_SOLVERS = ('euler', 'ddim', 'heun', 'dpmpp_2m')
ODE_SCHEDULES = ('edm', 'uniform')


def t_max(sigma_d: float, sigma_max: float = DEFAULT_SIGMA_MAX) -> float:
  """The start of sampling, arctan(sigma_max / sigma_d) (1.5645 for sigma_d = 0.5)."""
  return math.atan(sigma_max / sigma_d)


def consistency_times(num_steps: int, t_mid: float = DEFAULT_T_MID,
                      times: Sequence[float] = (), *, t_start: float) -> tuple[float, ...]:
  """The time schedule of multistep consistency sampling, starting at t_start (= t_max).

  Explicit `times` win; otherwise 1 step -> (t_start,), 2 steps -> (t_start, t_mid)
  and more steps -> t_start followed by num_steps-1 times spaced evenly from t_mid down
  to t_mid/(n-1).
  """
  if times:
    ts = tuple(float(t) for t in times)
  elif num_steps == 1:
    ts = (float(t_start),)
  elif num_steps == 2:
    ts = (float(t_start), float(t_mid))
  elif num_steps > 2:
    n = num_steps - 1
    ts = (float(t_start),) + tuple(float(t_mid) * (n - i) / n for i in range(n))
  else:
    raise ValueError(f'num_steps must be >= 1, got {num_steps}')
  if any(not 0 < t <= math.pi / 2 for t in ts) or any(a <= b for a, b in zip(ts, ts[1:])):
    raise ValueError(f'consistency times must decrease within (0, pi/2], got {ts}')
  return ts


def consistency_step(F_fn: FFn, x_t, t, sigma_d):
  """Applies the consistency function f(x_t, t) = cos t x_t - sin t sigma_d F."""
  t = jnp.full((x_t.shape[0],), t, jnp.float32) if jnp.ndim(t) == 0 else t
  return trigflow.consistency_fn(x_t, F_fn(x_t / sigma_d, t), t, sigma_d)


def consistency_noise(key, shape, num_steps: int):
  """The standard-normal draws of `num_steps`-step consistency sampling, [num_steps,
  *shape]: row i from the i-th of jax.random.split(key, num_steps)."""
  keys = jax.random.split(key, num_steps)
  return jnp.stack([jax.random.normal(k, shape, jnp.float32) for k in keys])


def sample_consistency(F_fn: FFn, key, shape, sigma_d: float, times: Sequence[float]):
  """Multistep consistency sampling (1 step: times=(t_max,); 2 steps: (t_max, 1.1))
  with the draws of `consistency_noise(key, shape, len(times))`."""
  return consistency_from_noise(F_fn, consistency_noise(key, shape, len(times)), sigma_d,
                                times)


def consistency_from_noise(F_fn: FFn, noise, sigma_d: float, times: Sequence[float]):
  """Multistep consistency sampling from given standard-normal noise [len(times), B, ...].

  x0 = f(sin(t_0) z_0, t_0); then for each later t_i: x_t = cos t_i x0 + sin t_i z_i,
  x0 = f(x_t, t_i), with z_i = sigma_d noise[i] ~ N(0, sigma_d^2 I).
  """
  x = math.sin(times[0]) * sigma_d * noise[0]
  x0 = consistency_step(F_fn, x, times[0], sigma_d)
  for i, t in enumerate(times[1:], start=1):
    z = sigma_d * noise[i]
    x_t = jnp.cos(t) * x0 + jnp.sin(t) * z
    x0 = consistency_step(F_fn, x_t, t, sigma_d)
  return x0


def sample_segments(F_fn: FFn, key, shape, sigma_d: float, segments: int):
  """`segments_from_noise` with the draw jax.random.normal(key, shape)."""
  return segments_from_noise(F_fn, jax.random.normal(key, shape, jnp.float32), sigma_d,
                             segments)


def segments_from_noise(F_fn: FFn, noise, sigma_d: float, segments: int):
  """Sampling a multistep consistency model (loss.segments = M, core/segments.py):
  z = sigma_d noise ~ N(0, sigma_d^2 I) at pi/2, then M deterministic DDIM-like jumps
  along the segment boundaries pi/2 -> s_{M-1} -> ... -> 0, x_s = cos(t - s) x_t -
  sin(t - s) sigma_d F(x_t / sigma_d, t), each with the network at its segment's end t
  (as the deterministic sampler of Heek et al. 2024). M = 1 is 1-step consistency
  sampling.
  """
  ts = segments_lib.boundaries(segments)
  x = sigma_d * noise
  for t, s in zip(ts[:0:-1], ts[-2::-1]):
    tb = jnp.full((x.shape[0],), t, jnp.float32)
    x = segments_lib.jump(x, F_fn(x / sigma_d, tb), t, s, sigma_d)
  return x


# ------------------------------------------------------------------- PF-ODE

def pf_ode_times(num_steps: int, sigma_d: float, schedule: str = 'edm',
                 sigma_min: float = 0.002, sigma_max: float = DEFAULT_SIGMA_MAX,
                 rho: float = 7.0):
  """Decreasing times t_0 = t_max > ... > t_N = 0 for integrating the PF-ODE.

  'edm': Karras et al. (2022) sigmas sigma_max..sigma_min (rho = 7) mapped by
  t = arctan(sigma / sigma_d), then t_N = 0: N steps, as in EDM. 'uniform': evenly
  spaced in t from t_max to 0.
  """
  if num_steps < 1:
    raise ValueError(f'num_steps must be >= 1, got {num_steps}')
  if schedule == 'uniform':
    return jnp.linspace(t_max(sigma_d, sigma_max), 0.0, num_steps + 1, dtype=jnp.float32)
  if schedule == 'edm':
    i = jnp.arange(num_steps, dtype=jnp.float32) / max(num_steps - 1, 1)
    inv = 1.0 / rho
    sig = (sigma_max**inv + i * (sigma_min**inv - sigma_max**inv))**rho
    ts = trigflow.t_from_sigma(sig, sigma_d)
    return jnp.concatenate([ts, jnp.zeros(1)]).astype(jnp.float32)
  raise ValueError(f'unknown schedule {schedule!r}; use one of {ODE_SCHEDULES}')


def _x0(F_fn, x, t, sigma_d):
  """The data prediction x0 = cos t x - sin t sigma_d F(x / sigma_d, t) at scalar t."""
  return consistency_step(F_fn, x, t, sigma_d)


def _edm_heun_step(F_fn, x, t, t_next, sigma_d, last):
  """EDM's Heun step (Karras et al. 2022, Alg. 1) in x_sigma = x_t / cos t, sigma =
  sigma_d tan t, where dx_sigma/dsigma = (x_sigma - D) / sigma and D = x0; no corrector
  on the last step (to sigma = 0)."""
  sig, sig_next = sigma_d * jnp.tan(t), sigma_d * jnp.tan(t_next)
  x_sig = x / jnp.cos(t)
  d = (x_sig - _x0(F_fn, x, t, sigma_d)) / sig
  x_euler = x_sig + (sig_next - sig) * d
  if last:
    return jnp.cos(t_next) * x_euler
  x_next = jnp.cos(t_next) * x_euler
  d_next = (x_euler - _x0(F_fn, x_next, t_next, sigma_d)) / sig_next
  return jnp.cos(t_next) * (x_sig + (sig_next - sig) * 0.5 * (d + d_next))


def ddim_update(x, x0, t, t_next):
  """x_{t'} = (sin t' / sin t) x + (sin(t - t') / sin t) x0: Eq. 26 written with the data
  prediction (DDIM; also DPM-Solver++'s first-order step)."""
  return (jnp.sin(t_next) * x + jnp.sin(t - t_next) * x0) / jnp.sin(t)


def ode_step(F_fn: FFn, x, t, t_next, sigma_d, solver: str = 'heun', last: bool = False):
  """One step from t to t_next (< t) of the single-step solvers (module docstring)."""
  if solver == 'ddim':
    return ddim_update(x, _x0(F_fn, x, t, sigma_d), t, t_next)
  if solver == 'euler':
    tb = jnp.full((x.shape[0],), t, jnp.float32)
    return x + (t_next - t) * trigflow.pf_ode_drift(F_fn(x / sigma_d, tb), sigma_d)
  if solver == 'heun':
    return _edm_heun_step(F_fn, x, t, t_next, sigma_d, last)
  raise ValueError(f'unknown solver {solver!r}; use one of {ODE_SOLVERS}')


def _log_tan(t):
  """-lambda(t) of TrigFlow: log(sigma / alpha) = log(sigma_d tan t), up to a constant."""
  return jnp.log(jnp.tan(t))


def dpmpp_2m_step(F_fn: FFn, x, t, t_next, t_prev, x0_prev, sigma_d, first, last):
  """DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2) in TrigFlow coordinates: the DDIM update
  with the data prediction extrapolated from the previous step,
  D = (1 + 1/(2r)) x0 - 1/(2r) x0_prev, r = h_prev / h, h = log tan t - log tan t'.
  First and last (t' = 0) steps are first order. Returns (x_next, x0)."""
  x0 = _x0(F_fn, x, t, sigma_d)
  h = _log_tan(t) - _log_tan(jnp.maximum(t_next, 1e-20))
  r = jnp.where(first, 1.0, (_log_tan(t_prev) - _log_tan(t)) / h)
  second = (1 + 0.5 / r) * x0 - (0.5 / r) * x0_prev
  d = jnp.where(first | last, x0, second)
  return ddim_update(x, d, t, t_next), x0


def solve_pf_ode(F_fn: FFn, x_init, ts, sigma_d: float, solver: str = 'heun',
                 return_trajectory: bool = False):
  """Integrates the PF-ODE along the decreasing times `ts` (a static-length array)."""
  if solver not in ODE_SOLVERS:
    raise ValueError(f'unknown solver {solver!r}; use one of {ODE_SOLVERS}')
  ts = jnp.asarray(ts, jnp.float32)
  n = ts.shape[0] - 1

  def body(carry, i):
    x, x0_prev = carry
    t, t_next = ts[i], ts[i + 1]
    if solver == 'dpmpp_2m':
      x_new, x0_prev = dpmpp_2m_step(F_fn, x, t, t_next, ts[jnp.maximum(i - 1, 0)], x0_prev,
                                     sigma_d, i == 0, i == n - 1)
    elif solver == 'heun':
      x_new = jax.lax.cond(i == n - 1,
                           lambda x: ode_step(F_fn, x, t, t_next, sigma_d, 'heun', last=True),
                           lambda x: ode_step(F_fn, x, t, t_next, sigma_d, 'heun'), x)
    else:
      x_new = ode_step(F_fn, x, t, t_next, sigma_d, solver)
    return (x_new, x0_prev), x_new

  (x, _), traj = jax.lax.scan(body, (x_init, jnp.zeros_like(x_init)), jnp.arange(n))
  if return_trajectory:
    return x, jnp.concatenate([x_init[None], traj], axis=0)
  return x


def pf_ode_nfe(num_steps: int, solver: str) -> int:
  """Network evaluations used by `sample_pf_ode` (per guided pair: see the callers)."""
  return 2 * num_steps - 1 if solver == 'heun' else num_steps


def sample_pf_ode(F_fn: FFn, key, shape, sigma_d: float, num_steps: int,
                  solver: str = 'heun', schedule: str = 'edm',
                  sigma_max: float = DEFAULT_SIGMA_MAX, return_trajectory: bool = False):
  """`pf_ode_from_noise` with the draw jax.random.normal(key, shape)."""
  return pf_ode_from_noise(F_fn, jax.random.normal(key, shape, jnp.float32), sigma_d,
                           num_steps, solver, schedule, sigma_max, return_trajectory)


def pf_ode_from_noise(F_fn: FFn, noise, sigma_d: float, num_steps: int,
                      solver: str = 'heun', schedule: str = 'edm',
                      sigma_max: float = DEFAULT_SIGMA_MAX, return_trajectory: bool = False):
  """Teacher sampling: x = sin(t_max) z, z = sigma_d noise ~ N(0, sigma_d^2 I) (noise
  standard normal [B, ...]), integrated to t = 0."""
  ts = pf_ode_times(num_steps, sigma_d, schedule, sigma_max=sigma_max)
  z = sigma_d * noise
  return solve_pf_ode(F_fn, jnp.sin(ts[0]) * z, ts, sigma_d, solver, return_trajectory)
