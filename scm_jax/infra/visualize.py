"""Turning samples into pictures: image grids and 2-D scatter plots (uint8 arrays)."""

import math

import numpy as np


def to_uint8(images: np.ndarray) -> np.ndarray:
  """[-1, 1] floats -> uint8 [0, 255] (clipped)."""
  return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


GRID_GAP_VALUE = 128   # mid grey: visible between dark and light tiles alike
GRID_MIN_TILE = 64     # small images are upscaled to at least this many pixels


def image_grid(images: np.ndarray, cols: int = 0, gap: int = 2, upscale: int = 0) -> np.ndarray:
  """NHWC images in [-1, 1] -> one uint8 grid image (HxWxC) that reads at a glance.

  Tiles are separated (and framed) by a `gap`-pixel mid-grey border, so neighbouring
  samples with dark or light backgrounds stay apart. Small images (digits are 8x8) are
  upscaled by an integer factor with nearest-neighbour (pixel repetition, no smoothing)
  until a tile is at least GRID_MIN_TILE pixels; `upscale` > 0 sets the factor.
  """
  images = to_uint8(images)
  n, h, w, c = images.shape
  cols = cols or int(math.ceil(math.sqrt(n)))
  rows = int(math.ceil(n / cols))
  upscale = upscale or max(1, -(-GRID_MIN_TILE // max(h, w)))
  if upscale > 1:
    images = images.repeat(upscale, axis=1).repeat(upscale, axis=2)
    h, w = h * upscale, w * upscale
  grid = np.full((rows * (h + gap) + gap, cols * (w + gap) + gap, c), GRID_GAP_VALUE, np.uint8)
  for i in range(n):
    r, q = divmod(i, cols)
    y, x = gap + r * (h + gap), gap + q * (w + gap)
    grid[y:y + h, x:x + w] = images[i]
  return grid


def scatter_plot(points: np.ndarray, reference: np.ndarray = None, title: str = '',
                 lim: float = 0.0, size: int = 4) -> np.ndarray:
  """2-D points (and optional reference points in grey) -> uint8 RGB image via matplotlib."""
  points = np.asarray(points)
  fig = new_figure((size, size))
  ax = fig.add_subplot()
  if reference is not None:
    ax.scatter(reference[:, 0], reference[:, 1], s=1, c='0.75', label='data')
  ax.scatter(points[:, 0], points[:, 1], s=1, c='C0', label='samples')
  lim = lim or float(np.percentile(np.abs(np.concatenate(
      [points, reference]) if reference is not None else points), 99.5) * 1.2)
  ax.set_xlim(-lim, lim)
  ax.set_ylim(-lim, lim)
  ax.set_aspect('equal')
  if title:
    ax.set_title(title)
  return figure_to_image(fig)


def new_figure(figsize, dpi: int = 80):
  """A matplotlib Figure on its own Agg canvas: no pyplot, so a notebook's backend and
  open figures are left alone."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=figsize, dpi=dpi)
  FigureCanvasAgg(fig)
  return fig


def figure_to_image(fig) -> np.ndarray:
  """Renders a new_figure() Figure -> uint8 RGB array."""
  fig.tight_layout()
  fig.canvas.draw()
  return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def samples_to_image(samples: np.ndarray, reference: np.ndarray = None, title: str = '') -> np.ndarray:
  """A picture of a batch of samples: a grid for images, a scatter plot for 2-D points."""
  samples = np.asarray(samples)
  if samples.ndim == 4:
    return image_grid(samples)
  if samples.ndim == 2 and samples.shape[1] == 2:
    return scatter_plot(samples, reference, title)
  raise ValueError(f'cannot draw samples of shape {samples.shape}')


def loss_by_time(scalars: dict) -> tuple[np.ndarray, np.ndarray]:
  """(bucket centres t, mse) from logged `mse_by_t/<lo>-<hi>` scalars, sorted by t."""
  pts = []
  for k, v in scalars.items():
    if k.startswith('mse_by_t/'):
      lo, hi = (float(x) for x in k.split('/', 1)[1].split('-'))
      pts.append((0.5 * (lo + hi), float(v)))
  pts.sort()
  return np.array([p[0] for p in pts]), np.array([p[1] for p in pts])


def loss_by_time_plot(snapshots: list, title: str = 'training mse by time t',
                      size: int = 4) -> np.ndarray:
  """Loss-by-time curves, one per (step, scalars) snapshot (older ones lighter) -> uint8 RGB.

  Shows where in t in [0, pi/2] the model's error sits (e.g. a blow-up near t -> pi/2,
  where a large time-embedding scale hurts first).
  """
  from matplotlib import colormaps
  fig = new_figure((size * 1.4, size))
  ax = fig.add_subplot()
  n = len(snapshots)
  for i, (step, scalars) in enumerate(snapshots):
    t, mse = loss_by_time(scalars)
    if len(t):
      ax.plot(t, mse, marker='o', ms=3, color=colormaps['viridis'](0.15 + 0.8 * i / max(n - 1, 1)),
              label=f'step {step}')
  ax.set_xlim(0, math.pi / 2)
  ax.set_xlabel('t')
  ax.set_ylabel('mse')
  if any(len(loss_by_time(s)[1]) and np.all(loss_by_time(s)[1] > 0) for _, s in snapshots):
    ax.set_yscale('log')
  ax.set_title(title)
  if n:
    ax.legend(fontsize=7)
  return figure_to_image(fig)
