"""Feature extraction in fixed-size, mesh-sharded batches, and image preparation.

A fixed batch size (the last batch padded, the padding dropped) means one compile for
any number of images; the batch is split over every mesh axis so all devices work.
Results do not depend on the batch size (tested), so sample and reference sets may be
processed differently.
"""

from typing import Callable, Optional

import jax
import numpy as np
from jax.sharding import Mesh

from scm_jax.infra import sharding as sharding_lib
from scm_jax.errors import ConfigError


def batched(fn: Callable, x: np.ndarray, batch_size: int):
  """Concatenated fn(batch) over x in batches of exactly batch_size rows.

  fn returns an array or a tuple of arrays with the batch as leading axis.
  """
  outs = []
  for i in range(0, len(x), batch_size):
    block = np.asarray(x[i:i + batch_size])
    n = len(block)
    if n < batch_size:
      block = np.concatenate([block, np.repeat(block[-1:], batch_size - n, 0)])
    out = fn(block)
    outs.append(jax.tree.map(lambda a, n=n: np.asarray(a)[:n], out))
  return jax.tree.map(lambda *a: np.concatenate(a), *outs)


class Extractor:
  """apply_fn(variables, images) jitted with the batch sharded over `mesh`.

  `prepare` maps model-space samples (numpy) to the network's input on the host.
  """

  def __init__(self, apply_fn: Callable, variables, batch_size: int,
               mesh: Optional[Mesh] = None, prepare: Callable = None, name: str = ''):
    self.name = name
    self.prepare = prepare or (lambda x: x)
    if mesh is None:
      mesh = sharding_lib.make_mesh({'data': 1}, jax.devices()[:1])
    if batch_size < 1:
      raise ConfigError(f'feature batch size must be >= 1, got {batch_size}.')
    self.batch_size = -(-batch_size // mesh.size) * mesh.size  # whole rows per device
    rep, shard = sharding_lib.replicated(mesh), sharding_lib.batch_sharding(mesh)
    self.variables = jax.device_put(variables, rep)
    self._fn = jax.jit(apply_fn, in_shardings=(rep, shard), out_shardings=shard)

  def __call__(self, x: np.ndarray):
    return batched(lambda b: self._fn(self.variables, b), self.prepare(np.asarray(x)),
                   self.batch_size)


def to_unit_interval(x: np.ndarray, quantize: bool = True) -> np.ndarray:
  """Samples in [-1, 1] -> [0, 1]; quantize rounds to 8-bit levels like a saved PNG,
  the way FID tools see images read from files (and reference statistics are made)."""
  u = np.clip((np.asarray(x, np.float32) + 1.0) / 2.0, 0.0, 1.0)
  if quantize:
    u = np.round(u * 255.0) / 255.0
  return u.astype(np.float32)


def image_input(x: np.ndarray, quantize: bool = True) -> np.ndarray:
  """[N, H, W, 1 or 3] samples in [-1, 1] -> [N, H, W, 3] in [0, 1]: the host-side input of
  the FID Inception and the FD_DINOv2 network (each resizes and normalizes on device)."""
  if x.ndim != 4 or x.shape[-1] not in (1, 3):
    raise ConfigError(f'FID / FD_DINOv2 need images [N, H, W, 1 or 3]; these samples have '
                      f'shape {x.shape[1:]}. Use --metrics=energy,swd for vector data.')
  u = to_unit_interval(x, quantize)
  return np.repeat(u, 3, axis=-1) if u.shape[-1] == 1 else u
