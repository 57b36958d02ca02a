"""Data sources and the deterministic training batch stream.

Typical use:

  source = build_source(config.data, config.data.split)
  batches = BatchIterator(source, global_batch_size, seed=config.data.seed,
                          process_index=jax.process_index(),
                          process_count=jax.process_count(),
                          prefetch=config.data.prefetch)

For 'array' and 'folder', a `{split}` placeholder in data.path selects
per-split files (e.g. '/data/{split}.npz'); without one every split reads the
same path.
"""

from typing import Callable, Dict

import ml_collections

from scm_jax.data import arrays, digits, image_folder, tfds_source, toy2d
from scm_jax.data.base import (ArraySource, Batch, BatchIterator, DataSource,
                               batch_indices, resize_image)
from scm_jax.errors import ConfigError

__all__ = [
    'ArraySource', 'Batch', 'BatchIterator', 'DataSource', 'SOURCES',
    'batch_indices', 'build_source', 'default_data_config', 'resize_image',
]

# name -> builder(data_config, split) -> DataSource.
SOURCES: Dict[str, Callable[..., DataSource]] = {
    'toy2d': toy2d.from_config,
    'digits': digits.from_config,
    'array': arrays.from_config,
    'folder': image_folder.from_config,
    'tfds': tfds_source.from_config,
}


def default_data_config() -> ml_collections.ConfigDict:
  """Every data knob with its default; experiment configs start from this."""
  return ml_collections.ConfigDict({
      'name': 'digits',  # One of SOURCES.
      'split': 'train',  # Training split.
      'eval_split': 'test',
      'use_labels': False,  # Read by the model config (class conditioning).
      'prefetch': 2,  # Batches loaded ahead in a background thread; 0 = off.
      'image_size': 0,  # 0 = native; else center-crop and resize (images).
      # toy2d.
      'toy': 'ring8',  # ring8 | moons | checkerboard | swissroll | gaussian.
      'num_train': 50000,
      'num_test': 5000,
      'mean': 0.0,  # 'gaussian' only: N(mean, std^2) in `dim` coordinates.
      'std': 0.5,
      'dim': 2,
      'seed': 0,  # Data generation seed; train/test use distinct streams.
      # array: .npz ('x'|'images'|'image', optional 'label'|'labels') or .npy.
      'path': '',  # Also the image directory for 'folder'.
      'expected_shape': (),  # Optional per-example shape check.
      'latents': False,  # Float arrays are VAE latents: any finite range is valid.
      # folder.
      'labels_from_subdirs': False,
      'channels': 3,  # 1 = grayscale.
      # tfds.
      'tfds_name': 'cifar10',
      'data_dir': '',  # '' = tfds default (~/tensorflow_datasets).
      'download': False,
      'image_key': 'image',
      'label_key': 'label',
  })


def _check_common(data_config):
  if data_config.get('image_size', 0) < 0:
    raise ConfigError(f'data.image_size must be >= 0 (0 = native), got '
                      f'{data_config.image_size}.')
  if data_config.get('prefetch', 0) < 0:
    raise ConfigError(f'data.prefetch must be >= 0, got '
                      f'{data_config.prefetch}.')


def build_source(data_config, split: str) -> DataSource:
  """Builds the source named by data_config.name for `split`."""
  name = data_config.name
  if name not in SOURCES:
    raise ConfigError(f'Unknown data source data.name={name!r}; choose one '
                      f'of {sorted(SOURCES)}.')
  _check_common(data_config)
  return SOURCES[name](data_config, split)
