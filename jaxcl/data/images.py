"""Image files on the host: checking, decoding and resizing them with PIL,
and `ImageFolderSource`, a folder of images (one sub-folder per class, or
none) as a random-access source of {'image', 'label'} records.

The bottom layer of jaxcl.data: it imports no other module of the package.
"""

from __future__ import annotations

import concurrent.futures

import numpy as np
from etils import epath
from PIL import Image, UnidentifiedImageError

from jaxcl import errors

IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.webp')

DatasetError = errors.DatasetError

# An image whose shorter side is under image_size / MAX_UPSCALE would be
# mostly interpolation once resized: "wrongly sized", skipped like an
# unreadable one (a 1x1 tracking pixel, a thumbnail in a photo folder).
MAX_UPSCALE = 8
MAX_LISTED_CLASSES = 10  # empty class folders named in one error line


def class_folders(root) -> list[str]:
  """The sub-folders of image folder `root`, sorted: its classes, labels 0, 1, ..."""
  return sorted(p.name for p in epath.Path(root).iterdir() if p.is_dir())


def check_classes_have_images(root, classes: list[str]) -> None:
  """DatasetError naming the class folders of `root` with no image file: each
  would be a label without an example (an emptied class, a folder of notes),
  silently changing the label set a classifier chooses from."""
  root = epath.Path(root)
  empty = [name for name in classes if not any(_is_image(p) for p in (root / name).iterdir())]
  if empty:
    listed = ', '.join(empty[:MAX_LISTED_CLASSES]) + (
        f' and {len(empty) - MAX_LISTED_CLASSES} more' if len(empty) > MAX_LISTED_CLASSES else '')
    raise DatasetError(f'{len(empty)} class folder(s) of {root} hold no image '
                       f'({", ".join(IMAGE_SUFFIXES)}): {listed}; every class folder is a '
                       f'label, so remove them or add images')


def pil_error(e: Exception) -> str:
  """Why PIL could not read an image, in one line that names no Python
  object (PIL's own message for an unknown format quotes the file object)."""
  why = ('not an image format PIL knows' if isinstance(e, UnidentifiedImageError)
         else errors.first_line(e, ''))
  return f'{type(e).__name__}: {why}'.rstrip(': ')


def image_problem(path, image_size: int) -> str | None:
  """Why the image file at `path` is unusable at `image_size` (it does not
  open, does not decode in full, or is too small), or None if it is fine."""
  try:
    with epath.Path(path).open('rb') as f:
      pil = Image.open(f)
      if min(pil.size) < max(1, image_size // MAX_UPSCALE):
        return (f'wrongly sized: {pil.size[0]}x{pil.size[1]} px, under 1/{MAX_UPSCALE} of '
                f'image_size {image_size}')
      if image_size:  # JPEG: decode at a reduced scale, faster
        pil.draft('RGB', (image_size, image_size))
      pil.load()  # a truncated file fails here, not in the middle of training
  except Exception as e:  # PIL raises many kinds
    return f'unreadable: {pil_error(e)}'
  return None


class ImageFolderSource:
  """Images under `root` (one sub-folder per class, or none), decoded with PIL,
  cropped and resized to image_size (0: each at its own size).

  Every image is checked once, in parallel, when the source is opened:
  unreadable or wrongly sized ones (image_problem) are left out and listed
  in `skipped` as (path, reason). No usable image at all is a DatasetError.
  """

  def __init__(self, root: str, image_size: int, classes: list[str] | None = None):
    self._image_lib = Image
    root = epath.Path(root)
    if not root.is_dir():
      raise DatasetError(f'image folder {root} does not exist')
    self.classes = classes if classes is not None else class_folders(root)
    self.empty_classes = []  # class folders of this split with no image file
    entries = []
    if self.classes:
      for label, name in enumerate(self.classes):
        if (root / name).is_dir():  # a split may lack some of the train split's classes
          images = [(p, label) for p in sorted((root / name).iterdir()) if _is_image(p)]
          if not images:
            self.empty_classes.append(str(root / name))
          entries += images
    else:
      entries = [(p, -1) for p in sorted(root.iterdir()) if _is_image(p)]
    if not entries:
      raise DatasetError(f'no images ({", ".join(IMAGE_SUFFIXES)}) under {root}')
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
      problems = list(pool.map(lambda entry: image_problem(entry[0], image_size), entries))
    self.skipped = [(str(p), why) for (p, _), why in zip(entries, problems) if why]
    entries = [entry for entry, why in zip(entries, problems) if not why]
    if not entries:
      path, why = self.skipped[0]
      raise DatasetError(f'no usable image under {root}: all {len(self.skipped)} are unreadable '
                         f'or wrongly sized ({path}: {why})')
    self._entries, self._image_size = entries, image_size

  def __len__(self):
    return len(self._entries)

  def __getitem__(self, index):
    path, label = self._entries[index]
    try:
      with path.open('rb') as f:
        image = np.asarray(self._image_lib.open(f).convert('RGB'))
    except Exception as e:  # changed since it was checked
      raise DatasetError(f'image {path} no longer reads: {type(e).__name__}: {e}') from None
    if self._image_size:
      image = center_crop_resize(image, self._image_size)
    return {'image': image, 'label': np.int32(label)}


def _is_image(path) -> bool:
  return path.suffix.lower() in IMAGE_SUFFIXES


def center_crop_resize(image: np.ndarray, size: int) -> np.ndarray:
  """The central square of `image` resized to size x size (host side, PIL)."""
  h, w = image.shape[:2]
  side = min(h, w)
  top, left = (h - side) // 2, (w - side) // 2
  square = image[top:top + side, left:left + side]
  channels = square.shape[-1]
  pil = Image.fromarray(square[..., 0] if channels == 1 else square)
  out = np.asarray(pil.resize((size, size), Image.BILINEAR))
  return out.reshape(size, size, channels)
