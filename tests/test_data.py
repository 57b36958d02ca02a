"""Tests for scm_jax.data: sources, config building and the batch stream."""

import gc
import json
import logging
import mmap
import os
import pickle
import time

import grain
import numpy as np
from PIL import Image
import pytest
from sklearn import datasets as sk_datasets

from scm_jax import data
from scm_jax.data import pipeline, toy2d
from scm_jax.data.base import ArraySource
from scm_jax.errors import ConfigError, DataError


def _config(**overrides):
  config = data.default_data_config()
  config.update(overrides)
  return config


def _range_source(n, labels=None, num_classes=0):
  """Source whose example i is the vector [i]: batches reveal their indices."""
  return ArraySource(np.arange(n, dtype=np.float32)[:, None], labels,
                     num_classes=num_classes, name='range')


def _take(stream, k):
  return [next(stream)['x'][:, 0].astype(int) for _ in range(k)]


def _wait_until_full(stream, timeout=30.0):
  """Waits until the prefetch thread has filled its queue."""
  deadline = time.monotonic() + timeout
  while not stream._queue.full():  # pylint: disable=protected-access
    assert time.monotonic() < deadline, 'prefetch queue never filled'
    time.sleep(0.01)


# ----------------------------------------------------------------------------
# Batch stream.


def test_default_config_has_every_key():
  config = data.default_data_config()
  expected = {
      'name': 'digits', 'split': 'train', 'eval_split': 'test', 'toy': 'ring8',
      'num_train': 50000, 'num_test': 5000, 'mean': 0.0, 'std': 0.5, 'dim': 2,
      'seed': 0, 'image_size': 0, 'path': '', 'expected_shape': (),
      'labels_from_subdirs': False, 'channels': 3, 'tfds_name': 'cifar10',
      'data_dir': '', 'download': False, 'image_key': 'image',
      'label_key': 'label', 'use_labels': False, 'prefetch': 2,
      'worker_count': 0, 'latents': False,
  }
  assert config.to_dict() == expected


@pytest.mark.parametrize('n,batch', [(10, 4), (12, 4), (5, 8)])
def test_every_epoch_covers_each_index_once(n, batch):
  with data.make_stream(_range_source(n), batch, 0, prefetch=0) as stream:
    flat = np.concatenate(_take(stream, 4 * n // batch + 2))
  for epoch in range(len(flat) // n):
    assert sorted(flat[epoch * n:(epoch + 1) * n]) == list(range(n))


def test_epochs_are_reshuffled():
  with data.make_stream(_range_source(100), 100, 0, prefetch=0) as stream:
    epochs = _take(stream, 3)
  assert not np.array_equal(epochs[0], epochs[1])
  assert not np.array_equal(epochs[1], epochs[2])


def test_neighbouring_seeds_share_no_epoch():
  # grain shuffles epoch e with seed + e; sampler_seed hashes the seed so that
  # seed 1 is not seed 0 shifted by one epoch.
  streams = [data.make_stream(_range_source(50), 50, seed, prefetch=0)
             for seed in (0, 1)]
  first, second = [_take(s, 3) for s in streams]
  for a in first:
    for b in second:
      assert not np.array_equal(a, b)


def test_processes_read_disjoint_shards_that_cover_the_records():
  n = 21  # Odd: the last record is dropped so that the shards are equal.
  epochs = []
  for p in range(2):
    with data.make_stream(_range_source(n), 20, 3, process_index=p,
                          process_count=2, prefetch=0) as stream:
      flat = np.concatenate(_take(stream, 4))  # 4 epochs of the 10-record shard.
    shard = sorted(flat[:10])
    for epoch in range(4):
      assert sorted(flat[epoch * 10:(epoch + 1) * 10]) == shard
    epochs.append(flat[:10])
  assert sorted(np.concatenate(epochs)) == list(range(n - 1))
  # Each process shuffles with its own permutation (sampler_seed).
  assert not np.array_equal(epochs[0], epochs[1] - 10)


def test_sampler_reads_what_grains_index_sampler_reads():
  for process in range(3):
    kwargs = dict(num_records=20, shuffle=True, num_epochs=None, seed=5,
                  shard_options=grain.sharding.ShardOptions(process, 3, True))
    ours = pipeline.IndexSampler(**kwargs)
    grains = grain.samplers.IndexSampler(**kwargs)
    assert repr(ours) == repr(grains)  # What grain checks on restore.
    for i in range(process, 200, 3):
      assert ours[i].record_key == grains[i].record_key and ours[i].rng is None


def test_global_batch_is_the_processes_batches_in_order():
  batches = []
  for p in range(2):
    with data.make_stream(_range_source(32), 8, 1, process_index=p,
                          process_count=2, prefetch=0) as stream:
      batch = next(stream)
      assert batch['x'].shape == (4, 1) and stream.local_batch_size == 4
      batches.append(batch['x'][:, 0])
  global_batch = np.concatenate(batches)
  assert (global_batch[:4] < 16).all() and (global_batch[4:] >= 16).all()


def test_indivisible_batch_and_bad_arguments_are_config_errors():
  assert data.per_process_batch(12, 4) == 3
  with pytest.raises(ConfigError, match='divisible'):
    data.per_process_batch(7, 2)
  with pytest.raises(ConfigError, match='divisible'):
    data.make_stream(_range_source(10), 7, 0, process_count=2)
  with pytest.raises(ConfigError, match='positive'):
    data.make_stream(_range_source(10), 0, 0)
  with pytest.raises(ConfigError, match='process_index'):
    data.make_stream(_range_source(10), 4, 0, process_index=2, process_count=2)
  with pytest.raises(ConfigError, match='seed'):
    data.make_stream(_range_source(10), 4, -1)
  with pytest.raises(ConfigError, match='data.prefetch'):
    data.make_stream(_range_source(10), 4, 0, prefetch=-1)
  with pytest.raises(ConfigError, match='data.worker_count'):
    data.make_stream(_range_source(10), 4, 0, worker_count=-1)


def test_config_validates_prefetch_and_worker_count():
  with pytest.raises(ConfigError, match='data.worker_count'):
    data.build_source(_config(worker_count=-2), 'train')
  with pytest.raises(ConfigError, match='data.prefetch'):
    data.build_source(_config(prefetch=-1), 'train')


def test_tiny_dataset_warns_and_empty_shard_is_data_error(caplog):
  with caplog.at_level(logging.WARNING):
    with data.make_stream(_range_source(3), 8, 0, prefetch=0) as stream:
      flat = np.concatenate(_take(stream, 3))
  assert 'fewer than the global batch size 8' in caplog.text
  assert sorted(flat[:3]) == [0, 1, 2]  # Tiny datasets repeat.
  with pytest.raises(DataError, match='1 examples, fewer than the 2 processes'):
    data.make_stream(_range_source(1), 2, 0, process_count=2)


@pytest.mark.parametrize('prefetch', [0, 2])
def test_same_seed_same_batches_different_seed_different(prefetch):
  source = _range_source(40)
  with data.make_stream(source, 16, 0, prefetch=prefetch) as a, \
       data.make_stream(source, 16, 0, prefetch=prefetch) as b, \
       data.make_stream(source, 16, 1, prefetch=prefetch) as c:
    first, second, other = _take(a, 6), _take(b, 6), _take(c, 6)
  np.testing.assert_array_equal(first, second)
  assert not np.array_equal(first, other)


@pytest.mark.parametrize('prefetch', [0, 2])
def test_resume_from_state_is_bit_identical(prefetch):
  source = _range_source(23)
  with data.make_stream(source, 5, 7, prefetch=0) as stream:
    reference = _take(stream, 12)
  with data.make_stream(source, 5, 7, prefetch=prefetch) as stream:
    _take(stream, 4)
    state = stream.get_state()
  assert isinstance(state, bytes) and json.loads(state)['step'] == 4
  with data.make_stream(source, 5, 7, prefetch=prefetch, state=state) as it:
    assert it.step == 4
    np.testing.assert_array_equal(_take(it, 8), reference[4:])
    assert json.loads(it.get_state())['step'] == 12


@pytest.mark.parametrize('prefetch', [0, 2])
def test_set_state_moves_a_running_stream(prefetch):
  source = _range_source(23)
  with data.make_stream(source, 5, 7, prefetch=prefetch) as stream:
    _take(stream, 3)
    state = stream.get_state()
    after = _take(stream, 4)
    _take(stream, 5)  # Move elsewhere (and fill the prefetch queue) first.
    stream.set_state(state)
    np.testing.assert_array_equal(_take(stream, 4), after)


def test_consumer_state_never_counts_prefetched_batches():
  source = _range_source(50)
  with data.make_stream(source, 4, 0, prefetch=0) as stream:
    reference = _take(stream, 6)
  with data.make_stream(source, 4, 0, prefetch=3) as stream:
    _take(stream, 2)
    _wait_until_full(stream)  # The thread is 3 batches ahead.
    state = stream.get_state()
    assert stream.step == 2 and json.loads(state)['step'] == 2
  with data.make_stream(source, 4, 0, prefetch=3, state=state) as stream:
    np.testing.assert_array_equal(_take(stream, 4), reference[2:])


def test_close_keeps_the_position():
  source = _range_source(30)
  with data.make_stream(source, 4, 2, prefetch=0) as stream:
    reference = _take(stream, 5)
  stream = data.make_stream(source, 4, 2, prefetch=2)
  _take(stream, 2)
  _wait_until_full(stream)
  stream.close()
  np.testing.assert_array_equal(_take(stream, 3), reference[2:])
  stream.close()


def test_batch_size_may_change_on_resume(caplog):
  source = _range_source(40)
  with data.make_stream(source, 8, 0, prefetch=0) as stream:
    flat = np.concatenate(_take(stream, 4))
  with data.make_stream(source, 8, 0, prefetch=0) as stream:
    _take(stream, 1)
    state = stream.get_state()
  with caplog.at_level(logging.WARNING):
    with data.make_stream(source, 4, 0, prefetch=0, state=state) as stream:
      resumed = np.concatenate(_take(stream, 6))
  assert 'global batch size 4 (saved with 8)' in caplog.text
  np.testing.assert_array_equal(resumed, flat[8:32])


def test_restore_into_another_stream_is_config_error():
  source = _range_source(10)
  with data.make_stream(source, 2, 0, prefetch=0) as stream:
    next(stream)
    state = stream.get_state()
  others = {
      'seed': dict(source=source, seed=1),
      'process_count': dict(source=source, process_count=2),
      'source': dict(source=_range_source(11)),
  }
  for key, kwargs in others.items():
    kwargs = {'source': source, 'seed': 0, **kwargs}
    stream = data.make_stream(kwargs.pop('source'), 2, kwargs.pop('seed'),
                              prefetch=0, **kwargs)
    with pytest.raises(ConfigError, match=f'has {key}=.*original value'):
      stream.set_state(state)
  # Damaged bytes are a DataError (a checkpoint treats them as corruption).
  with pytest.raises(DataError, match='get_state'):
    data.make_stream(source, 2, 0, state=b'{"step": 3}')
  with pytest.raises(DataError, match='not JSON'):
    data.make_stream(source, 2, 0, state=b'{"step": 3')


def test_restore_with_other_worker_count_is_config_error():
  with data.make_stream(_range_source(10), 2, 0, prefetch=0) as stream:
    state = stream.get_state()
  stream = data.make_stream(_range_source(10), 2, 0, worker_count=2)
  with pytest.raises(ConfigError, match='keep data.worker_count=0'):
    stream.set_state(state)
  stream.close()


class _Broken(ArraySource):

  def decode(self, record):
    raise DataError('broken.png is corrupt')


@pytest.mark.parametrize('prefetch', [0, 2])
def test_source_errors_propagate_and_stop_the_thread(prefetch):
  stream = data.make_stream(
      _Broken(np.zeros((4, 1), np.float32), None, num_classes=0, name='b'),
      2, 0, prefetch=prefetch)
  with pytest.raises(DataError, match='broken.png is corrupt'):
    next(stream)
  assert stream._thread is None and stream._it is None  # pylint: disable=protected-access
  with pytest.raises(DataError, match='broken.png'):  # A retry fails alike.
    next(stream)
  assert stream.step == 0


def test_dropping_a_stream_stops_its_thread():
  stream = data.make_stream(_range_source(20), 4, 0, prefetch=2)
  next(stream)
  thread = stream._thread  # pylint: disable=protected-access
  assert thread.is_alive()
  del stream
  gc.collect()
  thread.join(timeout=10)
  assert not thread.is_alive()


class _BadDecode(ArraySource):
  """Decodes to whatever the test asks for."""

  def __init__(self, x, labels, num_classes, bad):
    super().__init__(x, labels, num_classes=num_classes, name='custom')
    self.bad = bad

  def decode(self, record):
    return dict(super().decode(record), **self.bad)


@pytest.mark.parametrize('bad,classes,match', [
    ({'x': np.zeros(3, np.float32)}, 0, r'float32 \(3,\), expected float32 \(2,\)'),
    ({'x': np.zeros(2, np.float64)}, 0, 'float64'),
    ({'label': np.int32(5)}, 3, r'labels span \[5, 5\] but the source has 3'),
])
def test_custom_source_examples_and_batches_are_checked(bad, classes, match):
  source = _BadDecode(np.zeros((8, 2), np.float32), np.zeros(8, np.int32),
                      classes, bad)
  with data.make_stream(source, 4, 0, prefetch=1) as stream:
    with pytest.raises(DataError, match=f"'custom'.*{match}"):
      next(stream)


def test_batch_contents_and_dtypes():
  source = data.build_source(_config(name='toy2d', toy='ring8',
                                     num_train=100), 'train')
  with data.make_stream(source, 32, 0, process_index=1, process_count=2) as it:
    batch = next(it)
  assert batch['x'].shape == (16, 2) and batch['x'].dtype == np.float32
  assert batch['label'].shape == (16,) and batch['label'].dtype == np.int32
  full = source.get(np.arange(len(source)))
  rows = [np.flatnonzero((full['x'] == row).all(1))[0] for row in batch['x']]
  assert min(rows) >= 50  # Process 1 reads the second half.
  np.testing.assert_array_equal(full['label'][rows], batch['label'])


def test_orbax_checkpoint_round_trip(tmp_path):
  ocp = pytest.importorskip('orbax.checkpoint')
  source = _range_source(37)
  with data.make_stream(source, 6, 4, prefetch=0) as stream:
    reference = _take(stream, 10)
  checkpointer = ocp.Checkpointer(grain.checkpoint.CheckpointHandler())
  with data.make_stream(source, 6, 4, prefetch=2) as stream:
    _take(stream, 3)
    _wait_until_full(stream)
    checkpointer.save(tmp_path / 'data',
                      args=grain.checkpoint.CheckpointSave(item=stream))
  saved = json.loads((tmp_path / 'data' / 'process_0-of-1.json').read_text())
  assert saved['step'] == 3
  with data.make_stream(source, 6, 4, prefetch=2) as fresh:
    _take(fresh, 5)
    restored = checkpointer.restore(
        tmp_path / 'data', args=grain.checkpoint.CheckpointRestore(item=fresh))
    assert restored is fresh and fresh.step == 3
    np.testing.assert_array_equal(_take(fresh, 7), reference[3:])


# ----------------------------------------------------------------------------
# grain worker processes (each stream starts processes: seconds apiece).


@pytest.mark.parametrize('prefetch', [0, 2])
def test_worker_stream_resumes_bit_identically(prefetch):
  source = _range_source(23, labels=np.arange(23) % 5, num_classes=5)
  with data.make_stream(source, 4, 7, worker_count=2,
                        prefetch=prefetch) as stream:
    first = _take(stream, 3)
    state = stream.get_state()
    after = _take(stream, 4)
    stream.set_state(state)
    assert stream.step == 3
    np.testing.assert_array_equal(_take(stream, 4), after)
  flat = np.concatenate(first + after)
  assert sorted(flat[:23]) == list(range(23))  # Still one pass per epoch.
  with data.make_stream(source, 4, 7, prefetch=0) as single:
    # Worker w batches records w, w + 2, ...: other batches than W = 0.
    assert not np.array_equal(_take(single, 3), first)


def test_worker_errors_propagate_with_the_source_message():
  stream = data.make_stream(
      _Broken(np.zeros((4, 1), np.float32), None, num_classes=0, name='b'),
      2, 0, worker_count=2, prefetch=2)
  with pytest.raises(DataError, match='broken.png is corrupt'):
    next(stream)
  assert stream._thread is None and stream._it is None  # pylint: disable=protected-access


def _is_memory_mapped(array):
  while array is not None and not isinstance(array, mmap.mmap):
    array = getattr(array, 'base', None)
  return array is not None


def test_memmapped_npy_pickles_by_path_and_feeds_workers(tmp_path):
  x = np.arange(4096 * 64, dtype=np.float32).reshape(4096, 64)  # 1 MiB.
  np.save(tmp_path / 'big.npy', x)
  np.save(tmp_path / 'big.labels.npy', np.arange(4096) % 3)
  source = _array_source(tmp_path / 'big.npy')
  pickled = pickle.dumps(source)
  assert len(pickled) < 64 * 1024  # The labels, not the data.
  copy = pickle.loads(pickled)
  assert _is_memory_mapped(copy._x)  # pylint: disable=protected-access
  assert repr(copy) == repr(source)
  np.testing.assert_array_equal(copy.get(np.arange(5))['x'], x[:5])
  with data.make_stream(source, 32, 0, worker_count=2, prefetch=1) as stream:
    for _ in range(3):
      batch = next(stream)
      rows = batch['x'][:, 0].astype(int) // 64
      np.testing.assert_array_equal(batch['x'], x[rows])
      np.testing.assert_array_equal(batch['label'], rows % 3)


# ----------------------------------------------------------------------------
# digits.


def test_digits_split_shapes_and_range():
  train = data.build_source(_config(name='digits'), 'train')
  test = data.build_source(_config(name='digits'), 'test')
  assert (len(train), len(test)) == (1497, 300)
  assert train.shape == (8, 8, 1) and train.num_classes == 10
  x_train = train.get(np.arange(len(train)))
  x_test = test.get(np.arange(len(test)))
  for batch in (x_train, x_test):
    assert batch['x'].dtype == np.float32
    assert batch['x'].min() == -1.0 and batch['x'].max() == 1.0
  assert set(np.unique(x_train['label'])) == set(range(10))
  # Train + test is exactly the original dataset (as a multiset of images).
  original = sk_datasets.load_digits().images.reshape(1797, -1) / 8.0 - 1.0
  split = np.concatenate([x_train['x'], x_test['x']]).reshape(1797, -1)
  for a, b in zip(np.unique(original, axis=0, return_counts=True),
                  np.unique(split, axis=0, return_counts=True)):
    np.testing.assert_array_equal(a, b)


def test_digits_split_is_deterministic():
  a = data.build_source(_config(name='digits'), 'test').get(np.arange(300))
  b = data.build_source(_config(name='digits'), 'test').get(np.arange(300))
  np.testing.assert_array_equal(a['x'], b['x'])
  np.testing.assert_array_equal(a['label'], b['label'])


def test_digits_resize_to_16():
  source = data.build_source(_config(name='digits', image_size=16), 'test')
  x = source.get(np.arange(10))['x']
  assert source.shape == (16, 16, 1) and x.shape == (10, 16, 16, 1)
  assert x.min() >= -1.0 and x.max() <= 1.0 and x.std() > 0.3


def test_bad_split_is_config_error():
  with pytest.raises(ConfigError, match='validation'):
    data.build_source(_config(name='digits'), 'validation')


# ----------------------------------------------------------------------------
# toy2d.


def test_ring8_shape_std_and_mode_labels():
  source = data.build_source(_config(name='toy2d', toy='ring8'), 'train')
  batch = source.get(np.arange(len(source)))
  assert source.shape == (2,) and source.num_classes == 8
  assert batch['x'].shape == (50000, 2)
  np.testing.assert_allclose(batch['x'].std(0), 0.5, atol=0.01)
  np.testing.assert_allclose(batch['x'].mean(0), 0.0, atol=0.01)
  distances = np.linalg.norm(
      batch['x'][:, None] - toy2d.ring8_centers()[None], axis=-1)
  np.testing.assert_array_equal(distances.argmin(1), batch['label'])
  assert np.bincount(batch['label']).min() > 5500  # All modes populated.


@pytest.mark.parametrize('toy', ['moons', 'checkerboard', 'swissroll'])
def test_other_toys_are_normalized_and_unlabeled(toy):
  source = data.build_source(_config(name='toy2d', toy=toy,
                                     num_train=20000), 'train')
  batch = source.get(np.arange(len(source)))
  np.testing.assert_allclose(batch['x'].std(0), 0.5, atol=0.02)
  np.testing.assert_allclose(batch['x'].mean(0), 0.0, atol=0.02)
  assert source.num_classes == 0 and not batch['label'].any()


def test_toy_train_test_differ_and_seed_matters():
  config = _config(name='toy2d', num_train=1000, num_test=1000)
  train = data.build_source(config, 'train').get(np.arange(1000))['x']
  test = data.build_source(config, 'test').get(np.arange(1000))['x']
  assert len(data.build_source(config, 'test')) == 1000
  assert not np.allclose(train, test)
  again = data.build_source(config, 'train').get(np.arange(1000))['x']
  np.testing.assert_array_equal(train, again)
  config.seed = 1
  other = data.build_source(config, 'train').get(np.arange(1000))['x']
  assert not np.allclose(train, other)


def test_gaussian_matches_config():
  source = data.build_source(
      _config(name='toy2d', toy='gaussian', mean=1.5, std=0.3, dim=3),
      'train')
  x = source.get(np.arange(len(source)))['x']
  assert source.shape == (3,) and x.shape == (50000, 3)
  np.testing.assert_allclose(x.mean(0), 1.5, atol=0.01)
  np.testing.assert_allclose(x.std(0), 0.3, atol=0.01)


def test_unknown_toy_is_config_error():
  with pytest.raises(ConfigError, match='ring8'):
    data.build_source(_config(name='toy2d', toy='spiral'), 'train')


# ----------------------------------------------------------------------------
# array.


def _array_source(path, **overrides):
  return data.build_source(_config(name='array', path=str(path), **overrides),
                           'train')


def test_npz_uint8_with_labels_round_trip(tmp_path):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (6, 4, 4, 3), dtype=np.uint8)
  labels = np.array([0, 1, 2, 3, 4, 4])
  np.savez(tmp_path / 'd.npz', images=images, labels=labels)
  source = _array_source(tmp_path / 'd.npz')
  assert len(source) == 6 and source.shape == (4, 4, 3)
  assert source.num_classes == 5
  batch = source.get(np.array([5, 0]))
  np.testing.assert_array_equal(
      batch['x'], images[[5, 0]].astype(np.float32) / 127.5 - 1)
  np.testing.assert_array_equal(batch['label'], [4, 0])
  assert batch['label'].dtype == np.int32


def test_npz_float_and_npy_round_trip(tmp_path):
  x = np.linspace(-1, 1, 5 * 8 * 8).reshape(5, 8, 8).astype(np.float32)
  np.savez(tmp_path / 'f.npz', x=x, label=np.arange(5))
  source = _array_source(tmp_path / 'f.npz', expected_shape=(8, 8, 1))
  np.testing.assert_array_equal(source.get(np.arange(5))['x'], x[..., None])
  np.save(tmp_path / 'v.npy', x.reshape(5, 64) * 3)  # Vectors: any range.
  vectors = _array_source(tmp_path / 'v.npy')
  assert vectors.shape == (64,) and vectors.num_classes == 0
  np.testing.assert_allclose(vectors.get(np.arange(5))['x'],
                             x.reshape(5, 64) * 3)
  assert not vectors.get(np.arange(5))['label'].any()


def test_array_resize(tmp_path):
  np.save(tmp_path / 'big.npy', np.zeros((3, 12, 10, 3), np.uint8))
  source = _array_source(tmp_path / 'big.npy', image_size=4)
  assert source.get(np.arange(3))['x'].shape == (3, 4, 4, 3)


def test_split_placeholder_in_path(tmp_path):
  np.save(tmp_path / 'train.npy', np.zeros((3, 2), np.float32))
  np.save(tmp_path / 'test.npy', np.zeros((5, 2), np.float32))
  config = _config(name='array', path=str(tmp_path / '{split}.npy'))
  assert len(data.build_source(config, 'train')) == 3
  assert len(data.build_source(config, 'test')) == 5


def _save_bad(path, **arrays_):
  if str(path).endswith('.npy'):
    np.save(path, arrays_['x'], allow_pickle=True)
  else:
    np.savez(path, **arrays_)
  return path


@pytest.mark.parametrize('filename,arrays_,match', [
    ('nan.npy', {'x': np.full((2, 4, 4, 1), np.nan, np.float32)}, 'NaN'),
    ('rank1.npy', {'x': np.zeros(5, np.float32)}, 'shape'),
    ('rank5.npy', {'x': np.zeros((2, 2, 2, 2, 2), np.float32)}, 'shape'),
    ('obj.npz', {'x': np.array([{'a': 1}, None], dtype=object)}, 'pickle'),
    ('obj.npy', {'x': np.array([{'a': 1}, None], dtype=object)}, 'pickle'),
    ('str.npz', {'x': np.array([['a', 'b']])}, 'dtype'),
    ('count.npz', {'x': np.zeros((4, 3), np.float32),
                   'labels': np.arange(3)}, 'labels'),
    ('range.npz', {'images': np.full((2, 4, 4, 3), 2.0, np.float32)},
     r'\[-1, 1\]'),
    ('int.npz', {'x': np.full((2, 4, 4, 3), 300, np.int32)}, '255'),
    ('nchw.npz', {'x': np.zeros((2, 3, 16, 16), np.uint8)}, 'transpose'),
    ('nokey.npz', {'pixels': np.zeros((2, 3), np.float32)}, 'keys'),
])
def test_bad_array_files_raise_data_error(tmp_path, filename, arrays_, match):
  path = _save_bad(tmp_path / filename, **arrays_)
  with pytest.raises(DataError, match=match) as info:
    _array_source(path)
  assert filename in str(info.value)


def test_missing_corrupt_and_mismatched_array_files(tmp_path):
  with pytest.raises(DataError, match='missing.npz'):
    _array_source(tmp_path / 'missing.npz')
  (tmp_path / 'junk.npy').write_bytes(b'not numpy at all')
  with pytest.raises(DataError, match='junk.npy'):
    _array_source(tmp_path / 'junk.npy')
  np.save(tmp_path / 'ok.npy', np.zeros((2, 8, 8, 3), np.uint8))
  with pytest.raises(DataError, match='ok.npy.*expects'):
    _array_source(tmp_path / 'ok.npy', expected_shape=(32, 32, 3))
  with pytest.raises(DataError, match='data.path'):
    data.build_source(_config(name='array'), 'train')


# ----------------------------------------------------------------------------
# folder.


def _write_image(path, color, size=(6, 4), fmt=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.new('RGB', size, color).save(path, format=fmt)


def _make_tree(root):
  _write_image(root / 'cat' / 'a.png', (255, 0, 0))
  _write_image(root / 'cat' / 'b.png', (0, 255, 0))
  _write_image(root / 'dog' / 'deep' / 'c.PNG', (0, 0, 255), fmt='PNG')
  _write_image(root / 'dog' / 'd.bmp', (255, 255, 255))
  (root / 'dog' / 'notes.txt').write_text('ignored')


def test_folder_with_subdirectory_classes(tmp_path):
  _make_tree(tmp_path)
  source = data.build_source(
      _config(name='folder', path=str(tmp_path), labels_from_subdirs=True),
      'train')
  assert len(source) == 4 and source.num_classes == 2
  assert source.shape == (4, 6, 3)
  batch = source.get(np.arange(4))
  np.testing.assert_array_equal(batch['label'], [0, 0, 1, 1])
  # Sorted paths: cat/a, cat/b, dog/d.bmp, dog/deep/c.PNG.
  np.testing.assert_array_equal(batch['x'][0, 0, 0], [1, -1, -1])
  np.testing.assert_array_equal(batch['x'][2, 0, 0], [1, 1, 1])
  np.testing.assert_array_equal(batch['x'][3, 0, 0], [-1, -1, 1])
  assert batch['x'].dtype == np.float32


def test_folder_grayscale_resize_and_unlabeled(tmp_path):
  _make_tree(tmp_path)
  source = data.build_source(
      _config(name='folder', path=str(tmp_path), channels=1, image_size=3),
      'train')
  batch = source.get(np.arange(4))
  assert source.shape == (3, 3, 1) and batch['x'].shape == (4, 3, 3, 1)
  assert source.num_classes == 0 and not batch['label'].any()
  np.testing.assert_allclose(batch['x'][2], 1.0, atol=1e-6)  # White stays 1.
  assert batch['x'].min() >= -1 and batch['x'].max() <= 1


def test_folder_corrupt_empty_and_mixed_sizes(tmp_path):
  _make_tree(tmp_path / 'good')
  (tmp_path / 'good' / 'cat' / 'zz_bad.png').write_bytes(b'\x89PNG garbage')
  source = data.build_source(
      _config(name='folder', path=str(tmp_path / 'good')), 'train')
  with pytest.raises(DataError, match='zz_bad.png'):
    source.get(np.arange(len(source)))
  os.makedirs(tmp_path / 'empty' / 'sub')
  with pytest.raises(DataError, match='no images'):
    data.build_source(_config(name='folder', path=str(tmp_path / 'empty')),
                      'train')
  with pytest.raises(DataError, match='does not exist'):
    data.build_source(_config(name='folder', path=str(tmp_path / 'nope')),
                      'train')
  _write_image(tmp_path / 'mixed' / 'a.png', (0, 0, 0), size=(4, 4))
  _write_image(tmp_path / 'mixed' / 'b.png', (0, 0, 0), size=(5, 4))
  mixed = data.build_source(
      _config(name='folder', path=str(tmp_path / 'mixed')), 'train')
  with pytest.raises(DataError, match='b.png.*image_size'):
    mixed.get(np.arange(2))


# ----------------------------------------------------------------------------
# tfds.


def test_tfds_mock_cifar10():
  tfds = pytest.importorskip('tensorflow_datasets')
  with tfds.testing.mock_data(num_examples=12):
    source = data.build_source(_config(name='tfds'), 'train')
    assert len(source) == 12 and source.shape == (32, 32, 3)
    assert source.num_classes == 10
    with data.make_stream(source, 4, 0, prefetch=1) as it:
      batch = next(it)
    small = data.build_source(_config(name='tfds', image_size=16), 'test')
    small_batch = small.get(np.arange(3))
  assert batch['x'].shape == (4, 32, 32, 3) and batch['x'].dtype == np.float32
  assert batch['x'].min() >= -1 and batch['x'].max() <= 1
  assert batch['x'].std() > 0.1  # Real pixel values, not a constant.
  assert batch['label'].dtype == np.int32
  assert ((batch['label'] >= 0) & (batch['label'] < 10)).all()
  assert small.shape == (16, 16, 3) and small_batch['x'].shape == (3, 16, 16, 3)
  assert small_batch['x'].min() >= -1 and small_batch['x'].max() <= 1


def test_tfds_unprepared_dataset_gives_prepare_hint(tmp_path):
  pytest.importorskip('tensorflow_datasets')
  config = _config(name='tfds', data_dir=str(tmp_path), download=False)
  with pytest.raises(DataError) as info:
    data.build_source(config, 'train')
  message = str(info.value)
  assert 'tfds build cifar10 --file_format=array_record' in message
  assert 'data_dir' in message and str(tmp_path) in message
  with pytest.raises(DataError, match='no dataset named'):
    data.build_source(_config(name='tfds', tfds_name='no_such_dataset_xyz',
                              data_dir=str(tmp_path)), 'train')


# ----------------------------------------------------------------------------
# Registry.


def test_unknown_source_name_lists_names():
  with pytest.raises(ConfigError) as info:
    data.build_source(_config(name='imagenet'), 'train')
  for name in data.SOURCES:
    assert name in str(info.value)
  assert set(data.SOURCES) == {'toy2d', 'digits', 'array', 'folder', 'tfds'}


def test_negative_image_size_is_config_error():
  with pytest.raises(ConfigError, match='image_size'):
    data.build_source(_config(image_size=-1), 'train')
