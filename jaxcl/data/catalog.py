"""TFDS bookkeeping shared by jaxcl.data's builders and sources: whether a
builder's dataset is prepared, preparing it, and keeping TFDS quiet.

This is the one place TFDS is silenced (`quiet_tfds`: its progress bars and
the banners it prints while preparing; `quiet_absl`: its warnings) and the
one "is it prepared" check. It imports no other module of the package.
"""

from __future__ import annotations

import contextlib
import io
import logging

import tensorflow_datasets as tfds
from etils import epath


def is_prepared(builder) -> bool:
  """Whether a TFDS builder's dataset is prepared in its data_dir."""
  return epath.Path(builder.data_dir).joinpath('dataset_info.json').exists()


@contextlib.contextmanager
def quiet_tfds():
  """For the duration: TFDS's printed banners discarded; its progress bars
  off (for good, as tfds.disable_progress_bar does)."""
  tfds.disable_progress_bar()
  with contextlib.redirect_stdout(io.StringIO()):
    yield


@contextlib.contextmanager
def quiet_absl():
  """Hides absl's (TFDS's) warnings for the duration."""
  logger = logging.getLogger('absl')
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


def prepare(builder, name: str) -> None:
  """Prepares the dataset `name` of `builder` (download_and_prepare, quietly),
  announcing it in one line."""
  print(f'jaxcl: preparing TFDS dataset {name!r} in {builder.data_dir_root} (once)', flush=True)
  with quiet_tfds():
    builder.download_and_prepare()
