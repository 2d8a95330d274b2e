"""A prepared TFDS dataset's split as a random-access source of {'image',
'label'} records (plus 'captions'), and the builder for a dataset's name.

Imports jaxcl.data.decode and images.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import read_only_builder, registered

from jaxcl import errors
from jaxcl.data import decode as decode_lib
from jaxcl.data.images import center_crop_resize

DatasetError = errors.DatasetError


def tfds_builder(name: str, data_dir: str | None):
  """The TFDS builder for `name`, or DatasetError if TFDS has no such dataset."""
  try:
    registered.imported_builder_cls(name.split(':')[0].split('/')[0])
  except registered.DatasetNotFoundError:
    raise DatasetError(f'no TFDS dataset named {name!r}') from None
  try:
    return tfds.builder(name, data_dir=data_dir, file_format='array_record')
  except ImportError as e:
    # Many builders import TensorFlow, which only preparing needs: a prepared
    # dataset is read from its own files, without the builder's code.
    try:
      return read_only_builder.builder_from_files(name, data_dir=data_dir)
    except Exception:
      raise DatasetError(
          f'TFDS dataset {name!r} is not prepared in {data_dir or "the TFDS data dir"}, and its '
          f'builder needs a package to prepare it ({e}); prepare it in array_record format '
          f'where that package is installed') from None


class TfdsRecords:
  """A TFDS data source whose records come out as {'image', 'label'} numpy
  arrays, plus 'captions' (a list of str) when `text_key` is given.

  decode: for an encoded image feature (tfds.features.Image, or a native
  pairs file's scalar bytes Tensor: JPEG/PNG bytes in the array_record
  files), the jaxcl.data.decode.SampleFormat its bytes
  are decoded with, here rather than by TFDS: the same path as shards, run
  in grain's worker processes when training (`workers` of them)."""

  def __init__(self, source, image_key, label_key, image_size, text_key=None, decode=None,
               workers: int = 0, where: str = ''):
    self._where = where
    self._source, self._image_key, self._label_key = source, image_key, label_key
    self._image_size, self._text_key, self._decode = image_size, text_key, decode
    self.workers = workers if decode is not None else 0

  def __len__(self):
    return len(self._source)

  def __getitem__(self, index):
    record = self._source[index]
    if self._decode is not None:
      encoded = record[self._image_key]  # bytes, or a pairs file's 0-d object array of them
      encoded = encoded.item() if isinstance(encoded, np.ndarray) else encoded
      image, problem = decode_lib.decode_image(encoded, self._decode)
      if problem:  # TFDS checked every image when it prepared the dataset
        raise DatasetError(f'record {index} of {self._where}: {problem}')
    else:
      image = np.asarray(record[self._image_key])
      if image.ndim == 2:
        image = image[..., None]
      if self._image_size and image.shape[:2] != (self._image_size,) * 2:
        image = center_crop_resize(image, self._image_size)
    label = record[self._label_key] if self._label_key in record else -1
    out = {'image': image.astype(np.uint8), 'label': np.int32(label)}
    if self._text_key:
      out['captions'] = as_strings(_nested(record, self._text_key))
      if 'box_captions' in record:  # regions (captioned_shapes): the decoder's LocCa tasks
        out['boxes'] = np.asarray(record['boxes'], np.float32)
        out['box_captions'] = as_strings(record['box_captions'])
    return out


def _nested(record, key: str):
  """record['a']['b'] for key 'a/b' (TFDS nests Sequence/FeaturesDict features)."""
  for part in key.split('/'):
    record = record[part]
  return record


def as_strings(value) -> list[str]:
  """A caption feature's value (str, bytes, or an array/list of them) -> list of str."""
  if isinstance(value, (str, bytes)):
    value = [value]
  return [v.decode('utf-8', errors='replace') if isinstance(v, bytes) else str(v)
          for v in np.asarray(value, dtype=object).reshape(-1)]
