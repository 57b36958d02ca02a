"""A small CNN classifier of the 8x8 digits: the feature network of laptop-scale metrics.

Inception features mean nothing on 8x8 grey digits, so digits samples are judged in the
feature space of this classifier, trained by the project on the digits train split
(`python -m scm_jax.evaluation.train_digits_classifier`; the committed weights
`assets/digits_classifier.npz` come from that script with its defaults):

- Fréchet distance of its penultimate features (the FID formula; NOT comparable with
  published FID: a different network on different data);
- its test accuracy on conditional samples (does the sample show the digit asked for?);
- the mean entropy of its predictions (low: samples look like clear digits) and the
  entropy of the mean prediction (high, near log 10: all classes are produced).
"""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from scm_jax.errors import CheckpointError
from scm_jax.evaluation import features as features_lib
from scm_jax.evaluation import npz_tree

DEFAULT_WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'assets',
                               'digits_classifier.npz')
FEATURE_DIM = 64
NUM_CLASSES = 10
IMAGE_SHAPE = (8, 8, 1)


class DigitsCNN(nn.Module):
  """[B, 8, 8, 1] in [-1, 1] -> (features [B, 64] (post-ReLU), logits [B, 10])."""
  features: int = FEATURE_DIM
  dropout: float = 0.3

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.relu(nn.Conv(32, (3, 3), name='conv0')(x))
    h = nn.relu(nn.Conv(64, (3, 3), name='conv1')(h))
    h = nn.avg_pool(h, (2, 2), (2, 2)).reshape(x.shape[0], -1)
    feats = nn.relu(nn.Dense(self.features, name='dense0')(h))
    logits = nn.Dense(NUM_CLASSES, name='head')(
        nn.Dropout(self.dropout, deterministic=not train)(feats))
    return feats, logits


def _augment(key, x):
  """Random translation by up to one pixel (edge padding): digits are not centred alike."""
  pad = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode='edge')
  shifts = jax.random.randint(key, (x.shape[0], 2), 0, 3)
  crop = lambda img, s: jax.lax.dynamic_slice(img, (s[0], s[1], 0), IMAGE_SHAPE)
  return jax.vmap(crop)(pad, shifts)


def train_classifier(images: np.ndarray, labels: np.ndarray, *, steps: int = 1500,
                     batch_size: int = 64, lr: float = 2e-3, seed: int = 0) -> dict:
  """Adam with cosine decay, shift augmentation and dropout; returns the variables."""
  model = DigitsCNN()
  key = jax.random.PRNGKey(seed)
  params = model.init(key, jnp.zeros((1,) + IMAGE_SHAPE))['params']
  tx = optax.adam(optax.cosine_decay_schedule(lr, steps))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, x, y, key):
    k_aug, k_drop = jax.random.split(key)

    def loss_fn(p):
      _, logits = model.apply({'params': p}, _augment(k_aug, x), train=True,
                              rngs={'dropout': k_drop})
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    grads = jax.grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  rng = np.random.default_rng(seed)
  images, labels = np.asarray(images, np.float32), np.asarray(labels, np.int32)
  for i in range(steps):
    idx = rng.choice(len(images), batch_size, replace=False)
    params, opt_state = step(params, opt_state, images[idx], labels[idx],
                             jax.random.fold_in(key, i))
  return {'params': params}


def features_and_probs_fn(variables, x):
  """(features, class probabilities) of a batch; samples are clipped to the data range."""
  feats, logits = DigitsCNN().apply(variables, jnp.clip(x, -1.0, 1.0))
  return feats, jax.nn.softmax(logits)


_features_and_probs = jax.jit(features_and_probs_fn)


def features_and_probs(variables, x: np.ndarray, batch_size: int = 500):
  """(features [N, 64], class probabilities [N, 10]) of images [N, 8, 8, 1] in [-1, 1]."""
  x = np.asarray(x, np.float32)
  if x.shape[1:] != IMAGE_SHAPE:
    raise ValueError(f'the digits classifier takes images of shape {IMAGE_SHAPE}, got {x.shape[1:]}')
  return features_lib.batched(lambda b: _features_and_probs(variables, b), x,
                              min(batch_size, len(x)))


def accuracy(variables, x: np.ndarray, labels: np.ndarray) -> float:
  return float(np.mean(np.argmax(features_and_probs(variables, x)[1], 1) == labels))


def class_statistics(probs: np.ndarray, labels=None) -> dict:
  """Mean prediction entropy, entropy of the mean prediction (nats), and accuracy
  against the requested labels when given."""
  eps = 1e-12
  out = {
      'cls_entropy': float(np.mean(-np.sum(probs * np.log(probs + eps), 1))),
      'cls_marginal_entropy': float(-np.sum(probs.mean(0) * np.log(probs.mean(0) + eps))),
  }
  if labels is not None:
    out['cls_accuracy'] = float(np.mean(np.argmax(probs, 1) == np.asarray(labels)))
  return out


def save_classifier(path: str, variables) -> None:
  npz_tree.save(path, variables)


def load_classifier(path: str = '') -> dict:
  """The classifier's variables (default: the committed weights), checked for shape."""
  path = path or DEFAULT_WEIGHTS
  try:
    flat = npz_tree.read(path)
  except (OSError, ValueError) as e:
    raise CheckpointError(f'cannot read digits classifier weights {path} ({e}); recreate them '
                          'with `python -m scm_jax.evaluation.train_digits_classifier`.') from None
  expected = jax.eval_shape(
      lambda: {'params': DigitsCNN().init(jax.random.PRNGKey(0),
                                          jnp.zeros((1,) + IMAGE_SHAPE))['params']})
  bad = npz_tree.mismatches(flat, expected)
  if bad:
    raise CheckpointError(f'{path} is not a digits classifier ({bad[:3]}); recreate it with '
                          '`python -m scm_jax.evaluation.train_digits_classifier`.')
  return npz_tree.unflatten(flat)
