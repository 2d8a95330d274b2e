"""Users' own (image path, caption) pairs as a prepared TFDS dataset.

A pairs file lists one pair per row:

- JSON lines (``.jsonl``, or ``.json`` holding one object per line):
  ``{"image": "photos/cat.jpg", "caption": "a cat on a mat"}``;
- CSV (``.csv``) or TSV (``.tsv``) with a header row naming the columns.

The keys / columns default to 'image' and 'caption'; relative image paths are
relative to the pairs file's folder. Rows naming the same image become one
example with several captions.

`prepare_pairs` converts the file once, with the `ImageTextPairs` builder,
into array_record files with the same features as jaxcl.shapes:

    'image': uint8 [S, S, 3] (PIL decode, RGB, central square resized to S),
    'captions': object array of UTF-8 bytes, one or more per image,

read like any TFDS dataset with ``builder.as_data_source(split)``. Bad rows
(unparseable, missing key, empty caption, missing or unreadable image) never
stop a conversion: they are skipped, counted, and listed with their line
numbers in the log and in ``bad_rows.json`` beside the prepared files.

Splits: 'train', plus 'test' when test_fraction > 0. An image is in test iff
int(sha1(path)[:8], 16) / 2**32 < test_fraction, where path is the image's
path relative to the pairs file's folder (absolute if outside it), so the
split depends neither on row order nor on where the folder is mounted, and
all captions of one image stay in one split.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import logging
import os
import re
from collections.abc import Callable
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from jaxcl import data
from jaxcl.data import MAX_UPSCALE, center_crop_resize

JSON_SUFFIXES = ('.jsonl', '.json')
DELIMITERS = {'.csv': ',', '.tsv': '\t'}
BAD_ROWS_FILE = 'bad_rows.json'
MAX_LOGGED_BAD_ROWS = 20


# -------------------------------------------------------------- reading rows ---
def read_pairs(path, *, image_key: str = 'image', caption_key: str = 'caption'):
  """The pairs in `path` and the rows that are not pairs.

  Returns (rows, bad_rows):
    rows: list of (line_number, absolute image path, caption), caption
      stripped of surrounding whitespace, in file order;
    bad_rows: list of (line_number, reason) for rows that cannot be parsed,
      lack a key or have an empty caption.
  Line numbers count from 1 and include the CSV header. Raises ValueError
  (one line) only when the file itself is missing, unreadable or of an
  unknown kind; a bad row never raises.
  """
  path = _absolute_path(path)
  suffix = epath.Path(path).suffix.lower()
  if suffix not in JSON_SUFFIXES and suffix not in DELIMITERS:
    raise ValueError(f'pairs file {path} is not .jsonl, .json, .csv or .tsv')
  folder = str(epath.Path(path).parent)
  rows, bad_rows = [], []
  try:
    # surrogateescape: a line that is not UTF-8 becomes one bad row (found by
    # _check_utf8) instead of an exception that ends the whole read.
    with epath.Path(path).open('rb') as raw, io.TextIOWrapper(
        raw, encoding='utf-8-sig', errors='surrogateescape', newline='') as f:
      if suffix in JSON_SUFFIXES:
        records = _json_records(f)
      else:
        records = _csv_records(f, DELIMITERS[suffix], image_key, caption_key)
      for line, record in records:
        if isinstance(record, str):  # already a reason
          bad_rows.append((line, record))
          continue
        problem = _check_row(record, image_key, caption_key)
        if problem:
          bad_rows.append((line, problem))
          continue
        image = record[image_key].strip()
        rows.append((line, _absolute(image, folder), record[caption_key].strip()))
  except OSError as e:
    raise ValueError(f'cannot read pairs file {path}: {e.strerror or e}') from None
  return rows, bad_rows


def _json_records(f):
  """(line number, dict or reason) for every non-blank line of a JSON-lines file."""
  for line_number, line in enumerate(f, 1):
    if not line.strip():
      continue
    problem = _check_utf8(line)
    if problem:
      yield line_number, problem
      continue
    try:
      record = json.loads(line)
    except ValueError as e:
      reason = f'not JSON ({e.msg} at column {e.colno})'
      if line.lstrip().startswith('['):  # a common mistake, worth a hint
        reason += '; a JSON array? write one object per line (JSON lines)'
      yield line_number, reason
      continue
    if not isinstance(record, dict):
      yield line_number, f'not a JSON object but {type(record).__name__}'
      continue
    yield line_number, record


def _csv_records(f, delimiter, image_key, caption_key):
  """(line number, dict or reason) for every data row of a CSV/TSV file."""
  reader = csv.reader(f, delimiter=delimiter)
  try:
    header = next(reader)
  except StopIteration:
    return
  except csv.Error as e:
    yield 1, f'unparseable header ({e})'
    return
  columns = ', '.join(header)
  if _check_utf8(columns):
    yield 1, 'header ' + _check_utf8(columns)
    return
  for key in (image_key, caption_key):
    if key not in header:
      # Every row would lack it: say so once, on the header line.
      yield 1, f'no {key!r} column (the columns are: {columns})'
      return
  previous_end = reader.line_num
  while True:
    # A quoted field may span lines: a row starts after the previous one ends.
    line_number = previous_end + 1
    try:
      fields = next(reader)
    except StopIteration:
      return
    except csv.Error as e:
      previous_end = reader.line_num
      yield line_number, f'unparseable row ({e})'
      continue
    previous_end = reader.line_num
    if not fields:  # a blank line
      continue
    if len(fields) != len(header):
      yield line_number, f'{len(fields)} fields, the header has {len(header)}'
      continue
    problem = _check_utf8(delimiter.join(fields))
    yield line_number, problem or dict(zip(header, fields))


def _check_row(record: dict, image_key: str, caption_key: str) -> str | None:
  """Why `record` is not a pair, or None."""
  for key in (image_key, caption_key):
    if key not in record or record[key] is None:
      return f'missing {key!r}'
    if not isinstance(record[key], str):
      return f'{key!r} is not a string but {type(record[key]).__name__}'
  if not record[image_key].strip():
    return f'empty {image_key!r}'
  if not record[caption_key].strip():
    return f'empty {caption_key!r}'
  return _check_utf8(record[caption_key])


def _check_utf8(text: str) -> str | None:
  try:
    text.encode('utf-8')
  except UnicodeEncodeError:
    return 'not valid UTF-8'
  return None


def _remote(path: str) -> bool:
  return '://' in path  # gs://..., s3://...: epath opens them as they are


def _absolute_path(path) -> str:
  path = os.fspath(path)
  return path if _remote(path) else str(epath.Path(path).expanduser().absolute())


def _absolute(image: str, folder: str) -> str:
  """An image path of a pairs file in `folder`, absolute (relative ones are
  relative to the file's folder, local or remote)."""
  if _remote(image):
    return image
  if _remote(folder):
    return str(epath.Path(folder) / image)
  return os.path.normpath(os.path.join(folder, os.path.expanduser(image)))


def _split_key(image: str, folder: str) -> str:
  """The path hashed for the train/test split: relative to the pairs file's folder."""
  if _remote(image) or _remote(folder):
    prefix = folder.rstrip('/') + '/'
    return image[len(prefix):] if image.startswith(prefix) else image
  relative = os.path.relpath(image, folder)
  outside = relative == os.pardir or relative.startswith(os.pardir + os.sep)
  return image if outside else relative.replace(os.sep, '/')


def in_test_split(image: str, folder: str, test_fraction: float) -> bool:
  """Whether the image (absolute path) of a pairs file in `folder` is in 'test'."""
  digest = hashlib.sha1(_split_key(image, folder).encode('utf-8')).hexdigest()
  return int(digest[:8], 16) / 2**32 < test_fraction


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
  image_size: int = 0
  image_key: str = 'image'
  caption_key: str = 'caption'
  test_fraction: float = 0.0

  @classmethod
  def create(cls, path, *, image_size: int, image_key: str = 'image',
             caption_key: str = 'caption', test_fraction: float = 0.0):
    path = _absolute_path(path)
    if image_size <= 0:
      raise ValueError(f'image_size must be positive, got {image_size}')
    if not 0.0 <= test_fraction < 1.0:
      raise ValueError(f'test_fraction must be in [0, 1), got {test_fraction}')
    # The file's contents are part of the identity: a pairs file edited in
    # place is converted anew, one merely touched or copied is not.
    identity = json.dumps([path, image_size, image_key, caption_key, test_fraction,
                           _content_hash(path)])
    digest = hashlib.sha1(identity.encode('utf-8')).hexdigest()[:8]
    stem = re.sub(r'[^a-z0-9]+', '_', epath.Path(path).stem.lower())
    stem = stem.strip('_')[:40] or 'pairs'
    return cls(name=f'{stem}_{digest}',
               description=f'{path} at {image_size}x{image_size}',
               path=path, image_size=image_size, image_key=image_key,
               caption_key=caption_key, test_fraction=test_fraction)


class ImageTextPairs(tfds.core.GeneratorBasedBuilder):
  """Images and captions listed in a JSONL/CSV/TSV file (see the module docstring).

  After preparing, `bad_rows` holds the (line_number, reason) of every row
  skipped, sorted by line, and `num_pairs` / `num_images` what was converted.
  """

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES: ClassVar[dict[str, str]] = {
      '1.0.0': 'image uint8 [S, S, 3] + captions; train and optional test.'}

  def __init__(self, *, config: ImageTextPairsConfig | None = None, **kwargs):
    if not isinstance(config, ImageTextPairsConfig):
      raise TypeError('ImageTextPairs needs an ImageTextPairsConfig (see prepare_pairs)')
    super().__init__(config=config, **kwargs)
    self.bad_rows: list[tuple[int, str]] = []
    self.num_pairs = 0
    self.num_images = 0

  def _info(self):
    size = self.builder_config.image_size
    return tfds.core.DatasetInfo(
        builder=self,
        description=f'Image-caption pairs from {self.builder_config.path}.',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=(size, size, 3), dtype=np.uint8),
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
    from PIL import Image, ImageOps  # pylint: disable=g-import-not-at-top
    size = self.builder_config.image_size
    for key, (path, captions) in enumerate(items):
      try:
        with epath.Path(path).open('rb') as f:
          pil = Image.open(f)
          if min(pil.size) < max(1, size // MAX_UPSCALE):
            self._skip(captions, f'wrongly sized image: {path} ({pil.size[0]}x{pil.size[1]} '
                                 f'px, under 1/{MAX_UPSCALE} of image_size {size})')
            continue
          pil.draft('RGB', (2 * size, 2 * size))  # JPEG: decode at a reduced scale, much faster
          pil = ImageOps.exif_transpose(pil).convert('RGB')
      except Exception as e:  # noqa: BLE001  pylint: disable=broad-except
        # A truncated or corrupt file passes _probe and fails here.
        self._skip(captions, _image_problem(path, e))
        continue
      image = center_crop_resize(np.asarray(pil), size)
      self.num_pairs += len(captions)
      self.num_images += 1
      yield key, {'image': image, 'captions': [caption for _, caption in captions]}
    self.bad_rows.sort()

  def _skip(self, captions, reason):
    self.bad_rows.extend((line, reason) for line, _ in captions)


def _probe(path: str) -> str | None:
  """Why the image at `path` cannot be opened, or None; reads only its header."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with epath.Path(path).open('rb') as f:
      Image.open(f)
  except Exception as e:  # noqa: BLE001  pylint: disable=broad-except
    return _image_problem(path, e)
  return None


def _image_problem(path: str, error: Exception) -> str:
  """A bad row's reason for an image that failed to open or decode."""
  from PIL import UnidentifiedImageError  # pylint: disable=g-import-not-at-top
  if isinstance(error, FileNotFoundError):
    return f'image not found: {path}'
  if isinstance(error, IsADirectoryError):
    return f'image is a folder: {path}'
  if isinstance(error, UnidentifiedImageError):
    return f'unreadable image: {path} (not an image format PIL knows)'
  # PIL raises many kinds (OSError for truncated data, SyntaxError,
  # DecompressionBombError, ...); none may stop the conversion.
  return f'unreadable image: {path} ({type(error).__name__}: {error})'


# ----------------------------------------------------------------- preparing ---
_ANNOUNCED = set()  # prepared datasets this process has reported


def prepare_pairs(path, *, image_size: int, data_dir: str | None = None,
                  image_key: str = 'image', caption_key: str = 'caption',
                  test_fraction: float = 0.0, log: Callable[[str], None] = print):
  """The prepared ImageTextPairs builder for the pairs file `path`.

  Converts the file on the first call for these arguments, logging one line
  with the counts and then up to MAX_LOGGED_BAD_ROWS bad rows; the full list
  goes to bad_rows.json in the prepared dataset's folder (builder.data_dir).
  Later calls reuse the prepared files and log one line. Raises ValueError
  if the file is missing or unreadable or has no valid row.
  """
  config = ImageTextPairsConfig.create(path, image_size=image_size, image_key=image_key,
                                       caption_key=caption_key, test_fraction=test_fraction)
  with _quiet_absl():  # TFDS warns that the config is not one of BUILDER_CONFIGS
    builder = ImageTextPairs(config=config, data_dir=data_dir, file_format='array_record')
  bad_rows_path = epath.Path(builder.data_dir) / BAD_ROWS_FILE
  if data.is_prepared(builder):
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

  tfds.disable_progress_bar()
  try:
    with contextlib.redirect_stdout(io.StringIO()):  # TFDS prints its own banners
      builder.download_and_prepare()
  except Exception as e:  # pylint: disable=broad-except
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


@contextlib.contextmanager
def _quiet_absl():
  """Hides absl's (TFDS's) warnings for the duration."""
  logger = logging.getLogger('absl')
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)
