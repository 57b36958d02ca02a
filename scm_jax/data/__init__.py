"""Data sources and the deterministic training batch stream (grain).

Typical use:

  source = build_source(config.data, config.data.split)
  stream = make_stream(source, global_batch_size, seed=config.seed,
                       process_index=jax.process_index(),
                       process_count=jax.process_count(),
                       worker_count=config.data.worker_count,
                       prefetch=config.data.prefetch)
  batch = next(stream)
  state = stream.get_state()  # bytes; stream.set_state(state) resumes.

Evaluation and reference sets read sources directly:
`source.get(np.arange(n))['x']`. See pipeline.py for the stream's order and
what a resumed run must keep (seed, process count, data.worker_count).

For 'array' and 'folder', a `{split}` placeholder in data.path selects
per-split files (e.g. '/data/{split}.npz'); without one every split reads the
same path.
"""

from typing import Callable, Dict

import ml_collections

from scm_jax.data import arrays, digits, image_folder, tfds_source, toy2d
from scm_jax.data.base import ArraySource, Batch, DataSource, resize_image
from scm_jax.data.pipeline import check_loader_options, make_stream
from scm_jax.data.stream import BatchStream, check_batch, per_process_batch
from scm_jax.errors import ConfigError

__all__ = [
    'ArraySource', 'Batch', 'BatchStream', 'DataSource', 'SOURCES',
    'build_source', 'check_batch', 'check_data_config', 'default_data_config',
    'make_stream', 'per_process_batch', 'resize_image',
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
      # grain worker processes decoding examples; 0 = in the training process.
      # Part of the stream's identity: resume with the same value.
      'worker_count': 0,
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


def check_data_config(data_config) -> None:
  """ConfigError for invalid source-independent data settings."""
  if data_config.get('image_size', 0) < 0:
    raise ConfigError(f'data.image_size must be >= 0 (0 = native), got '
                      f'{data_config.image_size}.')
  check_loader_options(data_config.get('prefetch', 0),
                       data_config.get('worker_count', 0))


def build_source(data_config, split: str) -> DataSource:
  """Builds the source named by data_config.name for `split`."""
  name = data_config.name
  if name not in SOURCES:
    raise ConfigError(f'Unknown data source data.name={name!r}; choose one '
                      f'of {sorted(SOURCES)}.')
  check_data_config(data_config)
  return SOURCES[name](data_config, split)
