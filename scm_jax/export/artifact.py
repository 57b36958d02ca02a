"""A generator artifact (`.jaxexport`): its file format, and `load`, which runs it.

This file needs only jax and numpy: copy it next to a program to run exported
generators without scm_jax, its models or Flax (`from artifact import load`).

    gen = load('gen.jaxexport')
    x = gen(gen.noise(batch=16, seed=0), labels=np.arange(16) % 10)   # numpy [16, H, W, C]

Layout (little endian): MAGIC, uint32 format version, uint64 header length, the
header (UTF-8 JSON), then the payload: the `jax.export` serialization of the sampler
and the weights, raw C-order bytes at 64-byte aligned offsets (memory-mapped when
loaded). The header holds the metadata (what `gen.metadata` returns), where each part
lies, the payload's length and its CRC-32, so that a truncated or damaged file is
refused before anything runs.

The sampler's arguments are `(weights, noise[, labels][, guidance])`; the weights are
arguments, not constants baked into the program: the program stays small whatever the
model's size (a serialized module with gigabytes of constants exceeds protobuf's 2 GiB
limit, and XLA compiles constants slowly), and the weights are read and placed on the
device once.
"""

import json
import os
import struct
import zlib
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import export

try:  # inside scm_jax: the CLIs print these as one line
  from scm_jax.errors import ScmJaxError as _Base
except ImportError:  # this file alone
  _Base = Exception

MAGIC = b'SCMJAX-GENERATOR\x00'
FORMAT_VERSION = 1
ALIGN = 64
_PREFIX = struct.Struct('<IQ')   # format version, header length


class ArtifactError(_Base, ValueError):
  """A generator artifact that cannot be used here, or inputs it cannot take."""


# ------------------------------------------------------------------ writing


def _aligned(n: int) -> int:
  return -(-n // ALIGN) * ALIGN


def write(f, program: bytes, weights: list, metadata: dict) -> None:
  """Writes the artifact of a serialized `jax.export.Exported` and its weight arrays
  to the binary file `f`, part by part (no copy of the whole payload in memory)."""
  weights = [np.ascontiguousarray(w) for w in weights]
  parts, entries, offset = [bytes(program)], [], len(program)
  for w in weights:
    pad = _aligned(offset) - offset
    parts.append(b'\0' * pad)
    entries.append({'shape': list(w.shape), 'dtype': w.dtype.name, 'offset': offset + pad,
                    'nbytes': int(w.nbytes)})
    parts.append(memoryview(w.reshape(-1).view(np.uint8)))
    offset += pad + w.nbytes
  crc = 0
  for part in parts:
    crc = zlib.crc32(part, crc)
  header = json.dumps({'metadata': metadata,
                       'program': {'offset': 0, 'nbytes': len(program)},
                       'weights': entries, 'payload_bytes': offset, 'crc32': crc}).encode()
  f.write(MAGIC + _PREFIX.pack(FORMAT_VERSION, len(header)) + header)
  for part in parts:
    f.write(part)


# ------------------------------------------------------------------ reading


def _read_header(path: str, f) -> tuple[dict, int]:
  if f.read(len(MAGIC)) != MAGIC:
    raise ArtifactError(f'{path} is not a generator artifact (it does not start with '
                        f'{MAGIC[:-1].decode()}); pass a file written by python -m '
                        'scm_jax.export.')
  prefix = f.read(_PREFIX.size)
  if len(prefix) < _PREFIX.size:
    raise ArtifactError(f'{path} is truncated (it ends inside the header); export it again.')
  version, length = _PREFIX.unpack(prefix)
  if version > FORMAT_VERSION:
    raise ArtifactError(f'{path} has format version {version}; this loader reads up to '
                        f'{FORMAT_VERSION}: update scm_jax (or this file).')
  raw = f.read(length)
  try:
    header = json.loads(raw.decode())
  except (UnicodeDecodeError, ValueError):
    what = 'truncated' if len(raw) < length else 'damaged'
    raise ArtifactError(f'{path} is {what} (its header is not readable); export it '
                        'again.') from None
  return header, len(MAGIC) + _PREFIX.size + length


def _crc32(data: np.ndarray, chunk: int = 2**26) -> int:
  crc = 0
  for i in range(0, data.size, chunk):
    crc = zlib.crc32(data[i:i + chunk], crc)
  return crc


def current_platform() -> str:
  """This process's platform as jax.export names it ('cpu', 'cuda', 'rocm', 'tpu')."""
  return export.default_export_platform()


def load(path: str, device: Optional[jax.Device] = None) -> 'Generator':
  """Reads a generator artifact and places its weights on `device` (default: the first).

  Raises ArtifactError (one line) for a file that is not an artifact, truncated or
  damaged, not a jax.export program, or exported without this machine's platform.
  """
  with open(path, 'rb') as f:
    header, start = _read_header(path, f)
  size = os.path.getsize(path)
  if size < start + header['payload_bytes']:
    raise ArtifactError(f'{path} is truncated ({size} of {start + header["payload_bytes"]} '
                        'bytes); copy or export it again.')
  payload = np.memmap(path, np.uint8, 'r', offset=start, shape=(header['payload_bytes'],))
  if _crc32(payload) != header['crc32']:
    raise ArtifactError(f'{path} is damaged (checksum mismatch); copy or export it again.')
  prog = header['program']
  try:
    exported = export.deserialize(bytearray(payload[prog['offset']:prog['offset'] + prog['nbytes']]))
  except Exception as e:  # pylint: disable=broad-except
    raise ArtifactError(f'{path} holds no jax.export program this jax ({jax.__version__}) '
                        f'can read ({type(e).__name__}); export it again with this '
                        'version.') from None
  here = current_platform()
  if here not in exported.platforms:
    raise ArtifactError(
        f'{path} was exported for {",".join(exported.platforms)}, not for this machine\'s '
        f'{here}: export it again with --platforms={",".join(exported.platforms + (here,))}.')
  weights = [payload[e['offset']:e['offset'] + e['nbytes']].view(jnp.dtype(e['dtype']))
             .reshape(e['shape']) for e in header['weights']]
  return Generator(exported, header['metadata'], weights, device)


# ------------------------------------------------------------------ running


class Generator:
  """An exported sampler with its weights: gen(noise, labels=None, guidance=None).

  Attributes:
    metadata: what the exporter recorded (steps, method, sigma_d, t_max, shapes, label
      count, guidance, platforms, jax version, the workdir's step and EMA, ...).
    exported: the `jax.export.Exported` program.
  """

  def __init__(self, exported: export.Exported, metadata: dict, weights: list,
               device: Optional[jax.Device] = None):
    self.exported, self.metadata = exported, metadata
    device = device or jax.devices()[0]
    self._weights = [jax.device_put(w, device) for w in weights]
    self._call = jax.jit(exported.call)

  @property
  def noise_shape(self) -> tuple:
    """[noise draws, B, *data_shape], with None for a symbolic batch B."""
    return tuple(self.metadata['noise_shape'])

  def noise(self, batch: int, seed: int = 0) -> np.ndarray:
    """Standard-normal float32 noise for `batch` samples, from numpy's generator."""
    shape = (self.noise_shape[0], batch) + self.noise_shape[2:]
    return np.random.default_rng(seed).standard_normal(shape, np.float32)

  def __call__(self, noise, labels=None, guidance=None) -> np.ndarray:
    """Samples [B, *data_shape] (numpy) from standard-normal `noise` [noise draws, B,
    *data_shape]; `labels` [B] (int, class-conditional models); `guidance` (a scalar or
    [B], models with a guidance input; default metadata['guidance'])."""
    args = [self._check_noise(noise)]
    batch = args[0].shape[1]
    args += self._check_labels(labels, batch) + self._check_guidance(guidance, batch)
    return np.asarray(self._call(self._weights, *args))

  def _check_noise(self, noise):
    want = self.noise_shape
    text = '(' + ', '.join('B' if d is None else str(d) for d in want) + ')'
    noise = np.asarray(noise)
    if noise.dtype.kind != 'f':
      raise ArtifactError(f'noise has dtype {noise.dtype}; pass float32 standard-normal '
                          f'noise of shape {text} (gen.noise(batch)).')
    if noise.ndim != len(want) or any(w is not None and w != d for w, d in zip(want, noise.shape)):
      raise ArtifactError(f'noise has shape {noise.shape}; this generator takes {text} '
                          f'(gen.noise(batch)).')
    if noise.shape[1] < 1:
      raise ArtifactError('noise has an empty batch; pass at least one sample.')
    return noise.astype(np.float32, copy=False)

  def _check_labels(self, labels, batch: int) -> list:
    classes = self.metadata['num_classes']
    if not classes:
      if labels is not None:
        raise ArtifactError('labels given, but this generator is unconditional: drop them.')
      return []
    if labels is None:
      raise ArtifactError(f'this generator is class-conditional: pass labels, {batch} '
                          f'integers in [0, {classes - 1}].')
    labels = np.asarray(labels)
    if labels.dtype.kind not in 'iu':
      raise ArtifactError(f'labels have dtype {labels.dtype}; pass integers in '
                          f'[0, {classes - 1}].')
    if labels.shape != (batch,):
      raise ArtifactError(f'labels have shape {labels.shape}; pass one per sample: '
                          f'({batch},).')
    if labels.size and not (0 <= labels.min() and labels.max() < classes):
      raise ArtifactError(f'labels must be in [0, {classes - 1}]; got values from '
                          f'{labels.min()} to {labels.max()}.')
    return [labels.astype(np.int32)]

  def _check_guidance(self, guidance, batch: int) -> list:
    if self.metadata['guidance_input'] is False:
      if guidance is not None:
        raise ArtifactError(f'this generator has no guidance input (its guidance '
                            f'{self.metadata["guidance"]:g} is fixed): drop guidance.')
      return []
    g = np.asarray(self.metadata['guidance'] if guidance is None else guidance)
    if g.dtype.kind not in 'fiu' or g.shape not in ((), (batch,)):
      raise ArtifactError(f'guidance has shape {g.shape} and dtype {g.dtype}; pass a '
                          f'number or {batch} numbers, one per sample.')
    return [np.broadcast_to(g.astype(np.float32), (batch,))]
