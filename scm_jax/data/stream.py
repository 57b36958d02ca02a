"""BatchStream: the training batches of one process, resumable from a saved state.

It wraps the grain DataLoader built by `pipeline.make_stream`: a background thread
loads up to `prefetch` batches ahead, every batch is checked against what its source
promises, and `get_state` / `set_state` give the position after the last batch the
consumer took (never a prefetched one). It is the one owner of the data position: the
training loop saves its state as an Orbax item beside the train state.
"""

import json
import logging
import queue
import threading
from typing import Any, Optional, Tuple

from absl import flags
import grain
import numpy as np

from scm_jax.data.base import Batch, DataSource
from scm_jax.errors import ConfigError, DataError

_STATE_FORMAT = 'scm_jax.data.BatchStream/1'


def per_process_batch(global_batch_size: int, process_count: int) -> int:
  """Rows of the global batch each process loads; ConfigError if uneven."""
  if global_batch_size <= 0:
    raise ConfigError(
        f'global batch size must be positive, got {global_batch_size}.')
  if process_count <= 0:
    raise ConfigError(f'process_count must be positive, got {process_count}.')
  if global_batch_size % process_count:
    raise ConfigError(
        f'global batch size {global_batch_size} is not divisible by the '
        f'number of processes {process_count}; choose a multiple of it.')
  return global_batch_size // process_count


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



def _parse_absl_flags():
  # grain reads an absl flag when it starts worker processes and fails in
  # programs that never parse flags (scripts, pytest); defaults are right there
  # (google/grain#1355).
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _close_grain_iterator(it) -> None:
  # DataLoaderIterator has no close(); its dataset iterator stops the worker
  # processes (garbage collection would too, but not promptly).
  inner = getattr(it, '_iterator', None)
  if inner is not None and hasattr(inner, 'close'):
    inner.close()


def _set_grain_state(it, state: bytes) -> None:
  try:
    it.set_state(state)
  except ValueError as e:  # grain's own checks (sampler, source, workers).
    raise ConfigError(f'The saved data stream state does not fit this stream '
                      f'({e}); resume with the original data config.') from e


def _host_batch(batch: Batch, from_workers: bool) -> Batch:
  if from_workers:
    # Worker batches arrive in grain SharedMemoryArrays, unlinked when freed.
    # Copy them out so that batches a consumer keeps hold no shared memory
    # (which /dev/shm bounds, and which leaks if still held at exit).
    return {'x': np.array(batch['x']), 'label': np.array(batch['label'])}
  return batch


def _load(it, source: DataSource, n: int, step: int,
          from_workers: bool) -> Tuple[Batch, bytes]:
  """Next checked batch and grain's iterator state right after it."""
  batch = check_batch(_host_batch(next(it), from_workers), source, n, step)
  return batch, it.get_state()


def _put(q: queue.Queue, item: Any, stop: threading.Event) -> bool:
  """Puts `item` unless `stop` is set first; returns whether it was put."""
  while not stop.is_set():
    try:
      q.put(item, timeout=0.1)
      return True
    except queue.Full:
      continue
  return False


def _produce(it, source: DataSource, n: int, step: int, from_workers: bool,
             q: queue.Queue, stop: threading.Event):
  """Prefetch thread body: loads batches `step`, `step + 1`, ... in order.

  A module-level function (not a method) so that the thread holds no reference
  to the stream, which can then be garbage-collected and closed.
  """
  while not stop.is_set():
    try:
      item = (_load(it, source, n, step, from_workers), None)
    except Exception as e:  # pylint: disable=broad-except
      _put(q, (None, e), stop)  # Re-raised in the consumer thread.
      return
    if not _put(q, item, stop):
      return
    step += 1


class BatchStream:
  """Deterministic, resumable, per-process stream of training batches.

  Yields host-local batches {'x': float32 [B/P, *shape], 'label': int32
  [B/P]} from a grain DataLoader (see the module docstring for the order).
  With prefetch > 0 a background thread loads up to `prefetch` batches ahead;
  `get_state` always describes the position after the last batch returned by
  `next`, never a prefetched one.

  The stream is also an item for grain's Orbax checkpoint handler
  (`grain.checkpoint.CheckpointSave(item=stream)` / `CheckpointRestore`):
  it has `get_state() -> bytes`, `set_state(bytes)` and `start_prefetch()`.
  """

  def __init__(self, source: DataSource, loader: grain.DataLoader, *,
               global_batch_size: int, seed: int, process_index: int,
               process_count: int, worker_count: int, prefetch: int):
    self.source = source
    self.global_batch_size = global_batch_size
    self.local_batch_size = per_process_batch(global_batch_size, process_count)
    self.seed = seed
    self.process_index = process_index
    self.process_count = process_count
    self.worker_count = worker_count
    self.prefetch = prefetch
    self._loader = loader
    self._it = None  # grain iterator; created on first use.
    self._step = 0  # Batches handed out, i.e. the step of the next one.
    self._grain_state: Optional[bytes] = None  # After the last handed-out batch.
    self._thread: Optional[threading.Thread] = None
    self._queue: Optional[queue.Queue] = None
    self._stop: Optional[threading.Event] = None

  @property
  def step(self) -> int:
    """Number of batches handed out (restored by `set_state`)."""
    return self._step

  def __iter__(self) -> 'BatchStream':
    return self

  def __next__(self) -> Batch:
    if self.prefetch == 0:
      try:
        batch, state = _load(self._iterator(), self.source,
                             self.local_batch_size, self._step,
                             self.worker_count > 0)
      except Exception:
        self._drop_iterator()  # A retry restarts after the last good batch.
        raise
    else:
      self.start_prefetch()
      loaded, error = self._queue.get()
      if error is not None:
        self.close()
        raise error
      batch, state = loaded
    self._grain_state = state
    self._step += 1
    return batch

  def _iterator(self):
    if self._it is None:
      if self.worker_count:
        _parse_absl_flags()
      it = iter(self._loader)
      if self._grain_state is None:
        self._grain_state = it.get_state()  # The start of the stream.
      else:
        _set_grain_state(it, self._grain_state)
      self._it = it
    return self._it

  def _drop_iterator(self):
    if self._it is not None:
      _close_grain_iterator(self._it)
      self._it = None

  def start_prefetch(self) -> None:
    """Starts loading ahead (grain workers and, if prefetch > 0, the thread).

    Idempotent; `next` calls it as needed.
    """
    it = self._iterator()
    if self.prefetch == 0 or self._thread is not None:
      if self.worker_count:
        it.start_prefetch()  # Starts grain's worker processes.
      return
    self._queue = queue.Queue(maxsize=self.prefetch)
    self._stop = threading.Event()
    self._thread = threading.Thread(
        target=_produce,
        args=(it, self.source, self.local_batch_size, self._step,
              self.worker_count > 0, self._queue, self._stop),
        name='BatchStream-prefetch', daemon=True)
    self._thread.start()

  def _identity(self) -> dict:
    """What a saved state must share with this stream to resume it."""
    return {'seed': self.seed, 'process_index': self.process_index,
            'process_count': self.process_count,
            'worker_count': self.worker_count, 'source': repr(self.source)}

  def get_state(self) -> bytes:
    """JSON bytes: the position after the last batch `next` returned.

    Holds grain's DataLoader state (per-worker record positions, sampler and
    source repr) under 'grain', 'step' (batches handed out), the global batch
    size and the values a resumed stream must share (`_identity`).
    """
    if self._grain_state is None:
      self._iterator()
    return json.dumps({
        'format': _STATE_FORMAT, 'step': self._step,
        'global_batch_size': self.global_batch_size, **self._identity(),
        'grain': json.loads(self._grain_state),
    }, indent=1).encode()

  def state_at(self, step: int) -> bytes:
    """A `get_state()` of this stream after its first `step` batches, computed without
    reading them (for positions saved as a batch count, e.g. by older checkpoints).

    grain's DataLoader state is one record position per worker: worker w of W reads the
    records w, w + W, ... of this process's shard and yields whole batches of them, and
    the workers' batches are taken round robin from worker 0 (one "worker" if W = 0).
    """
    if step < 0:
      raise ConfigError(f'a stream position must be >= 0 batches, got {step}.')
    saved = json.loads(self.get_state())
    workers = max(self.worker_count, 1)
    total = workers * self.process_count
    offset = self.process_index - total  # grain's "last seen" index before any record
    batches = [step // workers + (w < step % workers) for w in range(workers)]
    saved['grain'].update(
        last_seen_indices={str(w): offset + w * self.process_count
                           + b * self.local_batch_size * total
                           for w, b in enumerate(batches)},
        last_worker_index=step % workers - 1 if self.worker_count else -1)
    saved['step'] = int(step)
    return json.dumps(saved, indent=1).encode()

  def set_state(self, state: bytes) -> None:
    """Continues after the batch at which `state` (from get_state) was taken.

    Drops prefetched batches; grain's workers keep running. ConfigError if
    the state belongs to another stream (seed, process layout, worker count or
    data source).
    """
    saved = self._check_state(state)
    self._stop_thread()
    grain_state = json.dumps(saved['grain']).encode()
    if self._it is not None:
      _set_grain_state(self._it, grain_state)
    self._grain_state = grain_state
    self._step = int(saved['step'])

  def _check_state(self, state: bytes) -> dict:
    # A damaged state is a DataError; a state of another stream is a ConfigError.
    try:
      saved = json.loads(state)
    except (TypeError, ValueError) as e:
      raise DataError(f'The saved data stream state is not JSON ({e}); '
                      f'restore bytes from BatchStream.get_state.') from e
    if not isinstance(saved, dict) or saved.get('format') != _STATE_FORMAT:
      raise DataError(f'The saved data stream state is not a {_STATE_FORMAT} '
                      f'state; restore bytes from BatchStream.get_state.')
    ours = self._identity()
    if saved.get('worker_count') != ours['worker_count']:
      raise ConfigError(
          f'The saved data stream was read with data.worker_count='
          f'{saved.get("worker_count")} but this run has {self.worker_count}; '
          f'the number of workers decides the batch order, so keep '
          f'data.worker_count={saved.get("worker_count")} to resume.')
    for key, value in ours.items():
      if saved.get(key) != value:
        raise ConfigError(
            f'The saved data stream state has {key}={saved.get(key)!r} but '
            f'this stream has {value!r}; resuming would not reproduce the '
            f'data stream. Use the original value or start a new run.')
    if saved.get('global_batch_size', self.global_batch_size) != self.global_batch_size:
      logging.warning('data stream resumed with global batch size %d (saved '
                      'with %d): it continues at the same record with batches '
                      'of the new size.', self.global_batch_size,
                      saved['global_batch_size'])
    return saved

  def _stop_thread(self):
    # The grain iterator ran ahead of the consumer: callers reposition or
    # drop it.
    if self._thread is not None:
      self._stop.set()
      self._thread.join()
    self._thread = self._queue = self._stop = None

  def close(self) -> None:
    """Stops the thread and grain's workers; `next` would restart them."""
    self._stop_thread()
    self._drop_iterator()

  def __enter__(self) -> 'BatchStream':
    return self

  def __exit__(self, *exc_info):
    self.close()

  def __del__(self):
    # The producer holds no reference to `self`, so this runs when the stream
    # is dropped without close(); stop the thread and workers, not leak them.
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except
      pass
