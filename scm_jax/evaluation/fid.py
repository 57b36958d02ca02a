"""Fréchet distance between Gaussian fits of feature sets (FID: Heusel et al., 2017).

    d^2 = ||mu_1 - mu_2||^2 + tr(S_1) + tr(S_2) - 2 tr((S_1 S_2)^{1/2})

With Inception pool3 features this is FID; with any other network (e.g. the digits
classifier) it is a Fréchet distance in that network's feature space, not comparable
with published FID. Statistics use the same conventions as pytorch-fid / clean-fid
(float64, unbiased covariance), and reference files are their `.npz` with `mu` and
`sigma`, so published reference statistics can be used directly.
"""


import numpy as np

from scm_jax.errors import DataError
from scm_jax.infra import files


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
  """tr((S1 S2)^{1/2}) for symmetric PSD S1, S2, via symmetric eigendecompositions.

  S1 S2 is similar to S1^{1/2} S2 S1^{1/2} (symmetric PSD), so the trace of its square
  root is the sum of square roots of that matrix's eigenvalues. Stable where a general
  `sqrtm` of the non-symmetric product needs an epsilon fix for singular covariances
  (which happen whenever there are fewer samples than feature dimensions).
  """
  w1, v1 = np.linalg.eigh(np.asarray(sigma1, np.float64))
  root1 = (v1 * np.sqrt(np.clip(w1, 0.0, None))) @ v1.T
  m = root1 @ np.asarray(sigma2, np.float64) @ root1
  eig = np.linalg.eigvalsh((m + m.T) / 2)
  return float(np.sum(np.sqrt(np.clip(eig, 0.0, None))))


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """Squared Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (the FID value)."""
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
    raise DataError(f'feature statistics do not match: mu {mu1.shape} vs {mu2.shape}, '
                    f'sigma {sigma1.shape} vs {sigma2.shape} (different feature networks?).')
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2)
               - 2.0 * trace_sqrt_product(sigma1, sigma2))


class RunningStats:
  """Streaming mean and unbiased covariance of feature batches (float64 sums).

  Order- and batching-independent up to float64 rounding, so features can be extracted
  in any batch size or sharding.
  """

  def __init__(self, dim: int):
    self.n = 0
    self._sum = np.zeros(dim, np.float64)
    self._outer = np.zeros((dim, dim), np.float64)

  def update(self, features: np.ndarray) -> None:
    f = np.asarray(features, np.float64).reshape(len(features), -1)
    self.n += len(f)
    self._sum += f.sum(0)
    self._outer += f.T @ f

  @property
  def mu(self) -> np.ndarray:
    return self._sum / self.n

  @property
  def sigma(self) -> np.ndarray:
    if self.n < 2:
      raise DataError('a covariance needs at least 2 samples.')
    mu = self.mu
    return (self._outer - self.n * np.outer(mu, mu)) / (self.n - 1)


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) of [N, D] features, as np.mean / np.cov(rowvar=False)."""
  stats = RunningStats(np.asarray(features).reshape(len(features), -1).shape[1])
  stats.update(features)
  return stats.mu, stats.sigma


def save_stats(path: str, mu: np.ndarray, sigma: np.ndarray, **extra) -> None:
  """Writes a reference-statistics .npz (`mu`, `sigma`, as pytorch-fid), atomically."""
  files.atomic_savez(path, mu=mu, sigma=sigma, **extra)


def load_stats(path: str, dim: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) from a pytorch-fid / clean-fid style .npz, checked for shape and dim."""
  try:
    arrays = files.read_npz(path, keys=('mu', 'sigma'))
  except FileNotFoundError:
    raise DataError(f'reference statistics {path} not found.') from None
  except (OSError, DataError) as e:
    raise DataError(f'reference statistics: {e}') from None
  if 'mu' not in arrays or 'sigma' not in arrays:
    raise DataError(f'{path} lacks {"`mu`" if "mu" not in arrays else "`sigma`"}: reference '
                    'statistics need `mu` and `sigma` (the pytorch-fid / clean-fid .npz '
                    'format).')
  mu, sigma = arrays['mu'].astype(np.float64), arrays['sigma'].astype(np.float64)
  if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
    raise DataError(f'{path}: mu {mu.shape} and sigma {sigma.shape} are not a mean and its '
                    'covariance.')
  if dim and mu.shape[0] != dim:
    raise DataError(f'{path} holds {mu.shape[0]}-d statistics but the features are {dim}-d '
                    '(FID: Inception pool3, 2048-d; FD_DINOv2: ViT-L/14 CLS, 1024-d).')
  return mu, sigma
