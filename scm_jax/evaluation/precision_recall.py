"""Improved precision and recall (Kynkäänniemi et al., NeurIPS 2019).

Each set's manifold is the union of balls around its points with radius = distance to
the k-th nearest neighbour within the set (k = 3 in the paper). Precision = fraction of
generated points inside the real manifold (quality); recall = fraction of real points
inside the generated manifold (coverage). Distances are computed in row chunks on the
accelerator, so memory is O(chunk x N), never N x N.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from scm_jax.evaluation import features as features_lib

DEFAULT_K = 3


def _sq_dists(a: jax.Array, b: jax.Array) -> jax.Array:
  d2 = (jnp.sum(a * a, 1)[:, None] + jnp.sum(b * b, 1)[None, :]
        - 2.0 * jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST))
  return jnp.maximum(d2, 0.0)


@functools.partial(jax.jit, static_argnames='k')
def _kth_sq_dist(rows, points, k: int):
  # The point itself is among `points` at distance 0, so the k-th neighbour is the
  # (k+1)-th smallest distance (as in the authors' code).
  neg, _ = jax.lax.top_k(-_sq_dists(rows, points), k + 1)
  return -neg[:, -1]


@jax.jit
def _inside(queries, points, sq_radii):
  return jnp.any(_sq_dists(queries, points) <= sq_radii[None, :], axis=1)


def knn_sq_radii(features: np.ndarray, k: int = DEFAULT_K, chunk: int = 1024) -> np.ndarray:
  """Squared distance from each point to its k-th nearest other point in the set."""
  features = np.asarray(features, np.float32)
  if len(features) <= k:
    raise ValueError(f'k-NN radii need more than k={k} points, got {len(features)}.')
  points = jnp.asarray(features)
  return features_lib.batched(lambda r: _kth_sq_dist(r, points, k), features,
                              min(chunk, len(features)))


def manifold_coverage(queries: np.ndarray, points: np.ndarray, sq_radii: np.ndarray,
                      chunk: int = 1024) -> float:
  """Fraction of `queries` inside the union of balls B(points_j, radius_j)."""
  queries = np.asarray(queries, np.float32)
  p, r = jnp.asarray(points, jnp.float32), jnp.asarray(sq_radii, jnp.float32)
  inside = features_lib.batched(lambda q: _inside(q, p, r), queries,
                                min(chunk, len(queries)))
  return float(np.mean(inside))


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = DEFAULT_K,
                     chunk: int = 1024) -> dict:
  """{'precision', 'recall'} of generated features `fake` against `real` ([N, D] each)."""
  real = np.asarray(real, np.float32).reshape(len(real), -1)
  fake = np.asarray(fake, np.float32).reshape(len(fake), -1)
  return {
      'precision': manifold_coverage(fake, real, knn_sq_radii(real, k, chunk), chunk),
      'recall': manifold_coverage(real, fake, knn_sq_radii(fake, k, chunk), chunk),
  }
