"""TFDS bookkeeping shared by jaxcl.data's builders and sources: whether a
builder's dataset is prepared, preparing it, and keeping TFDS quiet.

This is the one place TFDS is silenced (`quiet_tfds`: its progress bars and
the banners it prints while preparing; `quiet_absl`: its warnings) and the
one "is it prepared" check. Of the package it imports only jaxcl.files.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import logging
import pathlib
import tempfile

import tensorflow_datasets as tfds
from etils import epath

from jaxcl import files


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
  announcing it in one line. On a local disk, processes that prepare the
  same dataset at once (a job's processes on one host, parallel test
  workers) take turns, and those after the first find it prepared."""
  if files.is_object_store(builder.data_dir):
    _announce(builder, name)
    with quiet_tfds():
      _prepare_and_upload(builder, name)
    return
  root = pathlib.Path(builder.data_dir_root)
  root.mkdir(parents=True, exist_ok=True)
  lock_file = root / f'.jaxcl-preparing-{name.replace("/", "--")}.lock'  # NAME/CONFIG too
  with open(lock_file, 'w', encoding='utf-8') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
    if not is_prepared(builder):
      _announce(builder, name)
      with quiet_tfds():
        builder.download_and_prepare()


def _announce(builder, name: str) -> None:
  print(f'jaxcl: preparing TFDS dataset {name!r} in {builder.data_dir_root} (once)', flush=True)


def _prepare_and_upload(builder, name: str) -> None:
  """Prepares `builder`'s dataset on the local disk and uploads it to its
  object-store data_dir: array_record writes only local files (it reads
  gs:// ones). dataset_info.json, which marks the dataset prepared, goes last."""
  with tempfile.TemporaryDirectory(prefix='jaxcl-tfds-') as local:
    tfds.builder(name, data_dir=local, file_format='array_record').download_and_prepare()
    version_dir = str(builder.data_dir)[len(str(builder.data_dir_root)):].strip('/')
    prepared = pathlib.Path(local, version_dir)  # NAME/VERSION, as in data_dir
    paths = sorted(prepared.rglob('*'), key=lambda p: p.name == 'dataset_info.json')
    for path in paths:
      if path.is_file():
        target = epath.Path(builder.data_dir) / str(path.relative_to(prepared))
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
