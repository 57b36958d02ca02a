"""Multistep consistency models: the t axis in M segments (Heek et al. 2024, "Multistep
Consistency Models"; Lu & Song 2024, Table 6 "multistep sCD").

Segment k covers (s_k, s_{k+1}] with boundaries s_k = k (pi/2) / M, evenly spaced in the
TrigFlow time t. TrigFlow is the cosine (variance-preserving) schedule alpha = cos t,
sigma = sin t, so this is Heek et al.'s spacing (uniform in their t for the cosine
schedule). The multistep consistency function maps x_t to the PF-ODE solution at the
start s of t's segment, parameterized as one DDIM step of the network from t to s:

    f(x_t, t) = cos(t - s) x_t - sin(t - s) sigma_d F(x_t / sigma_d, t),

so f(x, s) = x at every segment start by construction; with M = 1 (s = 0) it is the
ordinary sCM consistency function cos t x_t - sin t sigma_d F.
"""

import math

import jax.numpy as jnp

from scm_jax.core import trigflow


def boundaries(segments: int) -> tuple[float, ...]:
  """Segment starts and the end, increasing: (0, pi/(2M), ..., pi/2), M + 1 values."""
  if segments < 1:
    raise ValueError(f'segments must be >= 1, got {segments}')
  return tuple(math.pi / 2 * k / segments for k in range(segments + 1))


def segment_start(t, segments: int):
  """s(t): the start of the segment (s_k, s_{k+1}] holding t (0 for M = 1 or t <= 0)."""
  if segments == 1:
    return jnp.zeros_like(t)
  width = math.pi / 2 / segments
  k = jnp.clip(jnp.ceil(t / width) - 1, 0, segments - 1)
  return k * width


def jump(x_t, F, t, s, sigma_d):
  """f(x_t, t) = cos(t - s) x_t - sin(t - s) sigma_d F: the DDIM step from t to s with the
  network output F (the consistency function of t's segment, s = its start)."""
  return trigflow.consistency_fn(x_t, F, jnp.asarray(t) - jnp.asarray(s), sigma_d)
