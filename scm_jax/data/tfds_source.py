"""TensorFlow Datasets via random access (`tfds.data_source`, ArrayRecord).

Random access needs no TensorFlow at run time, but the dataset must already be
prepared in array_record format: this machine may have no network, so by
default nothing is downloaded.
"""

import numpy as np

from scm_jax.data.base import (Batch, DataSource, resize_image,
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
    self._ds = _open(name, split, data_dir, download)
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

  def _to_image(self, record: dict) -> np.ndarray:
    """Decoded record -> float32 HWC image in [-1, 1], resized if asked."""
    img = np.asarray(record[self._image_key])
    if img.ndim == 2:
      img = img[..., None]
    if img.dtype != np.uint8:
      raise DataError(f'{self.name}: feature {self._image_key!r} has dtype '
                      f'{img.dtype}; only uint8 images are supported.')
    x = uint8_to_float(img)
    if self._image_size:
      x = resize_image(x, self._image_size)
    return x

  def get(self, indices: np.ndarray) -> Batch:
    indices = np.asarray(indices, np.int64)
    records = [self._ds[int(i)] for i in indices]
    x = np.zeros((0,) + self.shape, np.float32)
    if records:
      x = np.stack([self._to_image(r) for r in records])
    if self._label_key:
      labels = np.asarray([r[self._label_key] for r in records], np.int32)
    else:
      labels = np.zeros(len(records), np.int32)
    return {'x': x, 'label': labels}


def from_config(config, split: str) -> TfdsSource:
  return TfdsSource(config.tfds_name, split, data_dir=config.data_dir,
                    download=config.download, image_key=config.image_key,
                    label_key=config.label_key, image_size=config.image_size)
