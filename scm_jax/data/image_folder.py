"""A directory tree of image files, decoded lazily example by example.

A record is (path, label); decoding (PIL) runs in grain's worker processes
when data.worker_count > 0.

With labels_from_subdirs=True the layout is ROOT/<class name>/**/<image>, and
classes are numbered by sorted subdirectory name (as torchvision's
ImageFolder does), so separate train/test folders with the same class
subdirectories get the same ids.
"""

import os
from typing import List, Optional, Tuple

import numpy as np
from PIL import Image

from scm_jax.data.base import (DataSource, Example, format_split_path,
                               resize_image, uint8_to_float)
from scm_jax.errors import ConfigError, DataError

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.webp')
_MODES = {1: 'L', 3: 'RGB'}


def list_images(root: str) -> List[str]:
  """All image files under `root` (recursive), sorted for determinism."""
  paths = []
  for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
    dirnames[:] = [d for d in dirnames if not d.startswith('.')]
    paths.extend(os.path.join(dirpath, f) for f in filenames
                 if f.lower().endswith(IMAGE_EXTENSIONS)
                 and not f.startswith('.'))
  return sorted(paths)


def _class_labels(root: str, paths: List[str]) -> Tuple[np.ndarray, int]:
  classes = sorted(d for d in os.listdir(root)
                   if os.path.isdir(os.path.join(root, d))
                   and not d.startswith('.'))
  class_ids = {name: i for i, name in enumerate(classes)}
  labels = []
  for path in paths:
    parts = os.path.relpath(path, root).split(os.sep)
    if len(parts) < 2:
      raise DataError(
          f'Image {path} is not inside a class subdirectory of {root}; with '
          f'labels_from_subdirs=True every image must be in ROOT/<class>/.')
    labels.append(class_ids[parts[0]])
  return np.asarray(labels, np.int32), len(classes)


class ImageFolderSource(DataSource):
  """Images under a directory; see the module docstring."""

  def __init__(self, root: str, *, labels_from_subdirs: bool = False,
               image_size: int = 0, channels: int = 3):
    if channels not in _MODES:
      raise ConfigError(f'data.channels must be 1 or 3, got {channels}.')
    if not os.path.isdir(root):
      raise DataError(f'Image folder {root} does not exist; set data.path to '
                      f'a directory of images.')
    self._paths = list_images(root)
    if not self._paths:
      raise DataError(f'Image folder {root} contains no images (looked for '
                      f'{", ".join(IMAGE_EXTENSIONS)}, recursively).')
    if labels_from_subdirs:
      self._labels, self.num_classes = _class_labels(root, self._paths)
    else:
      self._labels = np.zeros(len(self._paths), np.int32)
      self.num_classes = 0
    self._mode = _MODES[channels]
    self._image_size = image_size
    self.name = f'folder/{os.path.basename(os.path.normpath(root))}'
    if image_size:
      self.shape = (image_size, image_size, channels)
    else:
      # Native resolution: the first image fixes the shape for all.
      self.shape = self._load(self._paths[0]).shape

  def __len__(self) -> int:
    return len(self._paths)

  @property
  def paths(self) -> List[str]:
    return list(self._paths)

  def __getitem__(self, index: int) -> Tuple[str, np.int32]:
    return self._paths[index], self._labels[index]

  def decode(self, record: Tuple[str, np.int32]) -> Example:
    path, label = record
    return {'x': self._load(path, self.shape), 'label': label}

  def _load(self, path: str, shape: Optional[tuple] = None) -> np.ndarray:
    try:
      with Image.open(path) as img:
        mode = img.mode
        # PIL's convert() clips 16/32-bit and float pixels to 255: garbage, not data.
        pixels = None if mode.startswith(('I', 'F')) else np.asarray(img.convert(self._mode))
    except Exception as e:  # pylint: disable=broad-except
      raise DataError(f'Cannot read image {path} (corrupt or unsupported '
                      f'file): {e}. Remove or replace it.') from e
    if pixels is None:
      raise DataError(f'Image {path} has {mode} pixels (16/32-bit or float); only 8-bit '
                      'images are supported. Convert it to 8 bits per channel.')
    if pixels.ndim == 2:
      pixels = pixels[..., None]
    x = uint8_to_float(pixels)
    if self._image_size:
      return resize_image(x, self._image_size)
    if shape is not None and x.shape != shape:
      raise DataError(
          f'Image {path} has shape {x.shape} but the folder\'s images have '
          f'{shape}; set data.image_size to resize all images to one size.')
    return x


def from_config(config, split: str) -> ImageFolderSource:
  if not config.path:
    raise DataError("data.name='folder' needs data.path (a directory).")
  return ImageFolderSource(format_split_path(config.path, split),
                           labels_from_subdirs=config.labels_from_subdirs,
                           image_size=config.image_size,
                           channels=config.channels)
