"""Tests for scm_jax.data: sources, config building and the batch stream."""

import json
import os

import numpy as np
from PIL import Image
import pytest
from sklearn import datasets as sk_datasets

from scm_jax import data
from scm_jax.data import toy2d
from scm_jax.data.base import ArraySource, BatchIterator, batch_indices
from scm_jax.errors import ConfigError, DataError


def _config(**overrides):
  config = data.default_data_config()
  config.update(overrides)
  return config


def _range_source(n):
  """Source whose example i is the vector [i]: batches reveal their indices."""
  return ArraySource(np.arange(n, dtype=np.float32)[:, None], None,
                     num_classes=0, name='range')


def _take(iterator, k):
  return [next(iterator)['x'][:, 0].astype(int) for _ in range(k)]


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
      'label_key': 'label', 'use_labels': False, 'prefetch': 2, 'latents': False,
  }
  assert config.to_dict() == expected


def test_batch_indices_follow_epoch_permutations():
  n, batch, seed = 7, 3, 5
  stream = np.concatenate(
      [np.random.default_rng([seed, e]).permutation(n) for e in range(4)])
  for step in range(9):
    np.testing.assert_array_equal(
        batch_indices(step, n, batch, seed),
        stream[step * batch:(step + 1) * batch])


@pytest.mark.parametrize('n,batch', [(10, 4), (12, 4), (5, 8)])
def test_every_epoch_covers_each_index_once(n, batch):
  steps = 4 * n // batch + 2
  stream = np.concatenate([batch_indices(s, n, batch, 0) for s in range(steps)])
  for epoch in range(len(stream) // n):
    assert sorted(stream[epoch * n:(epoch + 1) * n]) == list(range(n))


def test_epochs_are_reshuffled():
  assert not np.array_equal(batch_indices(0, 100, 100, 0),
                            batch_indices(1, 100, 100, 0))


def test_processes_partition_the_global_batch():
  for step in range(5):
    full = batch_indices(step, 50, 8, 3)
    parts = [batch_indices(step, 50, 8, 3, process_index=p, process_count=2)
             for p in range(2)]
    assert all(len(p) == 4 for p in parts)
    np.testing.assert_array_equal(np.concatenate(parts), full)


def test_process_iterators_partition_the_global_batch():
  source = _range_source(30)
  full = _take(BatchIterator(source, 8, 1, prefetch=0), 6)
  parts = [_take(BatchIterator(source, 8, 1, process_index=p, process_count=2,
                               prefetch=0), 6) for p in range(2)]
  for step in range(6):
    np.testing.assert_array_equal(
        np.concatenate([parts[0][step], parts[1][step]]), full[step])


def test_indivisible_batch_is_config_error():
  with pytest.raises(ConfigError, match='divisible'):
    BatchIterator(_range_source(10), 7, 0, process_count=2)
  with pytest.raises(ConfigError):
    batch_indices(0, 10, 7, 0, process_index=0, process_count=2)


@pytest.mark.parametrize('prefetch', [0, 2])
def test_same_seed_same_batches_different_seed_different(prefetch):
  source = _range_source(40)
  with BatchIterator(source, 16, 0, prefetch=prefetch) as a, \
       BatchIterator(source, 16, 0, prefetch=prefetch) as b, \
       BatchIterator(source, 16, 1, prefetch=prefetch) as c:
    first, second, other = _take(a, 6), _take(b, 6), _take(c, 6)
  np.testing.assert_array_equal(first, second)
  assert not np.array_equal(first, other)


@pytest.mark.parametrize('prefetch', [0, 3])
def test_resume_from_start_step_is_bit_identical(prefetch):
  source = _range_source(23)
  reference = _take(BatchIterator(source, 5, 7, prefetch=0), 12)
  with BatchIterator(source, 5, 7, start_step=4, prefetch=prefetch) as it:
    np.testing.assert_array_equal(_take(it, 8), reference[4:])
    assert it.state() == {'step': 12, 'seed': 7, 'global_batch_size': 5}


@pytest.mark.parametrize('prefetch', [0, 2])
def test_state_restore_round_trip(prefetch):
  source = _range_source(23)
  with BatchIterator(source, 5, 7, prefetch=prefetch) as it:
    _take(it, 3)
    state = json.loads(json.dumps(it.state()))  # Must survive JSON.
    after = _take(it, 4)
  with BatchIterator(source, 5, 7, prefetch=prefetch) as fresh:
    _take(fresh, 9)  # Move elsewhere (and fill the prefetch queue) first.
    fresh.restore(state)
    np.testing.assert_array_equal(_take(fresh, 4), after)


def test_restore_with_other_seed_is_config_error():
  it = BatchIterator(_range_source(10), 2, 0, prefetch=0)
  with pytest.raises(ConfigError, match='seed'):
    it.restore({'step': 3, 'seed': 1, 'global_batch_size': 2})


def test_prefetch_thread_propagates_errors_and_closes():

  class Broken(ArraySource):

    def get(self, indices):
      raise DataError('broken.png is corrupt')

  it = BatchIterator(Broken(np.zeros((4, 1)), None, num_classes=0, name='b'),
                     2, 0, prefetch=2)
  with pytest.raises(DataError, match='broken.png'):
    next(it)
  assert it._thread is None  # pylint: disable=protected-access


def test_batch_contents_and_dtypes():
  source = data.build_source(_config(name='toy2d', toy='ring8',
                                     num_train=100), 'train')
  with BatchIterator(source, 32, 0, process_index=1, process_count=2) as it:
    batch = next(it)
  assert batch['x'].shape == (16, 2) and batch['x'].dtype == np.float32
  assert batch['label'].shape == (16,) and batch['label'].dtype == np.int32


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
    with BatchIterator(source, 4, 0, prefetch=1) as it:
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
