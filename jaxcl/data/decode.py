"""Encoded samples -> training records, on the host (in grain's worker
processes for streams): the image decoded with PIL (at a reduced scale when
a JPEG is larger than the crop needs) and cropped and resized to the stored
resolution with OpenCV, the caption and label read and checked.

`SampleFormat` says which members hold what (webdataset's defaults: the
first of jpg/png/jpeg/webp, txt, cls) and how to crop: 'center' (the
central square, resized: what evaluation and the embedded datasets use),
'random' (a random-resized crop, as open_clip's training transform, before
the device's augmentation) or 'squash' (the whole image resized to a
square, as SigLIP's preprocessing does). `decode` returns (record, None) or (None, why).
At image_size 0 (NaFlex) the image keeps its size; with `naflex` (the patch
size and the run's largest budget), an image its grid would enlarge
MAX_UPSCALE times is refused (reject_small; jaxcl.data.naflex.size_problem)
and, for training (`naflex_draft`), a JPEG is decoded only as large as that
budget's grid needs.

Imports only jaxcl.data.images and naflex.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math

import cv2
import numpy as np
from PIL import Image, ImageOps

from jaxcl.data import naflex as naflex_lib
from jaxcl.data.images import MAX_UPSCALE, pil_error

WEBDATASET_IMAGE_KEYS = 'jpg;png;jpeg;webp'


@dataclasses.dataclass(frozen=True)
class SampleFormat:
  image_size: int
  image_keys: tuple[str, ...] = tuple(WEBDATASET_IMAGE_KEYS.split(';'))
  text_key: str | None = 'txt'  # None: images only (SimCLR)
  label_key: str = 'cls'  # optional: -1 when absent
  crop: str = 'center'
  crop_scale: tuple[float, float] = (0.9, 1.0)
  channels: int = 3  # 1: decoded as grayscale
  reject_small: bool = True  # skip images under image_size / MAX_UPSCALE (web data)
  # image_size 0: (patch size, largest budget) of a NaFlex run, else None.
  naflex: tuple[int, int] | None = None
  # Decode JPEGs at a reduced scale for that budget: training only, whose
  # budgets are at most it (evaluation may ask more: `jaxcl eval --max_patches`).
  naflex_draft: bool = False


def decode(sample: dict, fmt: SampleFormat, rng: np.random.Generator | None = None):
  """(record, None) for a usable sample, (None, reason) for a bad one.

  record: {'image': uint8 [S, S, 3], 'label': int32 (-1 when absent),
  'caption': str (when fmt.text_key)}. rng draws the random crop.
  """
  image_key = next((k for k in fmt.image_keys if k in sample), None)
  if image_key is None:
    return None, f'no image ({", ".join(fmt.image_keys)})'
  record = {}
  if fmt.text_key:
    if fmt.text_key not in sample:
      return None, f'no caption ({fmt.text_key})'
    try:
      caption = sample[fmt.text_key].decode('utf-8').strip()
    except UnicodeDecodeError:
      return None, f'caption ({fmt.text_key}) is not UTF-8'
    if not caption:
      return None, f'empty caption ({fmt.text_key})'
    record['caption'] = caption
  label = -1
  if fmt.label_key in sample:
    try:
      label = int(sample[fmt.label_key].decode('ascii').strip())
    except (UnicodeDecodeError, ValueError):
      return None, f'label ({fmt.label_key}) is not an integer'
  record['label'] = np.int32(label)
  image, problem = decode_image(sample[image_key], fmt, rng)
  if problem:
    return None, f'{problem} ({image_key})'
  record['image'] = image
  return record, None


def decode_image(data: bytes, fmt: SampleFormat, rng=None):
  """(uint8 [S, S, C], None) or (None, why the bytes are not a usable image).
  fmt.image_size 0: the image as it is, [H, W, C]."""
  size = fmt.image_size
  mode = 'L' if fmt.channels == 1 else 'RGB'
  try:
    pil = Image.open(io.BytesIO(data))
    if size and fmt.reject_small and min(pil.size) < max(1, size // MAX_UPSCALE):
      return None, (f'wrongly sized image: {pil.size[0]}x{pil.size[1]} px, under '
                    f'1/{MAX_UPSCALE} of image_size {size}')
    if size:  # JPEG: decode at a reduced scale, still as large as the smallest crop needs
      least = (size if fmt.crop in ('center', 'squash')
               else math.ceil(size / math.sqrt(fmt.crop_scale[0])))
      pil.draft(mode, (least, least))
    elif fmt.naflex:  # the same at the largest budget's grid (its sides in pil.size's order)
      width, height = pil.size
      patch_size, budget = fmt.naflex
      problem = naflex_lib.size_problem(height, width, patch_size, budget)
      if problem and fmt.reject_small:
        return None, problem
      if fmt.naflex_draft:
        rows, cols = naflex_lib.grid_for_budget(height, width, patch_size, budget)
        pil.draft(mode, (cols * patch_size, rows * patch_size))
    if pil.getexif().get(_EXIF_ORIENTATION, 1) != 1:  # a rotated photo (else: no copy)
      pil = ImageOps.exif_transpose(pil)
    if pil.mode != mode:
      pil = pil.convert(mode)
    pixels = np.asarray(pil)  # decodes: a truncated file fails here
  except Exception as e:  # PIL raises many kinds
    return None, f'undecodable image: {pil_error(e)}'
  pixels = pixels.reshape(*pixels.shape[:2], fmt.channels)
  if not size:
    return pixels, None
  height, width = pixels.shape[:2]
  if fmt.crop == 'random':
    box = random_crop_box(width, height, fmt.crop_scale, rng or np.random.default_rng())
  elif fmt.crop == 'squash':  # the whole image, its aspect ratio not kept (SigLIP's resize)
    box = (0, 0, width, height)
  else:
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    box = (left, top, left + side, top + side)
  return crop_resize(pixels, box, size), None


def evaluation_crop(crop: str) -> str:
  """The crop of evaluation images for a training crop: the same where it is
  deterministic, the central square where it is random."""
  return 'squash' if crop == 'squash' else 'center'


def crop_resize(pixels: np.ndarray, box, size: int) -> np.ndarray:
  """pixels [H, W, C] inside box (left, top, right, bottom) resized to
  [size, size, C] with OpenCV: bilinear (as big_vision's TF resize, and 6x
  faster than Pillow's), area averaging when shrinking by more than 1.5."""
  _opencv_single_threaded()
  left, top, right, bottom = box
  crop = pixels[top:bottom, left:right]
  if crop.shape[:2] == (size, size):
    return np.ascontiguousarray(crop)
  shrink = max(crop.shape[:2]) / size
  interpolation = cv2.INTER_AREA if shrink > 1.5 else cv2.INTER_LINEAR
  return cv2.resize(crop, (size, size), interpolation=interpolation).reshape(size, size, -1)


_EXIF_ORIENTATION = 0x0112


@functools.lru_cache(maxsize=1)
def _opencv_single_threaded() -> None:
  cv2.setNumThreads(1)  # one image per call: the parallelism is grain's worker processes


def random_crop_box(width: int, height: int, scale, rng, ratio=(3 / 4, 4 / 3), tries: int = 10):
  """torchvision's RandomResizedCrop box: an area fraction in `scale` and a
  log-uniform aspect ratio, 10 tries, else the central crop of the nearest
  allowed ratio."""
  area = width * height
  # One draw of every try's numbers: a numpy call per number costs more than the crop.
  fractions, log_aspects, corners = rng.random((3, tries, 2))
  for (fraction, _), (log_aspect, _), (x, y) in zip(fractions, log_aspects, corners):
    target = area * (scale[0] + (scale[1] - scale[0]) * fraction)
    low, high = math.log(ratio[0]), math.log(ratio[1])
    aspect = math.exp(low + (high - low) * log_aspect)
    w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
    if 0 < w <= width and 0 < h <= height:
      left, top = int(x * (width - w + 1)), int(y * (height - h + 1))
      return (left, top, left + w, top + h)
  aspect = width / height
  if aspect < ratio[0]:
    w, h = width, round(width / ratio[0])
  elif aspect > ratio[1]:
    w, h = round(height * ratio[1]), height
  else:
    w, h = width, height
  left, top = (width - w) // 2, (height - h) // 2
  return (left, top, left + w, top + h)
