"""The tfds source on a real array_record dataset, prepared locally (no network,
no TensorFlow: images are stored as PNG bytes encoded with PIL)."""

import io
import pickle
import threading

import numpy as np
from PIL import Image
import pytest

from scm_jax import data

tfds = pytest.importorskip('tensorflow_datasets')

NUM_EXAMPLES = 24


def _pixels(i):
  return np.random.default_rng(i).integers(0, 256, (12, 10, 3), dtype=np.uint8)


class ScmJaxTestImages(tfds.core.GeneratorBasedBuilder):
  """24 random 12x10 RGB images with labels i % 3."""

  VERSION = tfds.core.Version('1.0.0')
  # No download checksums to find beside the code (tfds's lookup of them fails
  # for builders inside a package when importlib_resources is missing).
  code_path = None

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=(12, 10, 3)),
        'label': tfds.features.ClassLabel(num_classes=3),
    }))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    for i in range(NUM_EXAMPLES):
      png = io.BytesIO()
      Image.fromarray(_pixels(i)).save(png, format='PNG')
      yield i, {'image': png.getvalue(), 'label': i % 3}


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('tfds')
  ScmJaxTestImages(data_dir=str(root), file_format='array_record').download_and_prepare()
  return str(root)


def _source(data_dir, **overrides):
  config = data.default_data_config()
  config.update(name='tfds', tfds_name='scm_jax_test_images', data_dir=data_dir,
                **overrides)
  return data.build_source(config, 'train')


def _index_of(x):
  """Example index of a decoded image (its pixels are _pixels(index))."""
  matches = [i for i in range(NUM_EXAMPLES)
             if np.allclose(x, _pixels(i) / 127.5 - 1, atol=1e-6)]
  assert len(matches) == 1
  return matches[0]


def test_prepared_dataset_decodes_and_streams(data_dir):
  source = _source(data_dir)
  assert len(source) == NUM_EXAMPLES and source.shape == (12, 10, 3)
  assert source.num_classes == 3
  # tfds shuffles examples when it writes them: records find their example.
  batch = source.get(np.arange(NUM_EXAMPLES))
  indices = [_index_of(x) for x in batch['x']]
  assert sorted(indices) == list(range(NUM_EXAMPLES))
  np.testing.assert_array_equal(batch['label'], np.array(indices) % 3)
  with data.make_stream(source, 8, 0, prefetch=1) as stream:
    flat = [next(stream) for _ in range(3)]
  indices = [_index_of(x) for b in flat for x in b['x']]
  assert sorted(indices) == list(range(NUM_EXAMPLES))  # One epoch.
  labels = np.concatenate([b['label'] for b in flat])
  np.testing.assert_array_equal(labels, np.array(indices) % 3)
  small = _source(data_dir, image_size=6)
  assert small.shape == (6, 6, 3) and small.get(np.arange(2))['x'].shape == (2, 6, 6, 3)


def test_source_pickles_small_and_reopens_when_it_cannot(data_dir):
  source = _source(data_dir)
  pickled = pickle.dumps(source)
  assert len(pickled) < 64 * 1024
  np.testing.assert_array_equal(pickle.loads(pickled).get(np.arange(3))['x'],
                                source.get(np.arange(3))['x'])
  # An open handle that does not pickle (e.g. another reader backend): the
  # copy re-opens the dataset by name.
  source._ds.lock = threading.Lock()  # pylint: disable=protected-access
  with pytest.raises(TypeError):
    pickle.dumps(source._ds)  # pylint: disable=protected-access
  copy = pickle.loads(pickle.dumps(source))
  assert copy._ds is not source._ds and repr(copy) == repr(source)  # pylint: disable=protected-access
  np.testing.assert_array_equal(copy.get(np.arange(3))['x'],
                                source.get(np.arange(3))['x'])
