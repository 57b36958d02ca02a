"""Core data abstractions: random-access sources of raw records.

Everything here is plain numpy (no JAX) so data loading never touches the
accelerator and can run in grain worker processes or a background thread.

A source is a grain `RandomAccessDataSource`: `source[i]` returns a cheap raw
record (a pixel row, a file path, an encoded image) and `source.decode(record)`
turns it into one example; the training pipeline (`pipeline.py`) runs `decode`
as a grain transform, in worker processes when `data.worker_count > 0`.
"""

import abc
from typing import Any, Callable, Dict, Optional, Tuple

import grain
import numpy as np
from PIL import Image

from scm_jax.errors import ConfigError, DataError

Batch = Dict[str, np.ndarray]
Example = Dict[str, np.ndarray]

# Records in memory or on a local disk: grain's read threads (default 16, 500
# records ahead) cost ~5x more per record than the read itself, and decoding
# in them contends for the GIL; measured in benchmarks/RESULTS.md ("Input
# pipeline"). Sources on remote storage may set more threads.
LOCAL_READ = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


class DataSource(abc.ABC):
  """A finite, random-access collection of examples (a grain data source).

  Subclasses implement `__len__`, `__getitem__` (one raw record) and `decode`
  (record -> example); `get` decodes a batch for evaluation and reference
  sets, and may be overridden with a vectorized version. Instances must pickle
  cheaply (by file path, not by data) because grain workers receive a copy.

  Attributes:
    shape: shape of one example `x` (e.g. (32, 32, 3) or (2,)).
    num_classes: number of label classes; 0 when the source is unlabeled.
    name: short human-readable name used in logs and error messages.
    read_options: grain ReadOptions for `source[i]` in the training stream.
  """

  shape: Tuple[int, ...]
  num_classes: int
  name: str
  read_options: grain.ReadOptions = LOCAL_READ

  @abc.abstractmethod
  def __len__(self) -> int:
    """Number of examples."""

  @abc.abstractmethod
  def __getitem__(self, index: int) -> Any:
    """The raw record `index` (cheap: decoding happens in `decode`)."""

  @abc.abstractmethod
  def decode(self, record: Any) -> Example:
    """Returns {'x': float32 array of `shape`, 'label': int32 scalar}.

    Images are HWC in [-1, 1]; vectors are in their natural units. 'label' is
    0 when the source has no labels.
    """

  def get(self, indices: np.ndarray) -> Batch:
    """Returns {'x': float32 [n, *shape], 'label': int32 [n]} for `indices`."""
    examples = [self.decode(self[int(i)]) for i in np.asarray(indices)]
    if not examples:
      return {'x': np.zeros((0,) + tuple(self.shape), np.float32),
              'label': np.zeros(0, np.int32)}
    return {'x': np.stack([e['x'] for e in examples]),
            'label': np.asarray([e['label'] for e in examples], np.int32)}

  def __repr__(self) -> str:
    # grain checks a restored stream state against repr(source): it names the
    # data without holding any of it.
    return (f'{type(self).__name__}(name={self.name!r}, len={len(self)}, '
            f'shape={tuple(self.shape)}, num_classes={self.num_classes})')


class ArraySource(DataSource):
  """A source backed by in-memory (or memory-mapped) arrays.

  `x` may be uint8 (converted to [-1, 1] when decoded, so large datasets stay
  4x smaller in memory) or float32 (returned as is). If `image_size` is set,
  images are center-cropped and resized when decoded.

  A memory-mapped `x` must come with `reopen`, a picklable callable returning
  the same array: the source then pickles by it (e.g. a file path) instead of
  copying the data into every grain worker.
  """

  def __init__(self, x: np.ndarray, labels: Optional[np.ndarray], *,
               num_classes: int, name: str, image_size: int = 0,
               reopen: Optional[Callable[[], np.ndarray]] = None):
    if len(x) == 0:
      raise DataError(f'Data source {name!r} has no examples.')
    self._x = x
    self._reopen = reopen
    self._labels = (np.zeros(len(x), np.int32) if labels is None
                    else np.asarray(labels, np.int32))
    self._image_size = image_size
    self.num_classes = num_classes
    self.name = name
    example_shape = tuple(int(d) for d in x.shape[1:])
    if image_size and len(example_shape) == 3:
      example_shape = (image_size, image_size, example_shape[2])
    self.shape = example_shape

  def __len__(self) -> int:
    return len(self._x)

  def __getitem__(self, index: int) -> Tuple[np.ndarray, np.int32]:
    return self._x[index], self._labels[index]

  def decode(self, record: Tuple[np.ndarray, np.int32]) -> Example:
    x, label = record
    return {'x': self._to_float(x[None])[0], 'label': label}

  def get(self, indices: np.ndarray) -> Batch:
    indices = np.asarray(indices, np.int64)
    return {'x': self._to_float(self._x[indices]),
            'label': self._labels[indices]}

  def _to_float(self, x: np.ndarray) -> np.ndarray:
    """[n, ...] stored rows -> float32 [n, *shape]."""
    x = uint8_to_float(x) if x.dtype == np.uint8 else np.asarray(x, np.float32)
    if x.ndim == 4 and x.shape[1:] != self.shape:
      x = np.stack([resize_image(img, self._image_size) for img in x])
    return x

  def __getstate__(self):
    state = self.__dict__.copy()
    if self._reopen is not None:
      state['_x'] = None  # Re-opened by path on unpickling (no data copied).
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    if self._x is None:
      self._x = self._reopen()


def uint8_to_float(x: np.ndarray) -> np.ndarray:
  """Maps uint8 pixel values {0..255} to float32 in [-1, 1]."""
  return x.astype(np.float32) / 127.5 - 1.0


def center_crop_square(img: np.ndarray) -> np.ndarray:
  """Crops the largest centered square from an HWC image."""
  h, w = img.shape[:2]
  s = min(h, w)
  top, left = (h - s) // 2, (w - s) // 2
  return img[top:top + s, left:left + s]


def resize_image(img: np.ndarray, size: int) -> np.ndarray:
  """Center-crops an HWC float32 image to a square and resizes it bilinearly.

  Works channel by channel in PIL's 32-bit float mode, so there is no extra
  uint8 quantization and any channel count is supported. PIL's bilinear
  filter antialiases when downsampling and its weights are non-negative, so
  values stay within the input range.
  """
  img = center_crop_square(img)
  if img.shape[0] == size:
    return img.astype(np.float32)
  channels = [
      np.asarray(Image.fromarray(np.ascontiguousarray(img[..., c], np.float32))
                 .resize((size, size), Image.BILINEAR))
      for c in range(img.shape[-1])
  ]
  return np.stack(channels, axis=-1)


def check_split(split: str, allowed: Tuple[str, ...], source: str) -> str:
  """Raises ConfigError unless `split` is one of the splits `source` has."""
  if split not in allowed:
    raise ConfigError(f'Data source {source!r} has no split {split!r}; '
                      f'choose one of {list(allowed)}.')
  return split


def format_split_path(path: str, split: str) -> str:
  """Substitutes `{split}` in a path so train and eval can use other files."""
  return path.format(split=split) if '{split}' in path else path
