"""TensorFlow Datasets via random access (`tfds.data_source`, ArrayRecord).

Random access needs no TensorFlow at run time, but the dataset must already be
prepared in array_record format: this machine may have no network, so by
default nothing is downloaded.

A record is the example as tfds returns it (read from disk and decoded, e.g.
PNG -> uint8 pixels); `decode` maps it to [-1, 1] floats at the configured
size. With data.worker_count > 0 both run in grain's worker processes. (tfds
can return undecoded bytes, but tfds.testing.mock_data cannot serve them
without TensorFlow.)
"""

import pickle
from typing import Any, Dict

import numpy as np

from scm_jax.data.base import (DataSource, Example, resize_image,
                               uint8_to_float)
from scm_jax.errors import ConfigError, DataError


def _prepare_hint(name: str, data_dir: str) -> str:
  where = data_dir or '~/tensorflow_datasets'
  return (f'Prepare it on a machine with internet access with '
          f'`tfds build {name} --file_format=array_record '
          f'--data_dir=DIR`, copy DIR here and pass data.data_dir=DIR '
          f'(looked in {where}).')


def _open(name: str, split: str, data_dir: str, download: bool):
  """Opens the tfds random-access source, turning failures into DataError."""
  # Imported lazily: slow, and only needed by this source.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir or None,
                            download=download)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise DataError(f'TFDS has no dataset named {name!r}; check '
                    f'data.tfds_name.') from e
  except Exception as e:  # pylint: disable=broad-except
    # tfds raises assorted types (KeyError, NotImplementedError, ...) when the
    # dataset or split is not prepared; all are fixed the same way.
    raise DataError(f'TFDS dataset {name!r} (split {split!r}) is not '
                    f'available: {type(e).__name__}: {e}\n'
                    f'{_prepare_hint(name, data_dir)}') from e


class TfdsSource(DataSource):
  """Images (and labels) from a prepared TFDS dataset."""

  def __init__(self, name: str, split: str, *, data_dir: str = '',
               download: bool = False, image_key: str = 'image',
               label_key: str = 'label', image_size: int = 0):
    self._open_args = (name, split, data_dir, download)
    self._ds = _open(*self._open_args)
    features = self._ds.dataset_info.features
    if image_key not in features:
      raise DataError(f'TFDS dataset {name!r} has no feature {image_key!r}; '
                      f'set data.image_key to one of {list(features)}.')
    self._image_key = image_key
    # Unlabeled datasets (or label_key='') give all-zero labels.
    self._label_key = label_key if label_key in features else None
    self.num_classes = 0
    if self._label_key:
      self.num_classes = int(getattr(features[label_key], 'num_classes', 0))
    self._image_size = image_size
    self.name = f'tfds/{name}'
    if len(self._ds) == 0:
      raise DataError(f'TFDS dataset {name!r} split {split!r} is empty.')
    self.shape = self._example_shape(features[image_key].shape, name)

  def _example_shape(self, feature_shape, name: str) -> tuple:
    h, w, c = (tuple(feature_shape) + (1,))[:3]
    if c is None:
      c = self._to_image(self._ds[0]).shape[-1]
    if self._image_size:
      return (self._image_size, self._image_size, c)
    if h is None or w is None:
      raise ConfigError(f'TFDS dataset {name!r} has images of varying size; '
                        f'set data.image_size to resize them.')
    return (h, w, c)

  def __len__(self) -> int:
    return len(self._ds)

  def __getitem__(self, index: int) -> Dict[str, Any]:
    return self._ds[index]

  def decode(self, record: Dict[str, Any]) -> Example:
    label = record[self._label_key] if self._label_key else 0
    return {'x': self._to_image(record), 'label': np.int32(label)}

  def _to_image(self, example: dict) -> np.ndarray:
    """Decoded example -> float32 HWC image in [-1, 1], resized if asked."""
    img = np.asarray(example[self._image_key])
    if img.ndim == 2:
      img = img[..., None]
    if img.dtype != np.uint8:
      raise DataError(f'{self.name}: feature {self._image_key!r} has dtype '
                      f'{img.dtype}; only uint8 images are supported.')
    x = uint8_to_float(img)
    if self._image_size:
      x = resize_image(x, self._image_size)
    return x

  def __getstate__(self):
    state = self.__dict__.copy()
    try:
      pickle.dumps(self._ds)
    except Exception:  # pylint: disable=broad-except
      state['_ds'] = None  # Re-opened by name in the worker process.
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    if self._ds is None:
      self._ds = _open(*self._open_args)


def from_config(config, split: str) -> TfdsSource:
  return TfdsSource(config.tfds_name, split, data_dir=config.data_dir,
                    download=config.download, image_key=config.image_key,
                    label_key=config.label_key, image_size=config.image_size)
