"""SigLIP 2's NaFlex input on the host: an image resized, at its own aspect
ratio, to the largest patch grid within a budget, cut into patches and
padded to the budget (Tschannen et al. 2025; transformers'
Siglip2ImageProcessor, big_vision's ops_naflex).

The patches stay uint8, as square images do until the device standardizes
them; the grid says which of the budget's rows are the image's (the first
rows x columns, row by row), the rest being zero padding.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

# The binary search over the scale, as the reference processors run it.
_EPS = 1e-5


def grid_for_budget(height: int, width: int, patch_size: int,
                    max_patches: int) -> tuple[int, int]:
  """(rows, columns) of patches of the largest resize of a height x width
  image, at its aspect ratio, that fits max_patches: each side scaled by one
  factor and rounded up to whole patches (at least one), the factor found
  by transformers' get_image_size_for_max_num_patches' search (the same
  float64 arithmetic, so the same grid for every size)."""

  def patches(scale: float, size: int) -> int:
    return max(1, math.ceil(size * scale / patch_size))

  low, high = _EPS / 10, 100.0
  while high - low >= _EPS:
    middle = (low + high) / 2
    if patches(middle, height) * patches(middle, width) <= max_patches:
      low = middle
    else:
      high = middle
  return patches(low, height), patches(low, width)


def to_patches(image: np.ndarray, patch_size: int, max_patches: int):
  """uint8 image [H, W, C] -> (patches uint8 [max_patches, p p C], grid
  int32 [2]): resized to grid_for_budget's grid with PIL's antialiased
  bilinear filter (the reference processor's), patches row by row, each
  flattened (row, column, channel), then zero rows up to the budget."""
  rows, cols = grid_for_budget(image.shape[0], image.shape[1], patch_size, max_patches)
  size = (cols * patch_size, rows * patch_size)  # PIL's (width, height)
  resized = np.asarray(Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image)
                       .resize(size, Image.Resampling.BILINEAR))
  resized = resized.reshape(rows * patch_size, cols * patch_size, image.shape[-1])
  p, channels = patch_size, image.shape[-1]
  patches = resized.reshape(rows, p, cols, p, channels).transpose(0, 2, 1, 3, 4)
  out = np.zeros((max_patches, p * p * channels), np.uint8)
  out[:rows * cols] = patches.reshape(rows * cols, p * p * channels)
  return out, np.array([rows, cols], np.int32)
