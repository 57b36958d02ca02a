"""Samplers: consistency sampling (1-step, 2-step, multistep) and PF-ODE solvers.

All samplers take F_fn(x_scaled, t) -> F, the network with its parameters (and labels /
guidance) closed over, where x_scaled = x_t / sigma_d and t has shape [B]. They are pure:
the same key gives the same samples, and they jit as a whole (`jax.jit` a lambda that
builds F_fn from params).
"""

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from scm_jax.core import segments as segments_lib
from scm_jax.core import trigflow

FFn = Callable[[jax.Array, jax.Array], jax.Array]

DEFAULT_T_MID = 1.1  # 2-step intermediate time used by the paper.
ODE_SOLVERS = ('euler', 'heun', 'ddim')
ODE_SCHEDULES = ('edm', 'uniform')


def consistency_times(num_steps: int, t_mid: float = DEFAULT_T_MID,
                      times: Sequence[float] = ()) -> tuple[float, ...]:
  """The time schedule of multistep consistency sampling, starting at pi/2.

  Explicit `times` win; otherwise 1 step -> (pi/2,), 2 steps -> (pi/2, t_mid) and more
  steps -> pi/2 followed by num_steps-1 times spaced evenly from t_mid down to t_mid/(n-1).
  """
  if times:
    ts = tuple(float(t) for t in times)
  elif num_steps == 1:
    ts = (math.pi / 2,)
  elif num_steps == 2:
    ts = (math.pi / 2, float(t_mid))
  elif num_steps > 2:
    n = num_steps - 1
    ts = (math.pi / 2,) + tuple(float(t_mid) * (n - i) / n for i in range(n))
  else:
    raise ValueError(f'num_steps must be >= 1, got {num_steps}')
  if any(not 0 < t <= math.pi / 2 for t in ts) or any(a <= b for a, b in zip(ts, ts[1:])):
    raise ValueError(f'consistency times must decrease within (0, pi/2], got {ts}')
  return ts


def consistency_step(F_fn: FFn, x_t, t, sigma_d):
  """Applies the consistency function f(x_t, t) = cos t x_t - sin t sigma_d F."""
  t = jnp.full((x_t.shape[0],), t, jnp.float32) if jnp.ndim(t) == 0 else t
  return trigflow.consistency_fn(x_t, F_fn(x_t / sigma_d, t), t, sigma_d)


def sample_consistency(F_fn: FFn, key, shape, sigma_d: float,
                       times: Sequence[float] = (math.pi / 2,)):
  """Multistep consistency sampling (1 step: times=(pi/2,); 2 steps: (pi/2, 1.1)).

  x0 = f(z, pi/2) = -sigma_d F(z / sigma_d, pi/2); then for each later t:
  x_t = cos t x0 + sin t z', x0 = f(x_t, t), with fresh z' ~ N(0, sigma_d^2 I).
  """
  keys = jax.random.split(key, len(times))
  x = sigma_d * jax.random.normal(keys[0], shape, jnp.float32)
  x0 = consistency_step(F_fn, x, times[0], sigma_d)
  for k, t in zip(keys[1:], times[1:]):
    z = sigma_d * jax.random.normal(k, shape, jnp.float32)
    x_t = jnp.cos(t) * x0 + jnp.sin(t) * z
    x0 = consistency_step(F_fn, x_t, t, sigma_d)
  return x0


def sample_segments(F_fn: FFn, key, shape, sigma_d: float, segments: int):
  """Sampling a multistep consistency model (loss.segments = M, core/segments.py):
  z ~ N(0, sigma_d^2 I) at pi/2, then M deterministic DDIM-like jumps along the segment
  boundaries pi/2 -> s_{M-1} -> ... -> 0, x_s = cos(t - s) x_t - sin(t - s) sigma_d
  F(x_t / sigma_d, t), each with the network at its segment's end t (as the
  deterministic sampler of Heek et al. 2024). M = 1 is 1-step consistency sampling.
  """
  ts = segments_lib.boundaries(segments)
  x = sigma_d * jax.random.normal(key, shape, jnp.float32)
  for t, s in zip(ts[:0:-1], ts[-2::-1]):
    tb = jnp.full((shape[0],), t, jnp.float32)
    x = segments_lib.jump(x, F_fn(x / sigma_d, tb), t, s, sigma_d)
  return x


# ------------------------------------------------------------------- PF-ODE

def pf_ode_times(num_steps: int, sigma_d: float, schedule: str = 'edm',
                 sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0):
  """Decreasing times t_0 > ... > t_N = 0 for integrating the PF-ODE.

  'edm': Karras et al. (2022) sigmas sigma_max..sigma_min (rho=7) mapped by
  t = arctan(sigma / sigma_d), with t_0 = pi/2 (sigma = inf) so the start is exactly the
  prior, then t_N = 0: N steps, as in EDM. 'uniform': evenly spaced in t.
  """
  if num_steps < 1:
    raise ValueError(f'num_steps must be >= 1, got {num_steps}')
  if schedule == 'uniform':
    return jnp.linspace(jnp.pi / 2, 0.0, num_steps + 1, dtype=jnp.float32)
  if schedule == 'edm':
    i = jnp.arange(num_steps, dtype=jnp.float32) / max(num_steps - 1, 1)
    inv = 1.0 / rho
    sig = (sigma_max**inv + i * (sigma_min**inv - sigma_max**inv))**rho
    ts = trigflow.t_from_sigma(sig, sigma_d).at[0].set(jnp.pi / 2)
    return jnp.concatenate([ts, jnp.zeros(1)]).astype(jnp.float32)
  raise ValueError(f'unknown schedule {schedule!r}; use one of {ODE_SCHEDULES}')


def _drift(F_fn, x, t, sigma_d):
  tb = jnp.full((x.shape[0],), t, jnp.float32)
  return trigflow.pf_ode_drift(F_fn(x / sigma_d, tb), sigma_d)


def ode_step(F_fn: FFn, x, t, t_next, sigma_d, solver: str = 'heun', last: bool = False):
  """One PF-ODE step from t to t_next (< t).

  euler: x + (t_next - t) sigma_d F.  heun: Euler predictor + trapezoidal corrector
  (skipped on the last step, as in EDM: NFE = 2N - 1).  ddim: the TrigFlow exponential
  integrator x' = cos(t - t') x - sin(t - t') sigma_d F, exact when F's x0-prediction is
  constant along the step.
  """
  if solver == 'ddim':
    tb = jnp.full((x.shape[0],), t, jnp.float32)
    h = t - t_next
    return jnp.cos(h) * x - jnp.sin(h) * sigma_d * F_fn(x / sigma_d, tb)
  d = _drift(F_fn, x, t, sigma_d)
  x_euler = x + (t_next - t) * d
  if solver == 'euler' or last:
    return x_euler
  if solver == 'heun':
    d_next = _drift(F_fn, x_euler, t_next, sigma_d)
    return x + (t_next - t) * 0.5 * (d + d_next)
  raise ValueError(f'unknown solver {solver!r}; use one of {ODE_SOLVERS}')


def solve_pf_ode(F_fn: FFn, x_init, ts, sigma_d: float, solver: str = 'heun',
                 return_trajectory: bool = False):
  """Integrates the PF-ODE along the decreasing times `ts` (a static-length array)."""
  ts = jnp.asarray(ts, jnp.float32)
  n = ts.shape[0] - 1

  def body(x, i):
    t, t_next = ts[i], ts[i + 1]
    if solver == 'heun':
      x_new = jax.lax.cond(i == n - 1,
                           lambda x: ode_step(F_fn, x, t, t_next, sigma_d, 'heun', last=True),
                           lambda x: ode_step(F_fn, x, t, t_next, sigma_d, 'heun'), x)
    else:
      x_new = ode_step(F_fn, x, t, t_next, sigma_d, solver)
    return x_new, x_new

  x, traj = jax.lax.scan(body, x_init, jnp.arange(n))
  if return_trajectory:
    return x, jnp.concatenate([x_init[None], traj], axis=0)
  return x


def pf_ode_nfe(num_steps: int, solver: str) -> int:
  """Network evaluations used by `sample_pf_ode`."""
  return 2 * num_steps - 1 if solver == 'heun' else num_steps


def sample_pf_ode(F_fn: FFn, key, shape, sigma_d: float, num_steps: int,
                  solver: str = 'heun', schedule: str = 'edm',
                  return_trajectory: bool = False):
  """Teacher sampling: z ~ N(0, sigma_d^2 I) at t = pi/2, integrated to t = 0."""
  z = sigma_d * jax.random.normal(key, shape, jnp.float32)
  ts = pf_ode_times(num_steps, sigma_d, schedule)
  return solve_pf_ode(F_fn, z, ts, sigma_d, solver, return_trajectory)
