"""Sample grids: a visible gap between tiles, nearest-neighbour upscaling of small images."""

import numpy as np

from scm_jax.infra import visualize


def test_grid_tiles_are_nearest_neighbour_copies_separated_by_a_grey_gap():
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (5, 8, 8, 1)).astype(np.float32)
  images[0] = -1.0  # a black tile next to the gap: the gap must still show
  grid = visualize.image_grid(images, cols=3)
  up, gap, tile = 8, 2, 64  # 8x8 digits become 64x64 tiles
  assert grid.shape == (2 * (tile + gap) + gap, 3 * (tile + gap) + gap, 1)
  src = visualize.to_uint8(images)
  for i in range(5):
    r, q = divmod(i, 3)
    y, x = gap + r * (tile + gap), gap + q * (tile + gap)
    block = grid[y:y + tile, x:x + tile, 0]
    # every upscaled pixel is one source pixel repeated up x up times (no smoothing)
    np.testing.assert_array_equal(block, np.kron(src[i, :, :, 0], np.ones((up, up), np.uint8)))
  # the gap rows/columns around and between tiles, and the empty sixth cell, are grey
  grey = visualize.GRID_GAP_VALUE
  assert np.all(grid[:gap] == grey) and np.all(grid[:, :gap] == grey)
  assert np.all(grid[gap + tile:2 * gap + tile] == grey)
  assert np.all(grid[:, gap + tile:2 * gap + tile] == grey)
  assert np.all(grid[2 * gap + tile:, 3 * gap + 2 * tile:] == grey)
  assert grey not in (0, 255)


def test_large_images_are_not_upscaled_and_rgb_is_kept():
  images = np.zeros((4, 64, 64, 3), np.float32)
  grid = visualize.image_grid(images)
  assert grid.shape == (2 * 66 + 2, 2 * 66 + 2, 3)
  assert visualize.image_grid(images[:, :20, :20], upscale=1).shape == (2 * 22 + 2, 2 * 22 + 2, 3)
  assert visualize.image_grid(images[:, :20, :20]).shape[0] == 2 * (80 + 2) + 2  # x4 -> 80
