"""The rows of a pairs file: users' own (image path, caption) pairs, read
and checked, and the rule that puts an image in the train or test split.

A pairs file lists one pair per row:

- JSON lines (``.jsonl``, or ``.json`` holding one object per line):
  ``{"image": "photos/cat.jpg", "caption": "a cat on a mat"}``;
- CSV (``.csv``) or TSV (``.tsv``) with a header row naming the columns.

The keys / columns default to 'image' and 'caption'; relative image paths are
relative to the pairs file's folder. A bad row (unparseable, missing key,
empty caption) never raises: it is returned with its line number and reason.

Splits: 'train', plus 'test' when test_fraction > 0. An image is in test iff
int(sha1(path)[:8], 16) / 2**32 < test_fraction, where path is the image's
path relative to the pairs file's folder (absolute if outside it), so the
split depends neither on row order nor on where the folder is mounted, and
all captions of one image stay in one split.

This module imports no other module of the package; jaxcl.data.pairs turns
the rows into a TFDS dataset.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os

from etils import epath

JSON_SUFFIXES = ('.jsonl', '.json')
DELIMITERS = {'.csv': ',', '.tsv': '\t'}


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
  rows, bad_rows = [], []
  for line, image, caption_or_reason in iter_pairs(path, image_key=image_key,
                                                   caption_key=caption_key):
    if image is None:
      bad_rows.append((line, caption_or_reason))
    else:
      rows.append((line, image, caption_or_reason))
  return rows, bad_rows


def iter_pairs(path, *, image_key: str = 'image', caption_key: str = 'caption'):
  """read_pairs' rows one at a time, in file order: (line, absolute image
  path, caption) for a pair, (line, None, reason) for a bad row."""
  path = absolute_path(path)
  suffix = epath.Path(path).suffix.lower()
  if suffix not in JSON_SUFFIXES and suffix not in DELIMITERS:
    raise ValueError(f'pairs file {path} is not .jsonl, .json, .csv or .tsv')
  folder = str(epath.Path(path).parent)
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
          yield line, None, record
          continue
        problem = _check_row(record, image_key, caption_key)
        if problem:
          yield line, None, problem
          continue
        image = record[image_key].strip()
        yield line, _absolute(image, folder), record[caption_key].strip()
  except OSError as e:
    raise ValueError(f'cannot read pairs file {path}: {e.strerror or e}') from None


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


def absolute_path(path) -> str:
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
