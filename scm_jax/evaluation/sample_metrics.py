"""Distances between sample sets that need no pretrained network (low-dim data).

Energy distance (Szekely & Rizzo): 2 E|X-Y| - E|X-X'| - E|Y-Y'|, zero iff the
distributions match; the unbiased form (diagonal excluded) is used within sets.
Sliced Wasserstein-2: average over random directions of the 1-D W2 between projections.
"""

import numpy as np


def _mean_pairwise_dist(a: np.ndarray, b: np.ndarray, same: bool, chunk: int = 2048) -> float:
  total, count = 0.0, 0
  for i in range(0, len(a), chunk):
    ai = a[i:i + chunk]
    d2 = (np.sum(ai**2, 1)[:, None] + np.sum(b**2, 1)[None, :] - 2.0 * ai @ b.T)
    d = np.sqrt(np.maximum(d2, 0.0))
    if same:
      idx = np.arange(len(ai))
      d[idx, idx + i] = 0.0
    total += float(d.sum())
    count += d.size - (len(ai) if same else 0)
  return total / count


def energy_distance(x: np.ndarray, y: np.ndarray) -> float:
  """Energy distance between samples x [n, d] and y [m, d] (float64, O(nm) memory in chunks)."""
  x = np.asarray(x, np.float64).reshape(len(x), -1)
  y = np.asarray(y, np.float64).reshape(len(y), -1)
  return (2.0 * _mean_pairwise_dist(x, y, False) - _mean_pairwise_dist(x, x, True)
          - _mean_pairwise_dist(y, y, True))


def sliced_wasserstein(x: np.ndarray, y: np.ndarray, num_projections: int = 256,
                       seed: int = 0) -> float:
  """Sliced Wasserstein-2 distance: sqrt of the mean over directions of the 1-D W2^2.

  The 1-D W2 compares quantiles, so x and y may differ in size (quantiles are
  interpolated on a common grid).
  """
  x = np.asarray(x, np.float64).reshape(len(x), -1)
  y = np.asarray(y, np.float64).reshape(len(y), -1)
  rng = np.random.default_rng(seed)
  dirs = rng.normal(size=(x.shape[1], num_projections))
  dirs /= np.linalg.norm(dirs, axis=0, keepdims=True)
  px, py = np.sort(x @ dirs, axis=0), np.sort(y @ dirs, axis=0)
  q = (np.arange(max(len(x), len(y))) + 0.5) / max(len(x), len(y))
  qx = np.stack([np.quantile(px[:, j], q, method='linear') for j in range(num_projections)], 1)
  qy = np.stack([np.quantile(py[:, j], q, method='linear') for j in range(num_projections)], 1)
  return float(np.sqrt(np.mean((qx - qy)**2)))
