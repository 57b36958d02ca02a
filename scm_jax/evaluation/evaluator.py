"""Sample-quality metrics of a stream of sample batches against reference data.

Metrics (names as passed to `--metrics`) and the feature space they use:

  fid         Fréchet distance of Inception pool3 features (comparable with papers when
              the reference statistics are the standard ones)     [images, 1 or 3 ch]
  fd_dinov2   Fréchet distance of DINOv2 ViT-L/14 CLS features (EDM2's FD_DINOv2;
              needs --dinov2_weights, see dinov2.py)              [images, 1 or 3 ch]
  pr          improved precision / recall (k-NN manifolds) on Inception features
  fd_digits   Fréchet distance of digits-classifier features       [8x8x1 digits]
  pr_digits   precision / recall on digits-classifier features
  digits_cls  classifier entropy / marginal entropy / accuracy vs requested labels
  energy      energy distance on the raw samples                   [any; meant for 2-D]
  swd         sliced Wasserstein-2 on the raw samples

The digits metrics use a network trained here on 1497 images: they rank models of the
digits data against each other and are not comparable with published FID.
"""

import os
from typing import Iterable, Optional

import numpy as np

from scm_jax.errors import ConfigError, DataError
from scm_jax.evaluation import digits_classifier
from scm_jax.evaluation import features as features_lib
from scm_jax.evaluation import fid as fid_lib
from scm_jax.evaluation import precision_recall as pr_lib
from scm_jax.evaluation import sample_metrics
from scm_jax.infra import files

METRICS = ('fid', 'fd_dinov2', 'pr', 'fd_digits', 'pr_digits', 'digits_cls', 'energy', 'swd')
_SPACE = {'fid': 'inception', 'fd_dinov2': 'dinov2', 'pr': 'inception', 'fd_digits': 'digits',
          'pr_digits': 'digits', 'digits_cls': 'digits', 'energy': 'raw', 'swd': 'raw'}
# Fréchet distances: metric -> feature space. fid and fd_dinov2 may use published
# reference statistics instead of reference data.
_FRECHET = {'fid': 'inception', 'fd_dinov2': 'dinov2', 'fd_digits': 'digits'}


def default_metrics(data_shape) -> list[str]:
  """What `--metrics=auto` means for data of this shape."""
  data_shape = tuple(data_shape)
  if data_shape == digits_classifier.IMAGE_SHAPE:
    return ['fd_digits', 'pr_digits', 'digits_cls']
  if len(data_shape) == 3:
    return ['fid', 'pr']
  return ['energy', 'swd']


def check_metrics(metrics, data_shape) -> list[str]:
  """Validates metric names against the data shape; raises ConfigError saying why not."""
  data_shape = tuple(data_shape)
  unknown = [m for m in metrics if m not in METRICS]
  if unknown:
    raise ConfigError(f'unknown metrics {unknown}; choose from {list(METRICS)} or auto.')
  for m in metrics:
    space = _SPACE[m]
    if space == 'digits' and data_shape != digits_classifier.IMAGE_SHAPE:
      raise ConfigError(f'metric {m!r} needs 8x8x1 digits, but the data has shape {data_shape}.')
    if space in ('inception', 'dinov2') and (len(data_shape) != 3 or
                                             data_shape[-1] not in (1, 3)):
      raise ConfigError(f'metric {m!r} needs images [H, W, 1 or 3], but the data has shape '
                        f'{data_shape}; use energy,swd for vectors.')
  return list(metrics)


def needs_reference(metrics, ref_stats: dict) -> list[str]:
  """The metrics that need reference data, given {metric: (mu, sigma) or None}."""
  return [m for m in metrics if ref_stats.get(m) is None]


class Evaluator:
  """Computes `metrics` for sample sets against `reference` (model-space data, [-1, 1]).

  Args:
    metrics: names from METRICS.
    reference: reference samples [N, ...] (e.g. the training set), or None when only
      `fid` / `fd_dinov2` with their reference statistics are asked for.
    inception_weights: converted FID Inception .npz (fid / pr).
    ref_stats: (mu, sigma) for `fid`, e.g. published statistics; default: from reference.
    dinov2_weights: converted DINOv2 .npz (fd_dinov2), see `dinov2.WEIGHTS_HELP`.
    ref_stats_dinov2: (mu, sigma) for `fd_dinov2`; default: from reference.
    digits_weights: digits classifier .npz ('' = the packaged one).
    batch_size: feature-extraction batch (a multiple of the mesh size).
    mesh: devices to shard feature batches over (default: the first device).
    pr_k: neighbourhood size of precision / recall.
    max_energy_samples: energy distance is O(n m); both sets are cut to this size.
    cache_dir: where reference features are cached (ref_<space>_<cache_tag>.npz).
  """

  def __init__(self, metrics, reference: Optional[np.ndarray], *, inception_weights: str = '',
               ref_stats=None, digits_weights: str = '', batch_size: int = 100, mesh=None,
               pr_k: int = pr_lib.DEFAULT_K, max_energy_samples: int = 5000,
               cache_dir: Optional[str] = None, cache_tag: str = '', quantize: bool = True,
               inception_variables=None, inception_input_size: int = 299,
               dinov2_weights: str = '', ref_stats_dinov2=None, dinov2_input_size: int = 224):
    self.metrics = list(metrics)
    self.reference = reference
    self.pr_k = pr_k
    self.max_energy_samples = max_energy_samples
    self.cache_dir, self.cache_tag = cache_dir, cache_tag
    self.ref_stats = {'fid': ref_stats, 'fd_dinov2': ref_stats_dinov2}
    spaces = {_SPACE[m] for m in self.metrics}
    self.extractors = {}
    self._weights = {'inception': inception_weights, 'dinov2': dinov2_weights,
                     'digits': digits_weights or digits_classifier.DEFAULT_WEIGHTS}
    if 'inception' in spaces:
      from scm_jax.evaluation import inception  # pylint: disable=g-import-not-at-top
      if inception_variables is None:
        if not inception_weights:
          raise ConfigError(f'metrics {self.metrics} need the FID Inception weights. '
                            f'{inception.WEIGHTS_HELP}')
        inception_variables = inception.load_inception_params(inception_weights)
      net = inception.InceptionV3FID(inception_input_size)
      self.extractors['inception'] = features_lib.Extractor(
          net.apply, inception_variables, batch_size, mesh,
          prepare=lambda x: features_lib.image_input(x, quantize), name='inception')
    if 'dinov2' in spaces:
      self.extractors['dinov2'] = self._dinov2_extractor(
          dinov2_weights, dinov2_input_size, batch_size, mesh, quantize)
    if 'digits' in spaces:
      variables = digits_classifier.load_classifier(digits_weights)
      self.extractors['digits'] = features_lib.Extractor(
          digits_classifier.features_and_probs_fn, variables, batch_size, mesh, name='digits')
    missing = needs_reference(self.metrics, self.ref_stats)
    if missing and reference is None:
      raise ConfigError(f'metrics {missing} need reference data.')
    self._ref = {}

  def _dinov2_extractor(self, weights, input_size, batch_size, mesh, quantize):
    from scm_jax.evaluation import dinov2  # pylint: disable=g-import-not-at-top
    if not weights:
      raise ConfigError(f'metrics {self.metrics} need the DINOv2 weights. '
                        f'{dinov2.WEIGHTS_HELP}')
    config, variables = dinov2.load_dinov2_params(weights)
    stats = self.ref_stats['fd_dinov2']
    if stats is not None and len(stats[0]) != config.dim:
      raise DataError(f'the FD_DINOv2 reference statistics are {len(stats[0])}-d but '
                      f'{weights} ({dinov2.arch_name(config)}) gives {config.dim}-d features; '
                      'use statistics of the same network (ViT-L/14: 1024-d).')
    return features_lib.Extractor(
        dinov2.feature_fn(config, input_size), variables, batch_size, mesh,
        prepare=lambda x: features_lib.image_input(x, quantize), name='dinov2')

  # ------------------------------------------------------------ reference side

  def _cache_path(self, space: str) -> Optional[str]:
    if not self.cache_dir:
      return None
    # The weights file is part of the name: features of another network never match.
    weights = os.path.splitext(os.path.basename(self._weights.get(space, '')))[0]
    return os.path.join(self.cache_dir, f'ref_{space}{"_" + weights if weights else ""}_'
                        f'{self.cache_tag}.npz')

  def reference_features(self, space: str) -> np.ndarray:
    """Features of the reference set in `space` (cached on disk when cache_dir is set)."""
    if space not in self._ref:
      path = self._cache_path(space)
      if path and os.path.exists(path):
        cached = files.read_npz(path, keys=('features',))
        if 'features' not in cached:
          raise DataError(f'{path} (a reference-feature cache) has no `features`; delete '
                          'it to recompute.')
        self._ref[space] = cached['features']
      else:
        feats = self._features(space, self.reference)[0]
        if path:
          mu, sigma = fid_lib.feature_stats(feats)
          fid_lib.save_stats(path, mu, sigma, features=feats)
        self._ref[space] = feats
    return self._ref[space]

  def _features(self, space: str, x: np.ndarray):
    out = self.extractors[space](x)
    return out if isinstance(out, tuple) else (out, None)

  # ------------------------------------------------------------ sample side

  def evaluate(self, batches: Iterable) -> dict:
    """Metrics of the samples in `batches`, an iterable of (x, labels or None)."""
    feats = {s: [] for s in self.extractors}
    probs, raw, labels, n = [], [], [], 0
    for x, lab in batches:
      n += len(x)
      for space in self.extractors:
        f, p = self._features(space, x)
        feats[space].append(f)
        if p is not None:
          probs.append(p)
      if {'energy', 'swd'} & set(self.metrics):
        raw.append(np.asarray(x).reshape(len(x), -1))
      if lab is not None:
        labels.append(lab)
    feats = {s: np.concatenate(v) for s, v in feats.items()}
    out = {'num_samples': n}
    for metric, space in _FRECHET.items():
      if metric in self.metrics:
        ref = self.ref_stats.get(metric)
        if ref is None:
          ref = fid_lib.feature_stats(self.reference_features(space))
        out[metric] = fid_lib.frechet_distance(*fid_lib.feature_stats(feats[space]), *ref)
    if 'pr' in self.metrics:
      pr = pr_lib.precision_recall(self.reference_features('inception'), feats['inception'],
                                   self.pr_k)
      out.update(precision=pr['precision'], recall=pr['recall'])
    if 'pr_digits' in self.metrics:
      pr = pr_lib.precision_recall(self.reference_features('digits'), feats['digits'],
                                   self.pr_k)
      out.update(precision_digits=pr['precision'], recall_digits=pr['recall'])
    if 'digits_cls' in self.metrics:
      out.update(digits_classifier.class_statistics(
          np.concatenate(probs), np.concatenate(labels) if labels else None))
    if raw:
      x = np.concatenate(raw)
      ref = np.asarray(self.reference).reshape(len(self.reference), -1)
      if 'energy' in self.metrics:
        m = self.max_energy_samples
        out['energy_distance'] = sample_metrics.energy_distance(x[:m], ref[:m])
      if 'swd' in self.metrics:
        out['sliced_wasserstein'] = sample_metrics.sliced_wasserstein(x, ref)
    return out
