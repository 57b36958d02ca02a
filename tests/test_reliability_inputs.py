"""Fault class: bad input data. Corrupt or unsupported image files, a custom source that
returns the wrong things, NaN in an array file: each is a DataError naming the file or
the source, and the CLI prints one line and writes nothing."""

import os

import numpy as np
from PIL import Image
import pytest

from scm_jax import data as data_lib
from scm_jax.data.base import DataSource
from scm_jax.errors import DataError
from tests import helpers


def test_sixteen_bit_and_truncated_images_are_rejected_with_the_file(tmp_path):
  root = tmp_path / 'imgs'
  root.mkdir()
  Image.new('RGB', (4, 4), (10, 20, 30)).save(root / 'a.png')
  Image.fromarray((np.arange(16).reshape(4, 4) * 4000).astype(np.uint16)).save(root / 'b16.png')
  Image.new('RGB', (64, 64), (1, 2, 3)).save(root / 'c.png')
  data = open(root / 'c.png', 'rb').read()
  open(root / 'c.png', 'wb').write(data[:len(data) // 2])
  config = data_lib.default_data_config()
  config.update(name='folder', path=str(root), image_size=4)
  source = data_lib.build_source(config, 'train')
  np.testing.assert_allclose(source.get(np.array([0]))['x'][0, 0, 0],
                             np.array([10, 20, 30]) / 127.5 - 1, rtol=1e-6)
  with pytest.raises(DataError, match=r'b16\.png has I;16 pixels.*8-bit'):
    source.get(np.array([1]))
  with pytest.raises(DataError, match=r'c\.png \(corrupt'):
    source.get(np.array([2]))


class _Custom(DataSource):
  """A user's source whose decode returns `x` and `label` as given."""

  def __init__(self, x, label, num_classes=0):
    self.x, self.label, self.num_classes = x, label, num_classes
    self.shape, self.name = (2,), 'custom'

  def __len__(self):
    return 8

  def __getitem__(self, index):
    return index

  def decode(self, record):
    return {'x': self.x, 'label': self.label}


@pytest.mark.parametrize('x,label,classes,match', [
    (np.zeros(3, np.float32), np.int32(0), 0, r"'custom': decode\(\) returned x of float32 \(3,\)"),
    (np.zeros(2, np.float64), np.int32(0), 0, 'x of float64'),
    (np.zeros(2, np.float32), np.float32(1.5), 0, 'label of float32.*integer scalar'),
    (np.zeros(2, np.float32), np.int32(5), 3, r"'custom', batch 0: labels span \[5, 5\].*3 classes"),
])
def test_custom_source_examples_and_batches_are_checked(x, label, classes, match):
  stream = data_lib.make_stream(_Custom(x, label, classes), 4, 0, prefetch=1)
  with pytest.raises(DataError, match=match):
    next(stream)
  stream.close()


def test_array_file_with_nan_fails_the_cli_in_one_line(tmp_path):
  x = np.random.default_rng(0).normal(size=(64, 2)).astype(np.float32)
  x[17, 1] = np.nan
  path = str(tmp_path / 'points.npz')
  np.savez(path, x=x)
  p = helpers.run_module('scm_jax.train', *helpers.toy_cli_args(str(tmp_path / 'w'), **{
      'data.name': 'array', 'data.path': path})[2:], check=False)
  assert p.returncode == 2 and 'Traceback' not in p.stderr
  assert p.stderr.strip().splitlines()[-1] == f'error: Array file {path} contains NaN or Inf values.'
  assert not os.path.exists(tmp_path / 'w' / 'checkpoints')


def test_values_are_checked_in_the_dtype_training_sees(tmp_path):
  """float64 beyond float32's range would train on Inf; int64 labels beyond int32 would
  wrap to other classes: both are refused when the file is read."""
  big = np.zeros((8, 2), np.float64)
  big[3, 0] = 1e39
  np.savez(tmp_path / 'big.npz', x=big)
  with pytest.raises(DataError, match='beyond float32 range'):
    data_lib.arrays.load_array_source(str(tmp_path / 'big.npz'))
  labels = np.zeros(8, np.int64)
  labels[2] = 2**32 + 1  # would become class 1 as int32
  np.savez(tmp_path / 'labels.npz', x=np.zeros((8, 2), np.float32), label=labels)
  with pytest.raises(DataError, match='beyond int32'):
    data_lib.arrays.load_array_source(str(tmp_path / 'labels.npz'))


def test_dataset_smaller_than_the_batch_trains_with_one_warning(tmp_path):
  """README: a dataset smaller than the global batch is allowed (batches repeat its
  examples) and says so once."""
  x = np.random.default_rng(0).normal(size=(3, 2)).astype(np.float32)
  path = str(tmp_path / 'tiny.npz')
  np.savez(path, x=x)
  p = helpers.run_module('scm_jax.train', *helpers.toy_cli_args(str(tmp_path / 'w'), **{
      'data.name': 'array', 'data.path': path, 'train.num_steps': 2, 'train.ckpt_every': 2})[2:])
  warnings = [l for l in p.stderr.splitlines() if 'fewer than the global batch size' in l]
  assert len(warnings) == 1 and 'has 3 examples, fewer than the global batch size 64' \
      in warnings[0], p.stderr
