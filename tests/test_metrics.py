"""Fréchet distance, precision/recall, energy distance and sliced Wasserstein: numbers
against independent computations and analytic cases."""

import numpy as np
import pytest
import scipy.linalg
from scipy.spatial.distance import cdist

from scm_jax.errors import DataError
from scm_jax.evaluation import fid, precision_recall, sample_metrics


def _scipy_fid(mu1, s1, mu2, s2):
  """The pytorch-fid formula: scipy.linalg.sqrtm of the (non-symmetric) product."""
  covmean = scipy.linalg.sqrtm(s1 @ s2).real
  return float(np.sum((mu1 - mu2)**2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_frechet_distance_matches_scipy_on_random_features():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(500, 32)) @ rng.normal(size=(32, 32))
  b = 0.7 * rng.normal(size=(400, 32)) @ rng.normal(size=(32, 32)) + 0.3
  mu1, s1 = np.mean(a, 0), np.cov(a, rowvar=False)
  mu2, s2 = np.mean(b, 0), np.cov(b, rowvar=False)
  got = fid.frechet_distance(mu1, s1, mu2, s2)
  want = _scipy_fid(mu1, s1, mu2, s2)
  assert want > 1.0
  np.testing.assert_allclose(got, want, rtol=1e-8)
  assert abs(fid.frechet_distance(mu1, s1, mu1, s1)) < 1e-8


def test_frechet_distance_analytic_diagonal_gaussians():
  # Commuting covariances: d^2 = |dmu|^2 + sum (sqrt(a_i) - sqrt(b_i))^2.
  a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 4.0, 1.0])
  mu1, mu2 = np.zeros(3), np.array([1.0, 2.0, 0.0])
  want = 5.0 + np.sum((np.sqrt(a) - np.sqrt(b))**2)
  assert np.isclose(fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)), want, rtol=1e-10)


def test_frechet_distance_rank_deficient_covariances_are_finite():
  # Fewer samples than dimensions (a singular covariance) must not give NaN.
  rng = np.random.default_rng(1)
  a, b = rng.normal(size=(10, 64)), rng.normal(size=(10, 64)) + 1.0
  d = fid.frechet_distance(*fid.feature_stats(a), *fid.feature_stats(b))
  assert np.isfinite(d) and d > 64 * 0.5


def test_running_stats_are_batch_invariant_and_match_numpy():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(301, 7)) * 3 + 5
  stats = fid.RunningStats(7)
  for i in range(0, 301, 64):
    stats.update(x[i:i + 64])
  np.testing.assert_allclose(stats.mu, x.mean(0), rtol=1e-12)
  np.testing.assert_allclose(stats.sigma, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-12)


def test_stats_file_round_trip_and_errors(tmp_path):
  mu, sigma = np.arange(3.0), np.eye(3)
  path = str(tmp_path / 'ref.npz')
  fid.save_stats(path, mu, sigma)
  m, s = fid.load_stats(path, 3)
  np.testing.assert_array_equal(m, mu)
  np.testing.assert_array_equal(s, sigma)
  with pytest.raises(DataError, match='2048'):
    fid.load_stats(path, 2048)
  np.savez(str(tmp_path / 'bad.npz'), mean=mu)
  with pytest.raises(DataError, match='mu'):
    fid.load_stats(str(tmp_path / 'bad.npz'))
  with pytest.raises(DataError, match='not found'):
    fid.load_stats(str(tmp_path / 'missing.npz'))


# ----------------------------------------------------------- precision / recall

def _brute_precision_recall(real, fake, k):
  def radii(x):
    return np.sort(cdist(x, x), axis=1)[:, k]  # column 0 is the point itself
  def coverage(q, p, r):
    return float(np.mean(np.any(cdist(q, p) <= r[None, :], axis=1)))
  return coverage(fake, real, radii(real)), coverage(real, fake, radii(fake))


def test_precision_recall_matches_brute_force_with_chunks():
  rng = np.random.default_rng(3)
  real = rng.normal(size=(250, 5))
  fake = 1.3 * rng.normal(size=(190, 5)) + 0.4
  got = precision_recall.precision_recall(real, fake, k=3, chunk=64)  # padded chunks
  p, r = _brute_precision_recall(real, fake, 3)
  assert abs(got['precision'] - p) <= 1 / 190 and abs(got['recall'] - r) <= 1 / 250
  assert 0.2 < p < 0.95 and 0.2 < r < 0.99  # a case where both are informative


def test_precision_recall_detect_mode_dropping_and_bad_samples():
  rng = np.random.default_rng(4)
  centers = np.array([[-5.0, 0.0], [5.0, 0.0]])
  real = centers[rng.integers(0, 2, 1000)] + 0.5 * rng.normal(size=(1000, 2))
  same = centers[rng.integers(0, 2, 1000)] + 0.5 * rng.normal(size=(1000, 2))
  one_mode = centers[0] + 0.5 * rng.normal(size=(1000, 2))
  off = np.array([0.0, 20.0]) + 0.5 * rng.normal(size=(1000, 2))
  pr_same = precision_recall.precision_recall(real, same)
  pr_drop = precision_recall.precision_recall(real, one_mode)
  pr_off = precision_recall.precision_recall(real, off)
  assert pr_same['precision'] > 0.9 and pr_same['recall'] > 0.9
  assert pr_drop['precision'] > 0.9 and 0.4 < pr_drop['recall'] < 0.6
  assert pr_off['precision'] == 0.0 and pr_off['recall'] == 0.0


# -------------------------------------------------------- energy / sliced W2

def test_energy_distance_matches_cdist_computation():
  rng = np.random.default_rng(5)
  x, y = rng.normal(size=(300, 3)), rng.normal(size=(200, 3)) + 0.3
  n, m = len(x), len(y)
  want = (2 * cdist(x, y).mean() - cdist(x, x).sum() / (n * (n - 1))
          - cdist(y, y).sum() / (m * (m - 1)))
  np.testing.assert_allclose(sample_metrics.energy_distance(x, y), want, rtol=1e-10)
  same = sample_metrics.energy_distance(x, rng.normal(size=(300, 3)))
  assert abs(same) < 0.2 * want


def test_class_centered_energy_distance_sees_cluster_shape_not_position():
  """Per class, each set centred on its own mean: moving the clusters changes nothing,
  shrinking them does; the value is the mean of the per-class energy distances."""
  rng = np.random.default_rng(7)
  labels = np.arange(400) % 4
  centers = rng.normal(size=(4, 2)) * 3
  x = centers[labels] + 0.5 * rng.normal(size=(400, 2))
  y = centers[labels] + 0.5 * rng.normal(size=(400, 2))
  moved = y + rng.normal(size=(4, 2))[labels]
  ed = sample_metrics.class_centered_energy_distance
  np.testing.assert_allclose(ed(x, moved, labels, labels), ed(x, y, labels, labels), atol=1e-12)
  assert sample_metrics.energy_distance(x, moved) > 10 * abs(ed(x, y, labels, labels))
  shrunk = centers[labels] + 0.1 * rng.normal(size=(400, 2))
  by_class = [sample_metrics.energy_distance(x[labels == k] - x[labels == k].mean(0),
                                             shrunk[labels == k] - shrunk[labels == k].mean(0))
              for k in range(4)]
  np.testing.assert_allclose(ed(x, shrunk, labels, labels), np.mean(by_class), rtol=1e-12)
  assert ed(x, shrunk, labels, labels) > 10 * abs(ed(x, y, labels, labels))


def test_sliced_wasserstein_one_dim_equals_w2_and_gaussian_shift():
  rng = np.random.default_rng(6)
  x, y = rng.normal(size=(1000, 1)), 2.0 * rng.normal(size=(1000, 1)) + 1.0
  w2 = np.sqrt(np.mean((np.sort(x[:, 0]) - np.sort(y[:, 0]))**2))
  np.testing.assert_allclose(sample_metrics.sliced_wasserstein(x, y), w2, rtol=1e-10)
  # Isotropic Gaussians shifted by delta in d dims: SW2^2 = E[(theta . delta)^2] = |delta|^2/d.
  d, delta = 4, np.array([2.0, 0.0, 0.0, 0.0])
  a = rng.normal(size=(20000, d))
  b = rng.normal(size=(20000, d)) + delta
  sw = sample_metrics.sliced_wasserstein(a, b, num_projections=512)
  assert abs(sw - np.sqrt(4.0 / d)) < 0.06


def test_sliced_wasserstein_unequal_sizes_is_exact_empirical_w2():
  # x = {0, 1}, y = {0, 0.5, 1}: quantile functions differ by 0.5 on (1/3, 1/2) and
  # by 0.5 on (1/2, 2/3), so W2^2 = 2 * (1/6) * 0.25 = 1/12.
  x, y = np.array([[0.0], [1.0]]), np.array([[0.0], [0.5], [1.0]])
  np.testing.assert_allclose(sample_metrics.sliced_wasserstein(x, y, 4), np.sqrt(1 / 12), rtol=1e-12)
