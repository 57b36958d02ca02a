"""Datasets stored as numpy arrays in a `.npz` or `.npy` file.

Accepted layouts (N examples):
  * [N, D]        vectors (e.g. 2-D points), any finite values.
  * [N, H, W]     grayscale images; a channel axis is appended.
  * [N, H, W, C]  NHWC images. Channels-first arrays ([N, 1|3, H, W]) are
                  rejected with a hint to transpose rather than guessed at,
                  because a silent wrong guess would train on garbage.
Image pixels must be uint8 (mapped to [-1, 1]) or float already in [-1, 1].
Integer arrays of another dtype are accepted when all values lie in 0..255.
Files are loaded with allow_pickle=False; `.npy` files are memory-mapped, so
large datasets are not read into memory up front, and a memory-mapped source
pickles by path (grain workers re-open the file instead of copying it).
"""

import functools
import os
from typing import Optional, Tuple

import numpy as np

from scm_jax.data.base import ArraySource, format_split_path
from scm_jax.errors import DataError

X_KEYS = ('x', 'images', 'image', 'latents')
LABEL_KEYS = ('label', 'labels')
RANGE_TOLERANCE = 1e-3
_CHUNK = 4096  # Rows per validation pass, to bound memory on huge arrays.


def _load_file(path: str) -> Tuple[np.ndarray, Optional[np.ndarray]]:
  """Reads (x, labels or None) from `path` without unpickling anything."""
  if not os.path.isfile(path):
    raise DataError(f'Array file {path} does not exist; set data.path to an '
                    f'existing .npz or .npy file.')
  ext = os.path.splitext(path)[1].lower()
  if ext not in ('.npz', '.npy'):
    raise DataError(f'Array file {path} must end in .npz or .npy.')
  try:
    if ext == '.npy':
      # Labels of a memory-mapped .npy (e.g. large latent sets) live beside it.
      labels_path = path[:-4] + '.labels.npy'
      labels = (np.load(labels_path, allow_pickle=False)
                if os.path.isfile(labels_path) else None)
      return np.load(path, mmap_mode='r', allow_pickle=False), labels
    with np.load(path, allow_pickle=False) as npz:
      x_key = next((k for k in X_KEYS if k in npz.files), None)
      if x_key is None:
        raise DataError(f'Array file {path} has no data array: expected one '
                        f'of the keys {list(X_KEYS)}, found {npz.files}.')
      label_key = next((k for k in LABEL_KEYS if k in npz.files), None)
      return npz[x_key], (npz[label_key] if label_key else None)
  except DataError:
    raise
  except ValueError as e:
    # np.load reports object arrays as "... allow_pickle=False" (or, when
    # memory-mapping, as "Python objects in dtype").
    if 'pickle' in str(e) or 'Python objects' in str(e):
      raise DataError(
          f'Array file {path} holds an object (pickled) array, which is not '
          f'loaded for safety; save plain numeric arrays instead.') from e
    raise DataError(f'Cannot read array file {path}: {e}') from e
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f'Cannot read array file {path} (corrupt or not a numpy '
                    f'file): {e}') from e


def _check_layout(x: np.ndarray, path: str) -> np.ndarray:
  """Validates the rank/layout; returns x with a channel axis if needed."""
  if x.ndim not in (2, 3, 4):
    raise DataError(f'Array file {path}: data has shape {x.shape}; expected '
                    f'[N, D] vectors, [N, H, W] or [N, H, W, C] images.')
  if len(x) == 0:
    raise DataError(f'Array file {path} contains no examples.')
  if x.ndim == 3:
    return x[..., None]
  if x.ndim == 4 and x.shape[1] in (1, 3) and x.shape[3] > 4:
    raise DataError(
        f'Array file {path}: data of shape {x.shape} looks channels-first '
        f'(NCHW); convert it to NHWC, e.g. np.transpose(x, (0, 2, 3, 1)).')
  return x


def _check_values(x: np.ndarray, path: str, latents: bool = False) -> np.ndarray:
  """Validates dtype and values; returns uint8 or float32 data. With `latents`,
  float 'images' are VAE latents and may take any finite value."""
  if x.dtype == np.uint8:
    return x
  if x.dtype == np.bool_ or not (np.issubdtype(x.dtype, np.integer) or
                                 np.issubdtype(x.dtype, np.floating)):
    raise DataError(f'Array file {path}: data has dtype {x.dtype}; expected '
                    f'uint8 or float.')
  is_image = x.ndim == 4 and not latents
  lo, hi = np.inf, -np.inf
  for start in range(0, len(x), _CHUNK):
    chunk = np.asarray(x[start:start + _CHUNK])
    # Checked as float32, the dtype training sees: float64 values beyond float32's
    # range would become Inf there.
    with np.errstate(over='ignore'):  # the overflow is what this looks for
      as_float32 = chunk.astype(np.float32)
    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(as_float32).all():
      if np.isfinite(chunk).all():
        raise DataError(f'Array file {path} holds values beyond float32 range '
                        f'(|x| > {np.finfo(np.float32).max:.3g}); rescale the data.')
      raise DataError(f'Array file {path} contains NaN or Inf values.')
    lo, hi = min(lo, chunk.min()), max(hi, chunk.max())
  if np.issubdtype(x.dtype, np.integer):
    if lo < 0 or hi > 255:
      raise DataError(f'Array file {path}: integer data spans [{lo}, {hi}]; '
                      f'expected pixel values 0..255 (uint8).')
    return x.astype(np.uint8)
  if is_image and (lo < -1 - RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE):
    raise DataError(
        f'Array file {path}: float images span [{lo:.4g}, {hi:.4g}] but must '
        f'lie in [-1, 1]; rescale them (e.g. x / 127.5 - 1 for 0..255 '
        f'values) or store uint8.')
  if is_image:
    return np.clip(x, -1.0, 1.0).astype(np.float32)
  return np.asarray(x, np.float32)


def _check_labels(labels: np.ndarray, n: int, path: str) -> np.ndarray:
  if labels.ndim != 1 or len(labels) != n:
    raise DataError(f'Array file {path}: labels have shape {labels.shape} but '
                    f'there are {n} examples; expected shape ({n},).')
  if not np.issubdtype(labels.dtype, np.integer):
    raise DataError(f'Array file {path}: labels have dtype {labels.dtype}; '
                    f'store them as integers.')
  if labels.min() < 0:
    raise DataError(f'Array file {path}: labels must be non-negative.')
  if labels.max() > np.iinfo(np.int32).max:  # would wrap when cast to int32
    raise DataError(f'Array file {path}: labels reach {labels.max()}, beyond int32; '
                    'labels are class indices 0..num_classes-1.')
  return labels.astype(np.int32)


def _mapped_view(x: np.ndarray, path: str) -> np.ndarray:
  """The array a source keeps of a memory-mapped .npy, without copying it."""
  x = _check_layout(x, path)
  return x if x.dtype == np.uint8 else np.asarray(x, np.float32)


def _reopen_npy(path: str, shape: Tuple[int, ...], dtype: str) -> np.ndarray:
  """Re-opens a validated .npy memory map (in a grain worker process)."""
  x = _mapped_view(np.load(path, mmap_mode='r', allow_pickle=False), path)
  if x.shape != shape or x.dtype != np.dtype(dtype):
    raise DataError(f'Array file {path} changed while in use (now {x.dtype} '
                    f'{x.shape}, was {dtype} {shape}); restart the run.')
  return x


def load_array_source(path: str, *, image_size: int = 0,
                      expected_shape: Tuple[int, ...] = (),
                      latents: bool = False) -> ArraySource:
  """Loads and validates an array file; see the module docstring.

  Args:
    path: .npz (data under 'x'/'images'/'image', optional 'label'/'labels')
      or .npy (data only).
    image_size: if > 0, center-crop and resize images to this size.
    expected_shape: if non-empty, the per-example shape (after resizing) the
      config expects; a mismatch is a DataError.
    latents: the arrays are VAE latents (float, any range; see encode_latents).
  """
  x, labels = _load_file(path)
  if latents and x.dtype == np.uint8:
    raise DataError(f'Array file {path} holds uint8 images but data.latents=True; '
                    'encode them with `python -m scm_jax.encode_latents` first.')
  mapped = x if isinstance(x, np.memmap) else None
  x = _check_values(_check_layout(x, path), path, latents)
  reopen = None
  if mapped is not None and np.may_share_memory(x, mapped):
    # Still the file's pages (uint8 or float32 data): pickle by path.
    x = _mapped_view(mapped, path)
    reopen = functools.partial(_reopen_npy, os.path.abspath(path), x.shape,
                               x.dtype.str)
  if labels is not None:
    labels = _check_labels(labels, len(x), path)
  num_classes = int(labels.max()) + 1 if labels is not None else 0
  source = ArraySource(x, labels, num_classes=num_classes,
                       name=f'array/{os.path.basename(path)}',
                       image_size=image_size if x.ndim == 4 else 0,
                       reopen=reopen)
  if expected_shape and tuple(expected_shape) != source.shape:
    raise DataError(f'Array file {path} has examples of shape {source.shape} '
                    f'but the config expects {tuple(expected_shape)}.')
  return source


def from_config(config, split: str) -> ArraySource:
  if not config.path:
    raise DataError("data.name='array' needs data.path (a .npz or .npy file).")
  return load_array_source(format_split_path(config.path, split),
                           image_size=config.image_size,
                           expected_shape=tuple(config.expected_shape),
                           latents=bool(config.get('latents', False)))
