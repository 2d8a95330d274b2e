"""Users' own (image path, caption) pairs as a prepared TFDS dataset.

A pairs file (JSON lines, CSV or TSV; its format, the checks of its rows and
the train/test split rule are jaxcl.data.pair_rows') lists one pair per row.
Rows naming the same image become one example with several captions.

`prepare_pairs` converts the file once, with the `ImageTextPairs` builder,
into array_record files with the same features as jaxcl.data.shapes:

    'image': uint8 [S, S, 3] (PIL decode, RGB, central square resized to S),
    'captions': object array of UTF-8 bytes, one or more per image,

or, at image size 0 (NaFlex runs, which keep each image's aspect ratio),
'image' as the file's own bytes, decoded when read; an image is then
checked at the run's patch size and largest budget (a 1-pixel-wide strip
is a bad row: jaxcl.data.naflex.size_problem).

read like any TFDS dataset with ``builder.as_data_source(split)``. Bad rows
(unparseable, missing key, empty caption, missing or unreadable image) never
stop a conversion: they are skipped, counted, and listed with their line
numbers in the log and in ``bad_rows.json`` beside the prepared files.

Splits: 'train', plus 'test' when test_fraction > 0 (see
jaxcl.data.pair_rows.in_test_split: all captions of one image stay in one
split).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Callable
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image, ImageOps

from jaxcl.data import catalog, decode
from jaxcl.data.images import MAX_UPSCALE, center_crop_resize, pil_error
from jaxcl.data.pair_rows import absolute_path, in_test_split, read_pairs

BAD_ROWS_FILE = 'bad_rows.json'
MAX_LOGGED_BAD_ROWS = 20


# ------------------------------------------------------------- the builder ---
def _content_hash(path: str) -> str | None:
  """sha1 of the file's bytes (None if it cannot be read: reported later)."""
  digest = hashlib.sha1()
  try:
    with epath.Path(path).open('rb') as f:
      for chunk in iter(lambda: f.read(1 << 20), b''):
        digest.update(chunk)
  except OSError:
    return None
  return digest.hexdigest()


@dataclasses.dataclass(eq=False)
class ImageTextPairsConfig(tfds.core.BuilderConfig):
  """One pairs file converted at one image size.

  Build with `ImageTextPairsConfig.create`, which derives `name` from all the
  other fields: a different file, size, key or test fraction is a separate
  prepared dataset.
  """

  path: str = ''
  image_size: int = 0  # 0: each image's own bytes (NaFlex), checked at the two below
  image_key: str = 'image'
  caption_key: str = 'caption'
  test_fraction: float = 0.0
  patch_size: int = 0
  max_patches: int = 0

  @classmethod
  def create(cls, path, *, image_size: int, image_key: str = 'image',
             caption_key: str = 'caption', test_fraction: float = 0.0,
             patch_size: int = 0, max_patches: int = 0):
    path = absolute_path(path)
    if image_size < 0 or (image_size == 0) != (patch_size > 0 and max_patches > 0):
      raise ValueError(f'image_size must be positive, or 0 with a patch size and budget; got '
                       f'{image_size} ({patch_size}-px patches, budget {max_patches})')
    if not 0.0 <= test_fraction < 1.0:
      raise ValueError(f'test_fraction must be in [0, 1), got {test_fraction}')
    # The file's contents are part of the identity: a pairs file edited in
    # place is converted anew, one merely touched or copied is not.
    native = [patch_size, max_patches] if not image_size else []
    identity = json.dumps([path, image_size, image_key, caption_key, test_fraction,
                           _content_hash(path), *native])
    digest = hashlib.sha1(identity.encode('utf-8')).hexdigest()[:8]
    stem = re.sub(r'[^a-z0-9]+', '_', epath.Path(path).stem.lower())
    stem = stem.strip('_')[:40] or 'pairs'
    size = (f'{image_size}x{image_size}' if image_size else
            f'its own size ({max_patches} patches of {patch_size} px at most)')
    return cls(name=f'{stem}_{digest}', description=f'{path} at {size}',
               path=path, image_size=image_size, image_key=image_key,
               caption_key=caption_key, test_fraction=test_fraction,
               patch_size=patch_size, max_patches=max_patches)


class ImageTextPairs(tfds.core.GeneratorBasedBuilder):
  """Images and captions listed in a JSONL/CSV/TSV file (see the module docstring).

  After preparing, `bad_rows` holds the (line_number, reason) of every row
  skipped, sorted by line, and `num_pairs` / `num_images` what was converted.
  """

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES: ClassVar[dict[str, str]] = {
      '1.0.0': 'image uint8 [S, S, 3] (at size 0: the file\'s bytes) + captions; train and '
               'optional test.'}

  def __init__(self, *, config: ImageTextPairsConfig | None = None, **kwargs):
    if not isinstance(config, ImageTextPairsConfig):
      raise TypeError('ImageTextPairs needs an ImageTextPairsConfig (see prepare_pairs)')
    super().__init__(config=config, **kwargs)
    self.bad_rows: list[tuple[int, str]] = []
    self.num_pairs = 0
    self.num_images = 0

  def _info(self):
    size = self.builder_config.image_size
    # Native: the file's bytes (Tensor features need no TensorFlow to encode).
    image = (tfds.features.Tensor(shape=(size, size, 3), dtype=np.uint8) if size
             else tfds.features.Tensor(shape=(), dtype=np.object_))
    return tfds.core.DatasetInfo(
        builder=self,
        description=f'Image-caption pairs from {self.builder_config.path}.',
        features=tfds.features.FeaturesDict({
            'image': image,
            # Encodes and decodes without TensorFlow; decodes to an object
            # array of UTF-8 bytes.
            'captions': tfds.features.Tensor(shape=(None,), dtype=np.object_),
        }),
        # File order, so that example i is easy to find in the pairs file.
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # the images are local files
    cfg = self.builder_config
    rows, bad_rows = read_pairs(cfg.path, image_key=cfg.image_key, caption_key=cfg.caption_key)
    self.bad_rows, self.num_pairs, self.num_images = list(bad_rows), 0, 0
    if not rows:
      raise ValueError(f'no valid rows in {cfg.path}: {_summary(bad_rows)}')
    # image -> [(line, caption), ...], images in order of first appearance.
    groups: dict[str, list[tuple[int, str]]] = {}
    for line, image, caption in rows:
      groups.setdefault(image, []).append((line, caption))
    folder = str(epath.Path(cfg.path).parent)
    splits = {'train': []}
    if cfg.test_fraction > 0:
      splits['test'] = []
    for image, captions in groups.items():
      # Missing files and non-images are found here, before splitting, so a
      # split is only created when it has an image that opens (TFDS fails on
      # an empty split). Only the header is read; decoding comes later.
      problem = _probe(image)
      if problem:
        self._skip(captions, problem)
        continue
      test = cfg.test_fraction > 0 and in_test_split(image, folder, cfg.test_fraction)
      splits['test' if test else 'train'].append((image, captions))
    if not any(splits.values()):
      raise ValueError(f'no valid rows in {cfg.path}: {_summary(sorted(self.bad_rows))}')
    # TFDS cannot write an empty split; a tiny file may put no image in test.
    return {name: self._generate_examples(items) for name, items in splits.items() if items}

  def _generate_examples(self, items):
    size = self.builder_config.image_size
    for key, (path, captions) in enumerate(items):
      if not size:
        image, problem = self._native(path)
        if problem:
          self._skip(captions, problem)
          continue
        self.num_pairs += len(captions)
        self.num_images += 1
        yield key, {'image': image, 'captions': [caption for _, caption in captions]}
        continue
      try:
        with epath.Path(path).open('rb') as f:
          pil = Image.open(f)
          if min(pil.size) < max(1, size // MAX_UPSCALE):
            self._skip(captions, f'wrongly sized image: {path} ({pil.size[0]}x{pil.size[1]} '
                                 f'px, under 1/{MAX_UPSCALE} of image_size {size})')
            continue
          pil.draft('RGB', (2 * size, 2 * size))  # JPEG: decode at a reduced scale, much faster
          pil = ImageOps.exif_transpose(pil).convert('RGB')
      except Exception as e:
        # A truncated or corrupt file passes _probe and fails here.
        self._skip(captions, _image_problem(path, e))
        continue
      image = center_crop_resize(np.asarray(pil), size)
      self.num_pairs += len(captions)
      self.num_images += 1
      yield key, {'image': image, 'captions': [caption for _, caption in captions]}
    self.bad_rows.sort()

  def _native(self, path):
    """(the file's bytes, None), or (None, why) for an image that does not
    decode or is wrongly sized for NaFlex, found as the training read would."""
    cfg = self.builder_config
    try:
      data = epath.Path(path).read_bytes()
    except Exception as e:
      return None, _image_problem(path, e)
    fmt = decode.SampleFormat(image_size=0, naflex=(cfg.patch_size, cfg.max_patches))
    _, problem = decode.decode_image(data, fmt)
    return (None, f'{problem} ({path})') if problem else (data, None)

  def _skip(self, captions, reason):
    self.bad_rows.extend((line, reason) for line, _ in captions)


def _probe(path: str) -> str | None:
  """Why the image at `path` cannot be opened, or None; reads only its header."""
  try:
    with epath.Path(path).open('rb') as f:
      Image.open(f)
  except Exception as e:
    return _image_problem(path, e)
  return None


def _image_problem(path: str, error: Exception) -> str:
  """A bad row's reason for an image that failed to open or decode."""
  if isinstance(error, FileNotFoundError):
    return f'image not found: {path}'
  if isinstance(error, IsADirectoryError):
    return f'image is a folder: {path}'
  # PIL raises many kinds (OSError for truncated data, SyntaxError,
  # DecompressionBombError, ...); none may stop the conversion.
  return f'unreadable image: {path} ({pil_error(error)})'


# ----------------------------------------------------------------- preparing ---
_ANNOUNCED = set()  # prepared datasets this process has reported


def prepare_pairs(path, *, image_size: int, data_dir: str | None = None,
                  image_key: str = 'image', caption_key: str = 'caption',
                  test_fraction: float = 0.0, patch_size: int = 0, max_patches: int = 0,
                  log: Callable[[str], None] = print):
  """The prepared ImageTextPairs builder for the pairs file `path` (at
  image_size, or at 0 the images' own bytes for NaFlex patches of
  patch_size within max_patches).

  Converts the file on the first call for these arguments, logging one line
  with the counts and then up to MAX_LOGGED_BAD_ROWS bad rows; the full list
  goes to bad_rows.json in the prepared dataset's folder (builder.data_dir).
  Later calls reuse the prepared files and log one line. Raises ValueError
  if the file is missing or unreadable or has no valid row.
  """
  config = ImageTextPairsConfig.create(path, image_size=image_size, image_key=image_key,
                                       caption_key=caption_key, test_fraction=test_fraction,
                                       patch_size=patch_size, max_patches=max_patches)
  with catalog.quiet_absl():  # TFDS warns that the config is not one of BUILDER_CONFIGS
    builder = ImageTextPairs(config=config, data_dir=data_dir, file_format='array_record')
  bad_rows_path = epath.Path(builder.data_dir) / BAD_ROWS_FILE
  if catalog.is_prepared(builder):
    # bad_rows.json is missing only if the builder was prepared some other
    # way (or the process died right after preparing): counts from TFDS then.
    saved = json.loads(bad_rows_path.read_text()) if bad_rows_path.exists() else {}
    builder.bad_rows = [tuple(row) for row in saved.get('bad_rows', [])]
    builder.num_images = sum(split.num_examples for split in builder.info.splits.values())
    builder.num_pairs = saved.get('num_pairs', 0)
    counts = (f'{builder.num_pairs} pairs, {builder.num_images} images, '
              f'{len(builder.bad_rows)} bad rows skipped' if saved
              else f'{builder.num_images} images')
    if builder.data_dir not in _ANNOUNCED:  # once, though every split opens the dataset
      _ANNOUNCED.add(builder.data_dir)
      log(f'jaxcl: {config.path} already prepared in {builder.data_dir} ({counts}); '
          f'nothing converted')
    return builder

  try:
    with catalog.quiet_tfds():
      builder.download_and_prepare()
  except Exception as e:
    if 'No examples were yielded' not in str(e):
      raise
    # Every image of a split passed _probe but failed to decode.
    bad_rows = sorted(builder.bad_rows)
    if builder.num_images == 0:
      raise ValueError(f'no valid rows in {config.path}: {_summary(bad_rows)}') from None
    raise ValueError(f'a split of {config.path} has no image that decodes: '
                     f'{_summary(bad_rows)}') from None
  builder.bad_rows.sort()
  bad_rows_path.write_text(json.dumps({
      'path': config.path, 'num_pairs': builder.num_pairs, 'num_images': builder.num_images,
      'bad_rows': builder.bad_rows}, indent=1))
  splits = ', '.join(f'{name} {info.num_examples}' for name, info in builder.info.splits.items())
  log(f'jaxcl: converted {builder.num_pairs} pairs ({builder.num_images} images; {splits}) '
      f'from {config.path} into {builder.data_dir}; {len(builder.bad_rows)} bad rows skipped'
      + (f' (all in {bad_rows_path})' if builder.bad_rows else ''))
  for line, reason in builder.bad_rows[:MAX_LOGGED_BAD_ROWS]:
    log(f'  line {line}: {reason}')
  if len(builder.bad_rows) > MAX_LOGGED_BAD_ROWS:
    log(f'  ... and {len(builder.bad_rows) - MAX_LOGGED_BAD_ROWS} more')
  for split in ['train', 'test'] if config.test_fraction > 0 else ['train']:
    if split not in builder.info.splits:  # possible with few images
      log(f'jaxcl: no image fell in the {split} split (test_fraction={config.test_fraction}); '
          f'it was not written')
  return builder


def _summary(bad_rows) -> str:
  if not bad_rows:
    return 'the file has no rows'
  line, reason = bad_rows[0]
  more = len(bad_rows) - 1
  more = f' (and {more} more bad row{"s" if more > 1 else ""})' if more else ''
  return f'line {line}: {reason}{more}'
