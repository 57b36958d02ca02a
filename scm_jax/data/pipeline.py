"""The training batch stream: a grain DataLoader behind one resumable wrapper.

Each process reads only its own shard of the records: grain's IndexSampler
splits the N records into `process_count` contiguous shards (the last
N % process_count records are never read), shuffles each shard with a fresh
permutation every epoch (seeded by `sampler_seed(seed, process_index)`) and
repeats forever. Batches cross epoch boundaries. The global batch is the
concatenation of the processes' batches in process order.

The stream is a pure function of (source, seed, process_count, worker_count):
with `worker_count` W > 0, grain's worker w batches the records w, w + W,
w + 2W, ... of the process's sequence and the batches are interleaved round
robin, so the same seed yields other batches for another W. A saved state
therefore resumes bit-exactly only with the same seed, process count and
worker count; `set_state` refuses anything else with a ConfigError (keep
`data.worker_count` to resume). The global batch size may change on resume:
the stream then continues at the same record with batches of the new size.

Typical use:

  stream = make_stream(source, config.train.batch_size, config.seed,
                       process_index=jax.process_index(),
                       process_count=jax.process_count(),
                       worker_count=config.data.worker_count,
                       prefetch=config.data.prefetch)
  batch = next(stream)          # {'x': [B/P, *shape] f32, 'label': [B/P] i32}
  saved = stream.get_state()    # bytes; also what grain's Orbax handler saves
  stream.set_state(saved)       # the next batch is the one after `saved`
"""


import logging
from typing import Any, Optional

import grain
import numpy as np

from scm_jax.data.base import DataSource, Example
from scm_jax.data.stream import BatchStream, per_process_batch
from scm_jax.errors import ConfigError, DataError


def check_loader_options(prefetch: int, worker_count: int) -> None:
  """ConfigError unless data.prefetch and data.worker_count are valid."""
  if prefetch < 0:
    raise ConfigError(f'data.prefetch must be >= 0 (0 = off), got {prefetch}.')
  if worker_count < 0:
    raise ConfigError(f'data.worker_count must be >= 0 (0 = load in the '
                      f'training process), got {worker_count}.')



def sampler_seed(seed: int, process_index: int) -> int:
  """The 32-bit seed of grain's IndexSampler for a data seed and process.

  grain shuffles epoch e with seed + e, so seeds s and s + 1 would see the
  same permutations one epoch apart, and every process shuffles its shard
  with the same permutation, so that records k and k + N/P would always share
  a global batch. Hashing (seed, process) decorrelates both.
  """
  if seed < 0:
    raise ConfigError(f'data seed must be non-negative, got {seed}.')
  return int(np.random.SeedSequence([seed, process_index]).generate_state(1)[0])


class IndexSampler(grain.samplers.IndexSampler):
  """grain's IndexSampler (same records, same repr) without per-record RNGs.

  grain's version seeds a numpy Generator for every record, for transforms
  that draw randomness; ours draw none, and building it was half of the
  stream's per-record cost (~90 of ~185 us on the toy data, 2 busy cores).
  """

  def __getitem__(self, index: int) -> grain.RecordMetadata:
    if index < 0 or (self._max_index is not None and index >= self._max_index):
      raise IndexError(f'record index {index} is out of range')
    record_key = self._record_keys[index // self._shard_options.shard_count]
    return grain.RecordMetadata(index=index, record_key=record_key)


class DecodeTransform(grain.transforms.Map):
  """grain Map running `source.decode` (in worker processes if any).

  Checks each example's shape and dtype, so that a bad custom source fails
  with its name instead of inside grain's batching.
  """

  def __init__(self, source: DataSource):
    self._source = source
    self._shape = tuple(source.shape)

  def map(self, element: Any) -> Example:
    example = self._source.decode(element)
    x = example['x']
    if (not isinstance(x, np.ndarray) or x.shape != self._shape
        or x.dtype != np.float32):
      raise DataError(
          f'data source {self._source.name!r}: decode() returned x of '
          f'{getattr(x, "dtype", type(x).__name__)} {getattr(x, "shape", "")}, '
          f'expected float32 {self._shape} (source.shape).')
    label = np.asarray(example['label'])
    if label.shape or not np.issubdtype(label.dtype, np.integer):
      raise DataError(
          f'data source {self._source.name!r}: decode() returned a label of '
          f'{label.dtype} {label.shape}, expected an integer scalar.')
    return {'x': x, 'label': np.int32(label)}


def make_stream(source: DataSource, global_batch_size: int, seed: int, *,
                process_index: int = 0, process_count: int = 1,
                worker_count: int = 0, prefetch: int = 2,
                read_options: Optional[grain.ReadOptions] = None,
                state: Optional[bytes] = None) -> BatchStream:
  """The training stream of `source` for this process (module docstring).

  Args:
    source: the training source.
    global_batch_size: batch size summed over processes; a multiple of
      process_count.
    seed: non-negative shuffling seed (see `sampler_seed`).
    process_index: this process (jax.process_index()).
    process_count: number of processes (jax.process_count()).
    worker_count: grain worker processes decoding records (0 = in this
      process). Part of the stream's identity: resume with the same value.
    prefetch: batches a background thread loads ahead (0 = none).
    read_options: grain ReadOptions; default `source.read_options`.
    state: a `get_state()` to continue from.
  """
  local_batch = per_process_batch(global_batch_size, process_count)
  check_loader_options(prefetch, worker_count)
  if not 0 <= process_index < process_count:
    raise ConfigError(f'invalid process_index={process_index} for '
                      f'process_count={process_count}.')
  n = len(source)
  if n // process_count == 0:
    raise DataError(f'data source {source.name!r} has {n} examples, fewer than '
                    f'the {process_count} processes: every process needs at '
                    f'least one; use more data or fewer processes.')
  if n < global_batch_size:
    logging.warning('data source %r has %d examples, fewer than the global '
                    'batch size %d: every batch repeats examples.',
                    source.name, n, global_batch_size)
  shard_options = grain.sharding.ShardOptions(
      shard_index=process_index, shard_count=process_count,
      drop_remainder=True)
  sampler = IndexSampler(
      num_records=n, shard_options=shard_options, shuffle=True,
      num_epochs=None, seed=sampler_seed(seed, process_index))
  loader = grain.DataLoader(
      data_source=source, sampler=sampler,
      operations=[DecodeTransform(source),
                  grain.transforms.Batch(local_batch, drop_remainder=True)],
      worker_count=worker_count, shard_options=shard_options,
      read_options=read_options or source.read_options)
  stream = BatchStream(source, loader, global_batch_size=global_batch_size,
                       seed=seed, process_index=process_index,
                       process_count=process_count, worker_count=worker_count,
                       prefetch=prefetch)
  if state is not None:
    stream.set_state(state)
  return stream
