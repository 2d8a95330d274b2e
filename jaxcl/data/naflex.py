"""SigLIP 2's NaFlex input on the host: an image resized, at its own aspect
ratio, to the largest patch grid within a budget, cut into patches and
padded to the budget (Tschannen et al. 2025; transformers'
Siglip2ImageProcessor, big_vision's ops_naflex).

The patches stay uint8, as square images do until the device standardizes
them; the grid says which of the budget's rows are the image's (the first
rows x columns, row by row), the rest being zero padding. A batch's images
are then {'patches': uint8 [b, N, p p C], 'grid': int32 [b, 2]}: where a
square run has an image array, a NaFlex run has this dict.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image

from jaxcl import errors
from jaxcl.data.images import MAX_UPSCALE

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


def size_problem(height: int, width: int, patch_size: int, max_patches: int) -> str | None:
  """Why a height x width image is unusable as NaFlex patches at a budget of
  max_patches, or None: a side enlarged MAX_UPSCALE times or more to fill
  its whole patches (a 1-pixel-wide strip; a thumbnail at a large budget),
  the rule of the square resize (a shorter side under 1/MAX_UPSCALE of the
  image size) for grids. Checked at the run's largest budget, which
  enlarges most, so an image is used at every budget or at none."""
  rows, cols = grid_for_budget(height, width, patch_size, max_patches)
  if max(rows * patch_size / height, cols * patch_size / width) < MAX_UPSCALE:
    return None
  return (f'wrongly sized image: {width}x{height} px, enlarged {MAX_UPSCALE} times or more to '
          f'its {rows}x{cols} grid of {patch_size}-px patches ({max_patches} patches)')


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


@dataclasses.dataclass(frozen=True)
class Patching:
  """How a NaFlex run's images become patches: the model's patch size and
  the patch budgets (`dataset.max_patches`), one drawn for each global
  training batch, as SigLIP 2 trains several sequence lengths; evaluation
  uses the largest."""
  patch_size: int
  budgets: tuple[int, ...]

  @property
  def eval_budget(self) -> int:
    return max(self.budgets)

  def batch_budget(self, seed: int, batch: int) -> int:
    """The budget of global training batch `batch`: the same in every process
    and after a resume."""
    if len(self.budgets) == 1:
      return self.budgets[0]
    return self.budgets[int(np.random.default_rng([seed, batch]).integers(len(self.budgets)))]

  def patched(self, record: dict, budget: int) -> dict:
    """The record with its image [H, W, C] as {'patches', 'grid'} at `budget`."""
    patches, grid = to_patches(record['image'], self.patch_size, budget)
    return {**record, 'image': {'patches': patches, 'grid': grid}}


def patching(dataset_config, patch_size: int) -> Patching | None:
  """The Patching of a `dataset` group with resolution 'naflex', else None."""
  if dataset_config.get('resolution', 'square') != 'naflex':
    return None
  return Patching(patch_size, budgets(dataset_config.max_patches))


def parse_budgets(text: str) -> list[int]:
  """`jaxcl eval --max_patches A,B` as positive integers; ConfigError otherwise."""
  parts = [part.strip() for part in text.split(',') if part.strip()]
  errors.check(bool(parts) and all(part.isdigit() and int(part) > 0 for part in parts),
               f'--max_patches takes comma-separated positive integers, got {text!r}')
  return [int(part) for part in parts]


def budgets(max_patches) -> tuple[int, ...]:
  """`dataset.max_patches` (one budget or several) as a tuple."""
  return tuple(max_patches) if isinstance(max_patches, (tuple, list)) else (max_patches,)


class PatchedSource:
  """A random-access source of native-size images whose records come out as
  NaFlex patches at one budget (by default evaluation's); `records` is the
  source itself."""

  def __init__(self, records, patching_: Patching, budget: int = 0):
    self.records, self.patching = records, patching_
    self.budget = budget or patching_.eval_budget
    self.workers = getattr(records, 'workers', 0)

  def at(self, budget: int) -> PatchedSource:
    """The same records at another budget."""
    return PatchedSource(self.records, self.patching, budget)

  def __len__(self):
    return len(self.records)

  def __getitem__(self, index):
    return self.patching.patched(self.records[index], self.budget)


def batch_shapes(n: int, budget: int, patch_size: int, channels: int) -> dict:
  """(shape, dtype) of a batch of n images as NaFlex patches."""
  return {'patches': ((n, budget, patch_size * patch_size * channels), np.uint8),
          'grid': ((n, 2), np.int32)}

