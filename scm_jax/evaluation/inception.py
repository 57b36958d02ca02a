"""The FID Inception-v3 (pool3, 2048 features) in Flax, matching pytorch-fid.

FID is only comparable across papers when computed with one particular network: the
TensorFlow Inception graph of 2015-12-05 used by Heusel et al. (2017), which pytorch-fid
and clean-fid ship as `pt_inception-2015-12-05-6726825d.pth`. That network differs from
torchvision's Inception-v3 in four blocks, reproduced here as in pytorch-fid:

- FIDInceptionA / FIDInceptionC / FIDInceptionE_1: the pool branch averages with
  `count_include_pad=False` (TensorFlow's average pool ignores the zero padding);
- FIDInceptionE_2 (Mixed_7c): the pool branch is a 3x3 *max* pool.

Input: images in [0, 1], any size, NHWC. They are resized to 299x299 with PyTorch's
`F.interpolate(mode='bilinear', align_corners=False)` (no antialiasing, reproduced
exactly by `resize_bilinear_torch`) and scaled to [-1, 1], as pytorch-fid does.

Weights cannot be downloaded here: convert the standard file once with
`python -m scm_jax.evaluation.convert_inception` (see that module) and load the result
with `load_inception_params`. Parameter names follow torchvision's module names, so the
converter is a rename plus a kernel transpose.
"""

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from scm_jax.errors import CheckpointError
from scm_jax.evaluation import npz_tree

FEATURE_DIM = 2048
INPUT_SIZE = 299
BN_EPS = 1e-3  # torchvision BasicConv2d: BatchNorm2d(eps=0.001)
WEIGHTS_HELP = (
    'Get the standard FID weights pt_inception-2015-12-05-6726825d.pth (pytorch-fid '
    'release "fid_weights" on GitHub) on a machine with internet, then run '
    '`python -m scm_jax.evaluation.convert_inception --src=pt_inception-2015-12-05-6726825d.pth '
    '--out=inception_fid.npz` (needs torch) and pass --inception_weights=inception_fid.npz.')


def _pair(v):
  return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv(nn.Module):
  """torchvision BasicConv2d: conv (no bias) -> BatchNorm (running stats) -> ReLU."""
  features: int
  kernel: int | Sequence[int]
  stride: int = 1
  padding: int | Sequence[int] = 0

  @nn.compact
  def __call__(self, x):
    ph, pw = _pair(self.padding)
    x = nn.Conv(self.features, _pair(self.kernel), strides=_pair(self.stride),
                padding=((ph, ph), (pw, pw)), use_bias=False, name='conv')(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, name='bn')(x)
    return nn.relu(x)


def _avg_pool_3x3_same(x):
  # TensorFlow semantics (pytorch-fid's patch): padded zeros are not counted.
  return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x, stride: int = 1, pad: int = 0):
  return nn.max_pool(x, (3, 3), (stride, stride), ((pad, pad), (pad, pad)))


class InceptionA(nn.Module):
  """Mixed_5b/c/d (FIDInceptionA)."""
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(64, 1, name='branch1x1')(x)
    b5 = BasicConv(48, 1, name='branch5x5_1')(x)
    b5 = BasicConv(64, 5, padding=2, name='branch5x5_2')(b5)
    b3 = BasicConv(64, 1, name='branch3x3dbl_1')(x)
    b3 = BasicConv(96, 3, padding=1, name='branch3x3dbl_2')(b3)
    b3 = BasicConv(96, 3, padding=1, name='branch3x3dbl_3')(b3)
    bp = BasicConv(self.pool_features, 1, name='branch_pool')(_avg_pool_3x3_same(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a (grid reduction 35 -> 17, unchanged from torchvision)."""

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(384, 3, stride=2, name='branch3x3')(x)
    bd = BasicConv(64, 1, name='branch3x3dbl_1')(x)
    bd = BasicConv(96, 3, padding=1, name='branch3x3dbl_2')(bd)
    bd = BasicConv(96, 3, stride=2, name='branch3x3dbl_3')(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3(x, stride=2)], axis=-1)


class InceptionC(nn.Module):
  """Mixed_6b/c/d/e (FIDInceptionC): factorized 7x7 convolutions."""
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    b1 = BasicConv(192, 1, name='branch1x1')(x)
    b7 = BasicConv(c7, 1, name='branch7x7_1')(x)
    b7 = BasicConv(c7, (1, 7), padding=(0, 3), name='branch7x7_2')(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name='branch7x7_3')(b7)
    bd = BasicConv(c7, 1, name='branch7x7dbl_1')(x)
    bd = BasicConv(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_2')(bd)
    bd = BasicConv(c7, (1, 7), padding=(0, 3), name='branch7x7dbl_3')(bd)
    bd = BasicConv(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_4')(bd)
    bd = BasicConv(192, (1, 7), padding=(0, 3), name='branch7x7dbl_5')(bd)
    bp = BasicConv(192, 1, name='branch_pool')(_avg_pool_3x3_same(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """Mixed_7a (grid reduction 17 -> 8, unchanged from torchvision)."""

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(192, 1, name='branch3x3_1')(x)
    b3 = BasicConv(320, 3, stride=2, name='branch3x3_2')(b3)
    b7 = BasicConv(192, 1, name='branch7x7x3_1')(x)
    b7 = BasicConv(192, (1, 7), padding=(0, 3), name='branch7x7x3_2')(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name='branch7x7x3_3')(b7)
    b7 = BasicConv(192, 3, stride=2, name='branch7x7x3_4')(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3(x, stride=2)], axis=-1)


class InceptionE(nn.Module):
  """Mixed_7b (FIDInceptionE_1, average pool) and Mixed_7c (FIDInceptionE_2, max pool)."""
  pool: str  # 'avg' | 'max'

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(320, 1, name='branch1x1')(x)
    b3 = BasicConv(384, 1, name='branch3x3_1')(x)
    b3 = jnp.concatenate([BasicConv(384, (1, 3), padding=(0, 1), name='branch3x3_2a')(b3),
                          BasicConv(384, (3, 1), padding=(1, 0), name='branch3x3_2b')(b3)], -1)
    bd = BasicConv(448, 1, name='branch3x3dbl_1')(x)
    bd = BasicConv(384, 3, padding=1, name='branch3x3dbl_2')(bd)
    bd = jnp.concatenate([BasicConv(384, (1, 3), padding=(0, 1), name='branch3x3dbl_3a')(bd),
                          BasicConv(384, (3, 1), padding=(1, 0), name='branch3x3dbl_3b')(bd)], -1)
    pooled = _avg_pool_3x3_same(x) if self.pool == 'avg' else _max_pool_3x3(x, pad=1)
    bp = BasicConv(192, 1, name='branch_pool')(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


@functools.lru_cache(maxsize=None)
def _bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out, in] weights of PyTorch bilinear interpolation with align_corners=False.

  Source coordinate (i + 0.5) * in / out - 0.5, clamped below at 0 (PyTorch's rule),
  neighbours floor and floor + 1 (clamped to the last pixel).
  """
  scale = in_size / out_size
  src = np.maximum((np.arange(out_size) + 0.5) * scale - 0.5, 0.0)
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  lam = src - i0
  m = np.zeros((out_size, in_size), np.float64)
  np.add.at(m, (np.arange(out_size), i0), 1.0 - lam)
  np.add.at(m, (np.arange(out_size), i1), lam)
  return m.astype(np.float32)


def resize_bilinear_torch(x: jax.Array, size: int) -> jax.Array:
  """NHWC resize equal to torch F.interpolate(bilinear, align_corners=False, antialias=False).

  Separable, so two small matmuls; `jax.image.resize` would antialias when shrinking.
  """
  mh = jnp.asarray(_bilinear_matrix(x.shape[1], size))
  mw = jnp.asarray(_bilinear_matrix(x.shape[2], size))
  x = jnp.einsum('oh,bhwc->bowc', mh, x, precision=jax.lax.Precision.HIGHEST)
  return jnp.einsum('pw,bowc->bopc', mw, x, precision=jax.lax.Precision.HIGHEST)


class InceptionV3FID(nn.Module):
  """Images [B, H, W, 3] in [0, 1] -> pool3 features [B, 2048] (pytorch-fid block 3).

  `input_size` is 299 for real FID; tests use the same network at a smaller size.
  """
  input_size: int = INPUT_SIZE

  @nn.compact
  def __call__(self, images):
    x = images.astype(jnp.float32)
    if x.shape[1:3] != (self.input_size, self.input_size):
      x = resize_bilinear_torch(x, self.input_size)
    x = 2.0 * x - 1.0
    x = BasicConv(32, 3, stride=2, name='Conv2d_1a_3x3')(x)
    x = BasicConv(32, 3, name='Conv2d_2a_3x3')(x)
    x = BasicConv(64, 3, padding=1, name='Conv2d_2b_3x3')(x)
    x = _max_pool_3x3(x, stride=2)
    x = BasicConv(80, 1, name='Conv2d_3b_1x1')(x)
    x = BasicConv(192, 3, name='Conv2d_4a_3x3')(x)
    x = _max_pool_3x3(x, stride=2)
    x = InceptionA(32, name='Mixed_5b')(x)
    x = InceptionA(64, name='Mixed_5c')(x)
    x = InceptionA(64, name='Mixed_5d')(x)
    x = InceptionB(name='Mixed_6a')(x)
    for name, c7 in (('Mixed_6b', 128), ('Mixed_6c', 160), ('Mixed_6d', 160), ('Mixed_6e', 192)):
      x = InceptionC(c7, name=name)(x)
    x = InceptionD(name='Mixed_7a')(x)
    x = InceptionE('avg', name='Mixed_7b')(x)
    x = InceptionE('max', name='Mixed_7c')(x)
    return jnp.mean(x, axis=(1, 2))  # AdaptiveAvgPool2d((1, 1))


# ------------------------------------------------------------------ weights I/O

def abstract_variables(input_size: int = INPUT_SIZE) -> dict:
  """Shapes of {'params', 'batch_stats'} (no computation)."""
  model = InceptionV3FID(input_size)
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                           jnp.zeros((1, input_size, input_size, 3))))


def random_variables(seed: int = 0, input_size: int = INPUT_SIZE) -> dict:
  """Random variables of the same structure, scaled so features stay O(1) through the
  ~100 layers (He-normal kernels, BatchNorm statistics near identity): for tests and
  benchmarks where the real weights are not at hand. Built in numpy, without compiling
  `init`, which is slow on CPU."""
  rng = np.random.default_rng(seed)
  flat = {}
  for name, leaf in npz_tree.flat_leaves(abstract_variables(input_size)).items():
    shape, kind = leaf.shape, name.rsplit('/', 1)[-1]
    if kind == 'kernel':
      value = rng.normal(size=shape) * np.sqrt(2.0 / np.prod(shape[:-1]))
    elif kind in ('scale', 'var'):
      value = rng.uniform(0.5, 1.5, shape)
    else:  # BatchNorm bias and running mean
      value = 0.1 * rng.normal(size=shape)
    flat[name] = value.astype(np.float32)
  return npz_tree.unflatten(flat)


def save_inception_params(path: str, variables) -> None:
  """Writes variables as a plain .npz (no pickle), the format `load_inception_params` reads."""
  npz_tree.save(path, variables)


def load_inception_params(path: str) -> dict:
  """Reads converted FID Inception weights, checking every name and shape.

  Raises CheckpointError (with how to get the file) when it is missing or does not hold
  the FID Inception-v3.
  """
  flat = npz_tree.read_weights(path, 'Inception', WEIGHTS_HELP)
  expected = abstract_variables()
  bad = npz_tree.mismatches(flat, expected)
  if bad:
    raise CheckpointError(f'{path!r} is not the FID Inception-v3 ({len(bad)} problems, e.g. '
                          f'{bad[:3]}). {WEIGHTS_HELP}')
  return npz_tree.unflatten({k: flat[k].astype(np.float32)
                             for k in npz_tree.flat_leaves(expected)})
