"""EDM2's magnitude-preserving building blocks (Karras et al. 2024, Sec. 3, App. B).

Every layer keeps unit-variance activations at unit-variance input: weight-normalized
convolutions without biases (`MPConv`, with `project_weights` for forced weight
normalization), `mp_sum`, `mp_cat`, `mp_silu`, pixel norms, and the Fourier features
`MPFourier` whose frequencies and phases are loadable variables. Names follow
networks_edm2.py so that NVlabs' networks convert one to one (models/edm2_convert.py).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from scm_jax.models import layers

WEIGHT = 'weight'  # the name of every MPConv's stored weight (see project_weights)


# ----------------------------------------------------- magnitude-preserving operations

def normalize(x: jax.Array, axis, eps: float = 1e-4) -> jax.Array:
  """x / (eps + ||x|| / sqrt(n)) over `axis` (n elements): unit RMS (EDM2, Eq. 46)."""
  axis = tuple(np.atleast_1d(axis))
  n = int(np.prod([x.shape[a] for a in axis]))
  x32 = x.astype(jnp.float32)
  norm = jnp.sqrt(jnp.sum(jnp.square(x32), axis=axis, keepdims=True))
  return (x32 / (eps + norm / np.sqrt(n))).astype(x.dtype)


def pixel_norm(x: jax.Array) -> jax.Array:
  """Unit RMS over the channels (last axis)."""
  return normalize(x, -1)


def mp_silu(x: jax.Array) -> jax.Array:
  """SiLU divided by its output RMS at unit-normal input (EDM2, Eq. 81)."""
  return jax.nn.silu(x) / 0.596


def mp_sum(a: jax.Array, b: jax.Array, t: float = 0.5) -> jax.Array:
  """((1 - t) a + t b) / sqrt((1 - t)^2 + t^2): unit variance for unit-variance a, b."""
  return ((1 - t) * a + t * b) / np.sqrt((1 - t)**2 + t**2)


def mp_cat(a: jax.Array, b: jax.Array, t: float = 0.5) -> jax.Array:
  """Channel concatenation weighted by t, scaled to keep the total magnitude."""
  na, nb = a.shape[-1], b.shape[-1]
  c = np.sqrt((na + nb) / ((1 - t)**2 + t**2))
  return jnp.concatenate([a * (c / np.sqrt(na) * (1 - t)),
                          b.astype(a.dtype) * (c / np.sqrt(nb) * t)], axis=-1)


def resample(x: jax.Array, mode: str) -> jax.Array:
  """'down': 2x2 box filter, stride 2; 'up': nearest neighbour x2; 'keep': x."""
  if mode == 'down':
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
  if mode == 'up':
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  return x


def _unit_normal_init(key, shape, dtype=jnp.float32):
  """N(0, 1) weights already on the normalized sphere (what forced WN keeps)."""
  return normalize(jax.random.normal(key, shape, dtype), tuple(range(len(shape) - 1)))


class MPConv(nn.Module):
  """Magnitude-preserving convolution (kernel > 0) or linear layer (kernel == 0).

  No bias. At use the weight is normalized per output channel and scaled by
  gain / sqrt(fan_in), so its output has the input's magnitude (times `gain`).
  """
  features: int
  kernel: int = 0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, gain=1.0) -> jax.Array:
    shape = ((self.kernel, self.kernel) if self.kernel else ()) + (x.shape[-1], self.features)
    w = self.param(WEIGHT, _unit_normal_init, shape)
    fan_in = int(np.prod(shape[:-1]))
    w = normalize(w, tuple(range(len(shape) - 1))) * (gain / np.sqrt(fan_in))
    w, x = w.astype(self.dtype), x.astype(self.dtype)
    if not self.kernel:
      return x @ w
    return jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME',
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def project_weights(params, previous=None):
  """Forced weight normalization (EDM2, Sec. 3.3): every stored MPConv weight back on its
  sphere (unit RMS per output channel). Apply after each optimizer update; the forward
  pass normalizes anyway, so this changes the training dynamics, not the function.
  With `previous` (the parameters before the update), MPFourier's BUFFERS keep their
  previous values exactly, whatever the optimizer did (e.g. weight decay)."""
  def project(path, leaf):
    last = getattr(path[-1], 'key', None)
    if last == WEIGHT and leaf.ndim >= 2:
      return normalize(leaf, tuple(range(leaf.ndim - 1)))
    return leaf
  out = jax.tree_util.tree_map_with_path(project, params)
  if previous is None:
    return out
  return jax.tree_util.tree_map_with_path(
      lambda path, new, old: old if getattr(path[-1], 'key', None) in BUFFERS else new,
      out, previous)


BUFFERS = ('freqs', 'phases')  # MPFourier's variables: loaded and saved, never trained


def fourier_buffers(dim: int, bandwidth: float = 1.0, seed: int = 0):
  """EDM2's MPFourier draw in its own convention: freqs = 2 pi N(0, bw^2), phases =
  2 pi U[0, 1) (networks_edm2.MPFourier), from a fixed seed (float32 numpy)."""
  rng = np.random.RandomState(seed)
  freqs = rng.randn(dim) * bandwidth
  phases = rng.rand(dim)
  return ((2 * np.pi * freqs).astype(np.float32), (2 * np.pi * phases).astype(np.float32))


class MPFourier(nn.Module):
  """EDM2's magnitude-preserving Fourier features sqrt(2) cos(freqs c + phases) [B, dim].

  freqs and phases are variables (named in BUFFERS), so a checkpoint or an imported
  NVlabs network supplies them; they start at the seeded draw `fourier_buffers`, are read
  through stop_gradient and are held fixed by `project_weights` after every update.
  """
  dim: int
  bandwidth: float = 1.0
  seed: int = 0

  @nn.compact
  def __call__(self, c: jax.Array) -> jax.Array:
    f0, p0 = fourier_buffers(self.dim, self.bandwidth, self.seed)
    freqs = jax.lax.stop_gradient(self.param('freqs', lambda _: jnp.asarray(f0)))
    phases = jax.lax.stop_gradient(self.param('phases', lambda _: jnp.asarray(p0)))
    c = jnp.asarray(c, jnp.float32)
    return np.sqrt(2) * jnp.cos(c[:, None] * freqs + phases)


def mp_positional(c: jax.Array, dim: int) -> jax.Array:
  """The sCM positional embedding (layers.positional_embedding), times sqrt(2): unit RMS."""
  return np.sqrt(2) * layers.positional_embedding(c, dim)
