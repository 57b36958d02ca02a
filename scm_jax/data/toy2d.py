"""Synthetic low-dimensional datasets for fast experiments and analytic tests.

All toys except 'gaussian' are scaled so each coordinate has mean ~0 and std
~0.5, matching the sigma_d = 0.5 assumed by TrigFlow. The normalization uses
analytic population moments, so train and test share exactly the same affine
map (no dependence on the sample).
"""

import math
from typing import Callable, Dict, Optional, Tuple

import numpy as np

from scm_jax.data.base import ArraySource, check_split
from scm_jax.errors import ConfigError

SPLITS = ('train', 'test')
TARGET_STD = 0.5

RING8_MODES = 8
RING8_RADIUS = 0.7
RING8_MODE_STD = 0.05

_MOONS_NOISE = 0.05
_SWISSROLL_NOISE = 0.5
_SWISSROLL_T = (1.5 * math.pi, 4.5 * math.pi)  # t ~ U[a, b] along the roll.

Sample = Tuple[np.ndarray, Optional[np.ndarray]]


def ring8_centers() -> np.ndarray:
  """[8, 2] centers of the ring8 modes; label k is centers[k]."""
  angles = 2 * math.pi * np.arange(RING8_MODES) / RING8_MODES
  return RING8_RADIUS * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _ring8(rng: np.random.Generator, n: int) -> Sample:
  # Per-coordinate variance: R^2 / 2 + s^2 = 0.2475, i.e. std ~0.4975.
  labels = rng.integers(0, RING8_MODES, size=n)
  x = ring8_centers()[labels] + RING8_MODE_STD * rng.standard_normal((n, 2))
  return x, labels


def _standardize(x: np.ndarray, mean, std) -> np.ndarray:
  return (x - np.asarray(mean)) / np.asarray(std) * TARGET_STD


def _moons(rng: np.random.Generator, n: int) -> Sample:
  t = math.pi * rng.random(n)
  upper = rng.random(n) < 0.5
  x = np.where(upper, np.cos(t), 1 - np.cos(t))
  y = np.where(upper, np.sin(t), 0.5 - np.sin(t))
  pts = np.stack([x, y], 1) + _MOONS_NOISE * rng.standard_normal((n, 2))
  # Moments for t ~ U[0, pi] and a fair mixture of the two moons.
  var = _MOONS_NOISE**2
  mean = (0.5, 0.25)
  std = (math.sqrt(0.75 + var), math.sqrt(0.5625 - 1 / math.pi + var))
  return _standardize(pts, mean, std), None


def _checkerboard(rng: np.random.Generator, n: int) -> Sample:
  # 8 of the 16 unit squares of [-2, 2]^2; both marginals are U[-2, 2].
  x1 = 4 * rng.random(n) - 2
  x2 = rng.random(n) - 2 * rng.integers(0, 2, size=n) + np.floor(x1) % 2
  std = math.sqrt(16 / 12)
  return _standardize(np.stack([x1, x2], 1), 0.0, std), None


def _swissroll(rng: np.random.Generator, n: int) -> Sample:
  a, b = _SWISSROLL_T
  t = a + (b - a) * rng.random(n)
  pts = np.stack([t * np.cos(t), t * np.sin(t)], 1)
  pts += _SWISSROLL_NOISE * rng.standard_normal((n, 2))
  # E[t cos t] = 2, E[t sin t] = 2 / (3 pi) and
  # E[t^2 cos^2 t] = (29.25 pi^2 -/+ 1.5) / 6 for t ~ U[1.5 pi, 4.5 pi].
  mean = (2.0, 2 / (3 * math.pi))
  second = ((29.25 * math.pi**2 - 1.5) / 6, (29.25 * math.pi**2 + 1.5) / 6)
  var = _SWISSROLL_NOISE**2
  std = tuple(math.sqrt(s - m**2 + var) for s, m in zip(second, mean))
  return _standardize(pts, mean, std), None


TOYS: Dict[str, Callable[[np.random.Generator, int], Sample]] = {
    'ring8': _ring8,
    'moons': _moons,
    'checkerboard': _checkerboard,
    'swissroll': _swissroll,
}
TOY_NAMES = tuple(TOYS) + ('gaussian',)


def sample_toy(toy: str, n: int, rng: np.random.Generator, *,
               mean: float = 0.0, std: float = 0.5, dim: int = 2) -> Sample:
  """Draws `n` points; returns (x float64 [n, d], labels or None)."""
  if toy == 'gaussian':
    return mean + std * rng.standard_normal((n, dim)), None
  if toy not in TOYS:
    raise ConfigError(f'Unknown toy2d dataset {toy!r}; choose one of '
                      f'{list(TOY_NAMES)}.')
  return TOYS[toy](rng, n)


def make_toy2d(toy: str, split: str, *, num_train: int = 50000,
               num_test: int = 5000, mean: float = 0.0, std: float = 0.5,
               dim: int = 2, seed: int = 0) -> ArraySource:
  """Builds a toy source. `dim` and `mean`/`std` only apply to 'gaussian'.

  Train and test are drawn from independent streams default_rng([seed, 0])
  and default_rng([seed, 1]), so they never share points.
  """
  check_split(split, SPLITS, f'toy2d/{toy}')
  n = num_train if split == 'train' else num_test
  if n <= 0:
    raise ConfigError(f'toy2d num_{split} must be positive, got {n}.')
  if toy == 'gaussian' and (std <= 0 or dim <= 0):
    raise ConfigError(f'toy2d gaussian needs std > 0 and dim > 0, got '
                      f'std={std}, dim={dim}.')
  if seed < 0:
    raise ConfigError(f'toy2d seed must be non-negative, got {seed}.')
  rng = np.random.default_rng([seed, SPLITS.index(split)])
  x, labels = sample_toy(toy, n, rng, mean=mean, std=std, dim=dim)
  return ArraySource(x.astype(np.float32), labels,
                     num_classes=RING8_MODES if labels is not None else 0,
                     name=f'toy2d/{toy}')


def from_config(config, split: str) -> ArraySource:
  return make_toy2d(config.toy, split, num_train=config.num_train,
                    num_test=config.num_test, mean=config.mean,
                    std=config.std, dim=config.dim, seed=config.seed)
