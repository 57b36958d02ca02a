"""scikit-learn's bundled 8x8 handwritten digits: a tiny real image dataset.

It ships inside scikit-learn, so it works offline and makes end-to-end image
tests and CPU demos possible without any download.
"""

import numpy as np

from scm_jax.data.base import ArraySource, check_split

NUM_EXAMPLES = 1797
NUM_TEST = 300
SPLITS = ('train', 'test')
# Fixed so the split never depends on the experiment seed.
_SPLIT_SEED = 0


def load_digits_split(split: str) -> tuple:
  """Returns (images float32 [n, 8, 8, 1] in [-1, 1], labels int64 [n])."""
  # Imported lazily: slow, and only needed by this source.
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  check_split(split, SPLITS, 'digits')
  digits = datasets.load_digits()
  perm = np.random.default_rng(_SPLIT_SEED).permutation(len(digits.images))
  idx = perm[:-NUM_TEST] if split == 'train' else perm[-NUM_TEST:]
  # Pixel values are integers 0..16, so x / 8 - 1 spans exactly [-1, 1].
  images = digits.images[idx].astype(np.float32)[..., None] / 8.0 - 1.0
  return images, digits.target[idx]


def make_digits(split: str, image_size: int = 0) -> ArraySource:
  """Digits source; 1497 train / 300 test, 10 classes, (8, 8, 1) natively.

  `image_size` > 0 resizes bilinearly (done once here: the data is tiny).
  """
  images, labels = load_digits_split(split)
  if image_size and image_size != images.shape[1]:
    source = ArraySource(images, labels, num_classes=10, name='digits',
                         image_size=image_size)
    images = source.get(np.arange(len(images)))['x']
  return ArraySource(np.clip(images, -1.0, 1.0), labels, num_classes=10,
                     name='digits')


def from_config(config, split: str) -> ArraySource:
  return make_digits(split, image_size=config.image_size)
