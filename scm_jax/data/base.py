"""Core data abstractions: random-access sources and a resumable batch stream.

Everything here is plain numpy (no JAX) so data loading never touches the
accelerator and can run in a background thread.

The training stream is defined so that batch `b` is a pure function of
(seed, b, process slice): checkpoints only need to store the step counter, and
a resumed run sees bit-identical batches to an uninterrupted one.
"""

import abc
import functools
import queue
import threading
from typing import Any, Dict, Iterator, Optional, Tuple

import numpy as np
from PIL import Image

from scm_jax.errors import ConfigError, DataError

Batch = Dict[str, np.ndarray]


class DataSource(abc.ABC):
  """A finite, random-access collection of examples.

  Attributes:
    shape: shape of one example `x` (e.g. (32, 32, 3) or (2,)).
    num_classes: number of label classes; 0 when the source is unlabeled.
    name: short human-readable name used in logs and error messages.
  """

  shape: Tuple[int, ...]
  num_classes: int
  name: str

  @abc.abstractmethod
  def __len__(self) -> int:
    """Number of examples."""

  @abc.abstractmethod
  def get(self, indices: np.ndarray) -> Batch:
    """Returns {'x': float32 [n, *shape], 'label': int32 [n]} for `indices`.

    Images are NHWC in [-1, 1]; vectors are in their natural units. 'label' is
    all zeros when the source has no labels.
    """

  def __repr__(self) -> str:
    return (f'{type(self).__name__}(name={self.name!r}, len={len(self)}, '
            f'shape={self.shape}, num_classes={self.num_classes})')


class ArraySource(DataSource):
  """A source backed by in-memory (or memory-mapped) arrays.

  `x` may be uint8 (converted to [-1, 1] per batch, so large datasets stay
  4x smaller in memory) or float32 (returned as is). If `image_size` is set,
  images are center-cropped and resized per batch.
  """

  def __init__(self, x: np.ndarray, labels: Optional[np.ndarray], *,
               num_classes: int, name: str, image_size: int = 0):
    if len(x) == 0:
      raise DataError(f'Data source {name!r} has no examples.')
    self._x = x
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

  def get(self, indices: np.ndarray) -> Batch:
    indices = np.asarray(indices, np.int64)
    x = self._x[indices]
    x = uint8_to_float(x) if x.dtype == np.uint8 else x.astype(np.float32)
    if x.ndim == 4 and x.shape[1:] != self.shape:
      x = np.stack([resize_image(img, self._image_size) for img in x])
    return {'x': x, 'label': self._labels[indices]}


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


# ----------------------------------------------------------------------------
# Deterministic batch stream.


@functools.lru_cache(maxsize=8)
def _epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  # Cached because consecutive batches nearly always share an epoch; computing
  # a permutation of a large dataset per batch would dominate the loader.
  perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
  perm.setflags(write=False)
  return perm


def _check_stream_args(num_examples: int, global_batch_size: int, seed: int,
                       process_index: int, process_count: int):
  if num_examples <= 0:
    raise DataError('The data source is empty; there is nothing to iterate.')
  if global_batch_size <= 0:
    raise ConfigError(
        f'global batch size must be positive, got {global_batch_size}.')
  if seed < 0:
    raise ConfigError(f'data seed must be non-negative, got {seed}.')
  if process_count <= 0 or not 0 <= process_index < process_count:
    raise ConfigError(f'invalid process_index={process_index} for '
                      f'process_count={process_count}.')
  if global_batch_size % process_count:
    raise ConfigError(
        f'global batch size {global_batch_size} is not divisible by the '
        f'number of processes {process_count}; choose a multiple of it.')


def batch_indices(step: int, num_examples: int, global_batch_size: int,
                  seed: int, process_index: int = 0,
                  process_count: int = 1) -> np.ndarray:
  """Source indices of this process's share of global batch `step`.

  The stream is the infinite concatenation of epoch permutations, epoch `e`
  being `default_rng([seed, e]).permutation(num_examples)`. Global batch `b`
  covers stream positions [b*B, (b+1)*B) (batches cross epoch boundaries, so
  no example is dropped) and process `p` of `P` takes the contiguous slice
  [p*B/P, (p+1)*B/P) of it.

  Returns:
    int64 array of length global_batch_size // process_count.
  """
  _check_stream_args(num_examples, global_batch_size, seed, process_index,
                     process_count)
  per_process = global_batch_size // process_count
  # Python ints: step * B may be large, but never overflows here.
  start = int(step) * global_batch_size + process_index * per_process
  positions = np.arange(start, start + per_process, dtype=np.int64)
  epochs, offsets = np.divmod(positions, num_examples)
  out = np.empty(per_process, np.int64)
  for epoch in np.unique(epochs):
    mask = epochs == epoch
    out[mask] = _epoch_permutation(seed, int(epoch), num_examples)[
        offsets[mask]]
  return out


def _put(q: queue.Queue, item: Any, stop: threading.Event) -> bool:
  """Puts `item` unless `stop` is set first; returns whether it was put."""
  while not stop.is_set():
    try:
      q.put(item, timeout=0.1)
      return True
    except queue.Full:
      continue
  return False


def _load_batch(source: DataSource, global_batch_size: int, seed: int,
                process_index: int, process_count: int, step: int) -> Batch:
  indices = batch_indices(step, len(source), global_batch_size, seed,
                          process_index, process_count)
  return check_batch(source.get(indices), source, len(indices), step)


def check_batch(batch: Batch, source: DataSource, n: int, step: int) -> Batch:
  """DataError unless `batch` is what `source` promises (guards custom sources).

  Values are not scanned here: the built-in sources validate them when loading, and
  a non-finite batch from elsewhere is skipped and counted by the train step.
  """
  x, labels = batch.get('x'), batch.get('label')
  where = f'data source {source.name!r}, batch {step}'
  if not isinstance(x, np.ndarray) or x.shape != (n,) + tuple(source.shape):
    raise DataError(f'{where}: x has shape {getattr(x, "shape", type(x).__name__)}, '
                    f'expected {(n,) + tuple(source.shape)} (source.shape = {source.shape}).')
  if x.dtype != np.float32:
    raise DataError(f'{where}: x has dtype {x.dtype}, expected float32.')
  if (not isinstance(labels, np.ndarray) or labels.shape != (n,)
      or not np.issubdtype(labels.dtype, np.integer)):
    raise DataError(f'{where}: label must be an integer array of shape ({n},), got '
                    f'{getattr(labels, "dtype", type(labels).__name__)} '
                    f'{getattr(labels, "shape", "")}.')
  if source.num_classes and n and (labels.min() < 0 or labels.max() >= source.num_classes):
    raise DataError(f'{where}: labels span [{labels.min()}, {labels.max()}] but the source '
                    f'has {source.num_classes} classes.')
  return batch


def _produce(load, start_step: int, q: queue.Queue, stop: threading.Event):
  """Prefetch thread body: loads batches start_step, start_step+1, ... in order.

  A module-level function (not a method) so that the thread holds no reference
  to the iterator, which can then be garbage-collected and closed.
  """
  step = start_step
  while not stop.is_set():
    try:
      item = (step, load(step), None)
    except Exception as e:  # pylint: disable=broad-except
      _put(q, (step, None, e), stop)  # Re-raised in the consumer thread.
      return
    if not _put(q, item, stop):
      return
    step += 1


class BatchIterator:
  """Deterministic, resumable, multi-host-aware infinite batch iterator.

  Yields host-local batches {'x', 'label'} of size global_batch_size //
  process_count. Batch `b` depends only on (seed, b, process slice), see
  `batch_indices`, so resuming from `state()` is bit-exact. With prefetch > 0 a
  background thread loads up to `prefetch` batches ahead, in order.
  """

  def __init__(self, source: DataSource, global_batch_size: int, seed: int, *,
               process_index: int = 0, process_count: int = 1,
               start_step: int = 0, prefetch: int = 2):
    _check_stream_args(len(source), global_batch_size, seed, process_index,
                       process_count)
    if prefetch < 0:
      raise ConfigError(f'prefetch must be >= 0, got {prefetch}.')
    if start_step < 0:
      raise ConfigError(f'start_step must be >= 0, got {start_step}.')
    self.source = source
    self.global_batch_size = int(global_batch_size)
    self.seed = int(seed)
    self.process_index = int(process_index)
    self.process_count = int(process_count)
    self.prefetch = int(prefetch)
    self._step = int(start_step)  # Step of the next batch handed out.
    self._thread: Optional[threading.Thread] = None
    self._queue: Optional[queue.Queue] = None
    self._stop: Optional[threading.Event] = None

  @property
  def local_batch_size(self) -> int:
    return self.global_batch_size // self.process_count

  def indices(self, step: int) -> np.ndarray:
    """Source indices of this process's part of batch `step`."""
    return batch_indices(step, len(self.source), self.global_batch_size,
                         self.seed, self.process_index, self.process_count)

  def load(self, step: int) -> Batch:
    """Loads this process's part of batch `step` (pure; no iterator state)."""
    return self._loader()(step)

  def _loader(self):
    # A partial over plain values rather than a bound method, so the prefetch
    # thread does not keep the iterator alive (see __del__).
    return functools.partial(_load_batch, self.source, self.global_batch_size,
                             self.seed, self.process_index, self.process_count)

  def __iter__(self) -> Iterator[Batch]:
    return self

  def __next__(self) -> Batch:
    if self.prefetch == 0:
      batch = self.load(self._step)
    else:
      batch = self._next_prefetched()
    self._step += 1
    return batch

  def _next_prefetched(self) -> Batch:
    if self._thread is None:
      self._start_thread()
    step, batch, error = self._queue.get()
    if error is not None:
      self.close()
      raise error
    assert step == self._step, (step, self._step)
    return batch

  def _start_thread(self):
    self._queue = queue.Queue(maxsize=self.prefetch)
    self._stop = threading.Event()
    self._thread = threading.Thread(
        target=_produce,
        args=(self._loader(), self._step, self._queue, self._stop),
        name='BatchIterator-prefetch', daemon=True)
    self._thread.start()

  def state(self) -> Dict[str, int]:
    """JSON-serializable position: the step of the next batch to be returned."""
    return {'step': self._step, 'seed': self.seed,
            'global_batch_size': self.global_batch_size}

  def restore(self, state: Dict[str, int]):
    """Continues from a `state()` dict: the next batch is state['step']."""
    for key in ('seed', 'global_batch_size'):
      if key in state and int(state[key]) != getattr(self, key):
        raise ConfigError(
            f'The saved data iterator state has {key}={state[key]} but the '
            f'config has {getattr(self, key)}; resuming would not reproduce '
            f'the data stream. Use the original value or start a new run.')
    self.close()
    self._step = int(state['step'])

  def close(self):
    """Stops the prefetch thread (if any); the iterator stays usable."""
    if self._thread is not None:
      self._stop.set()
      self._thread.join()
    self._thread = self._queue = self._stop = None

  def __enter__(self) -> 'BatchIterator':
    return self

  def __exit__(self, *exc_info):
    self.close()

  def __del__(self):
    # The producer holds no reference to `self`, so this runs when the iterator
    # is dropped without close(); stop the thread instead of leaking it.
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except
      pass
