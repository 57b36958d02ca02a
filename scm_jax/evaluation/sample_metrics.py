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


def class_centered_energy_distance(x: np.ndarray, y: np.ndarray, labels_x: np.ndarray,
                                   labels_y: np.ndarray) -> float:
  """Mean over the classes of x of the energy distance between that class's samples of
  x and of y, each centred on its own mean: the shape of every class's cluster (e.g.
  how concentrated guidance makes it), blind to where the clusters are."""
  def centred(z, labels, k):
    z = np.asarray(z, np.float64).reshape(len(z), -1)[np.asarray(labels) == k]
    return z - z.mean(0)
  return float(np.mean([energy_distance(centred(x, labels_x, k), centred(y, labels_y, k))
                        for k in np.unique(labels_x)]))


def _w2_sq_sorted(px: np.ndarray, py: np.ndarray) -> np.ndarray:
  """Exact squared W2 between 1-D empirical distributions, per column of sorted samples.

  W2^2 = int_0^1 (F^-1(q) - G^-1(q))^2 dq with step quantile functions: integrate over
  the merged breakpoints i/n and j/m (for equal sizes: mean of squared sorted gaps).
  """
  n, m = len(px), len(py)
  edges = np.unique(np.concatenate([[0.0], np.arange(1, n + 1) / n, np.arange(1, m + 1) / m]))
  widths, mid = np.diff(edges), (edges[1:] + edges[:-1]) / 2
  ix = np.minimum((mid * n).astype(np.int64), n - 1)
  iy = np.minimum((mid * m).astype(np.int64), m - 1)
  return np.einsum('k,kp->p', widths, (px[ix] - py[iy])**2)


def sliced_wasserstein(x: np.ndarray, y: np.ndarray, num_projections: int = 256,
                       seed: int = 0) -> float:
  """Sliced Wasserstein-2 distance: sqrt of the mean over random unit directions of the
  exact 1-D W2^2 between the projected empirical distributions (x, y may differ in size).
  """
  x = np.asarray(x, np.float64).reshape(len(x), -1)
  y = np.asarray(y, np.float64).reshape(len(y), -1)
  rng = np.random.default_rng(seed)
  dirs = rng.normal(size=(x.shape[1], num_projections))
  dirs /= np.linalg.norm(dirs, axis=0, keepdims=True)
  px, py = np.sort(x @ dirs, axis=0), np.sort(y @ dirs, axis=0)
  return float(np.sqrt(np.mean(_w2_sq_sorted(px, py))))
