"""Webdataset shards: tar files whose consecutive members sharing a key form
one sample (``000123.jpg``, ``000123.txt``, ``000123.cls``), as LAION,
DataComp and CC12M are distributed and open_clip reads them.

- `expand_urls`: ``'DIR/shard-{000000..000099}.tar::OTHER/{0..9}.tar'`` ->
  the list of shard paths (brace ranges, sources joined by ``::``), local
  or any epath scheme (``gs://``).
- `read_samples`: one shard as a stream of samples ``{'__key__', ext:
  bytes, ...}``, read sequentially (one pass, bounded memory), from any
  sample offset; a shard that is not a tar, ends in the middle of a member
  or holds no sample ends with a `BadShard` marker instead of an exception.
- `check_readable`: every shard's first sample read (in threads; a failed
  read tried again) before a run starts; the shards that cannot be read,
  named in one line.
- `estimated_samples`: how many samples a shard that cannot be read stands
  for (sizes.json, or its size at the samples per byte of a good shard).
- `ShardWriter`: writes samples into numbered shards of about N bytes.
- `sizes`: the sample counts a shard folder declares (``sizes.json``, as
  open_clip reads them), when it has them.

This module imports no other module of the package.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import re
import sys
import tarfile
import time
import zlib
from concurrent import futures
from typing import Iterator

import braceexpand
from etils import epath

from jaxcl import errors

SOURCE_SEPARATOR = '::'
SIZES_FILE = 'sizes.json'  # {shard file name: samples}, open_clip's convention
MANIFEST_FILE = 'manifest.json'  # what `jaxcl shard` wrote, with its counts
CHECK_THREADS = 32  # shards checked at once: object stores answer each request slowly
PROGRESS_FROM = 1000  # shards: fewer are checked in seconds, without a progress line
PROGRESS_EVERY_S = 10.0
LISTED_PROBLEMS = 3  # unreadable shards named in the error (all are counted)
REFERENCE_SHARDS = 3  # shards tried, in order, for the samples per byte of a good one
READ_TRIES = 3  # reads of a shard's first sample before check_readable names it
READ_RETRY_S = 0.5  # the wait before the second read, doubled before each later one
# Errors opening a shard that another try cannot change (others, such as
# EIO or a timeout from a network file system, may pass).
_DEFINITE_OPEN_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError,
                         PermissionError)

# webdataset's rule: the key is the member's path up to the first dot of its
# file name, the extension (lower-cased) everything after it.
_KEY_EXTENSION = re.compile(r'^((?:.*/|)[^./]+)\.([^/]*)$')


def expand_urls(urls: str) -> list[str]:
  """Every shard path `urls` names, in order: sources separated by '::',
  each with bash-style brace ranges and alternatives."""
  shards = []
  for source in urls.split(SOURCE_SEPARATOR):
    source = source.strip()
    if source:
      shards.extend(braceexpand.braceexpand(source))
  return shards


def check_shards(shards: list[str], what: str) -> None:
  """Raises DatasetError naming the first shard of `shards` that does not
  exist; one listing per folder, not one request per shard."""
  if not shards:
    raise errors.DatasetError(f'{what} names no shard')
  listed: dict[str, set] = {}
  for shard in shards:
    path = epath.Path(shard)
    parent = str(path.parent)
    if parent not in listed:
      try:
        listed[parent] = {p.name for p in path.parent.iterdir()}
      except OSError as e:  # a missing folder, a bucket with no access
        raise errors.DatasetError(f'cannot open shard {shard} ({what}): cannot list {parent}: '
                                  f'{errors.type_and_first_line(e)}') from None
    if path.name not in listed[parent]:
      raise errors.DatasetError(f'cannot open shard {shard} ({what}): no such file')


def sizes(shards: list[str]) -> dict[str, int]:
  """{shard: samples} for the shards whose folder has a sizes.json naming them."""
  counts = {}
  for parent in dict.fromkeys(str(epath.Path(s).parent) for s in shards):
    path = epath.Path(parent) / SIZES_FILE
    try:
      declared = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
      declared = {}
    for shard in shards:
      if str(epath.Path(shard).parent) == parent and epath.Path(shard).name in declared:
        counts[shard] = int(declared[epath.Path(shard).name])
  return counts


# What a BadShard is: why its samples cannot be read.
NOT_A_TAR = 'not a tar file'
CUT_OFF = 'truncated or corrupt'
NO_SAMPLE = 'no sample'  # an empty tar, or one of folders and files without an extension
UNREADABLE = 'read failed'
_CUT_OFF_ERRORS = ('truncated header', 'unexpected end of data')  # tarfile's ReadErrors


@dataclasses.dataclass(frozen=True)
class BadShard:
  """A shard whose samples stop being readable after sample `key` (None:
  from its start): `problem` is NOT_A_TAR, CUT_OFF, NO_SAMPLE or
  UNREADABLE, `reason` the error; `samples`: how many bad samples it
  counts for (the samples it holds past those read; set by the stream)."""
  shard: str
  key: str | None
  problem: str
  reason: str = ''
  samples: int = 1

  @property
  def where(self) -> str:
    return f'{self.shard} after {self.key}' if self.key else self.shard

  @property
  def why(self) -> str:
    return self.problem + (f': {self.reason}' if self.reason else '')


def split_name(name: str) -> tuple[str, str] | None:
  """(key, extension) of a tar member name, None for a name without one."""
  match = _KEY_EXTENSION.match(name)
  return (match.group(1), match.group(2).lower()) if match else None


def read_samples(shard: str, skip: int = 0) -> Iterator[dict | BadShard]:
  """The samples of one shard in file order, from sample number `skip` on.

  A sample is ``{'__key__': key, '__shard__': shard, ext: bytes, ...}``.
  Members that are not regular files or have no extension are ignored (as
  webdataset does). A shard whose bytes are not a tar, that ends in the
  middle of a member or that holds no sample ends with one BadShard; a
  shard that cannot be opened raises DatasetError (one line naming it).
  """
  try:
    handle = epath.Path(shard).open('rb')
  except OSError as e:
    raise errors.DatasetError(f'cannot open shard {shard}: {errors.type_and_first_line(e)}') \
        from None
  with handle:
    yield from _samples_in(shard, handle, skip)


def _samples_in(shard: str, handle, skip: int) -> Iterator[dict | BadShard]:
  """read_samples of the open file `handle`."""
  try:
    # Stream mode: one sequential pass, which object stores serve well; '*':
    # .tar.gz shards too. Opening reads the first header: bytes that are no tar fail here.
    tar = tarfile.open(fileobj=handle, mode='r|*')
  except (tarfile.TarError, zlib.error) as e:  # cut off in its first header, or no tar at all
    problem = CUT_OFF if str(e) in _CUT_OFF_ERRORS else NOT_A_TAR
    yield BadShard(shard, None, problem, errors.type_and_first_line(e))
    return
  except (EOFError, OSError) as e:
    yield BadShard(shard, None, UNREADABLE, errors.type_and_first_line(e))
    return
  index, current, last_key = 0, None, None
  with tar:
    try:
      for member in tar:
        if not member.isfile():
          continue
        parts = split_name(member.name)
        if parts is None:
          continue
        key, extension = parts
        if current is not None and key != current['__key__']:
          if index >= skip:
            yield current
          last_key, current = current['__key__'], None
          index += 1
        if current is None:
          current = {'__key__': key, '__shard__': shard}
        # Skipped samples are still read: a stream has no random access.
        data = tar.extractfile(member).read()
        if len(data) != member.size:
          raise tarfile.ReadError('unexpected end of data')
        current[extension] = data
        tar.members = []  # stream mode keeps every header read: a shard's worth
    except GeneratorExit:  # closed early (at exit: before the names below are gone)
      raise
    except (tarfile.TarError, EOFError, zlib.error) as e:
      yield BadShard(shard, last_key, CUT_OFF, errors.type_and_first_line(e))
      return
    except OSError as e:  # the storage failed, not the bytes
      yield BadShard(shard, last_key, UNREADABLE, errors.type_and_first_line(e))
      return
  if current is not None and index >= skip:
    yield current
  elif current is None and index == 0:
    yield BadShard(shard, None, NO_SAMPLE)


def first_sample_problem(shard: str) -> str | None:
  """Why `shard` cannot be read as a webdataset shard ('a folder', not a
  tar, ...), from its first sample alone; None when that sample reads. A
  failed read (the storage's error, not the bytes') is tried READ_TRIES
  times, so that a flaky network file system does not refuse a run."""
  for attempt in range(READ_TRIES):
    problem, may_pass = _first_sample_read(shard)
    if problem is None:
      return None
    if not may_pass or attempt == READ_TRIES - 1:
      break
    time.sleep(READ_RETRY_S * 2**attempt)
  # Asked only now: one request less per good shard. (On gs:// a folder opens, as an empty file.)
  return 'a folder' if _is_folder(shard) else problem


def _first_sample_read(shard: str) -> tuple[str | None, bool]:
  """(why the first sample of `shard` does not read, or None; whether
  reading it again may succeed: the read failed, not the bytes)."""
  try:
    handle = epath.Path(shard).open('rb')
  except _DEFINITE_OPEN_ERRORS as e:
    return errors.type_and_first_line(e), False
  except OSError as e:
    return errors.type_and_first_line(e), True
  with handle:
    samples = _samples_in(shard, handle, 0)
    first = next(samples, None)
    samples.close()
  if not isinstance(first, BadShard):
    return None, False
  return first.why, first.problem == UNREADABLE


def _is_folder(path: str) -> bool:
  try:
    return epath.Path(path).is_dir()
  except OSError:
    return False


def check_readable(shards: list[str], what: str) -> None:
  """Raises DatasetError when any of `shards` (named by `what`) cannot be
  read: one line with their count and the first LISTED_PROBLEMS. The first
  sample of each is read, CHECK_THREADS at once; with PROGRESS_FROM shards
  or more, a progress line goes to stderr every PROGRESS_EVERY_S."""
  problems = []
  started = last_shown = time.monotonic()
  with futures.ThreadPoolExecutor(min(CHECK_THREADS, max(1, len(shards)))) as pool:
    for done, (shard, why) in enumerate(zip(shards, pool.map(first_sample_problem, shards)), 1):
      if why is not None:
        problems.append(f'{shard} ({why})')
      if len(shards) >= PROGRESS_FROM and time.monotonic() - last_shown > PROGRESS_EVERY_S:
        last_shown = time.monotonic()
        print(f'jaxcl: checked {done} of the {len(shards)} shards of {what} '
              f'({last_shown - started:.0f}s)', file=sys.stderr, flush=True)
  if problems:
    more = len(problems) - LISTED_PROBLEMS
    raise errors.DatasetError(
        f'{len(problems)} of the {len(shards)} shards of {what} cannot be read: '
        + ', '.join(problems[:LISTED_PROBLEMS]) + (f' and {more} more' if more > 0 else '')
        + f'; remove them from {what}')


def estimated_samples(shard: str, shards: tuple[str, ...]) -> int:
  """How many samples `shard`, one of `shards`, holds as far as can be told
  without reading it: its count in sizes.json, else its size at the
  samples per byte of the first of `shards` that reads whole (at least 1)."""
  declared = _declared_sizes(shards)
  if shard in declared:
    return max(1, declared[shard])
  return max(1, round(_size(shard) * _samples_per_byte(shards)))


@functools.lru_cache(maxsize=8)
def _declared_sizes(shards: tuple[str, ...]) -> dict[str, int]:
  return sizes(list(shards))


@functools.lru_cache(maxsize=8)
def _samples_per_byte(shards: tuple[str, ...]) -> float:
  """Of the first of `shards` (up to REFERENCE_SHARDS tried) whose count is
  declared, or that reads whole; 0 when none does."""
  for shard in shards[:REFERENCE_SHARDS]:
    count = _declared_sizes(shards).get(shard) or _count_samples(shard)
    size = _size(shard)
    if count and size:
      return count / size
  return 0.0


def _count_samples(shard: str) -> int:
  """The samples of `shard`, 0 unless it reads whole."""
  count = 0
  try:
    for sample in read_samples(shard):
      if isinstance(sample, BadShard):
        return 0
      count += 1
  except errors.DatasetError:
    return 0
  return count


def _size(shard: str) -> int:
  try:
    return epath.Path(shard).stat().length
  except OSError:
    return 0


class ShardWriter:
  """Writes samples into ``DIR/PREFIX-000000.tar``, ``-000001.tar``, ... of
  about `max_bytes` each (a shard closes once it reaches the size), each
  written under a temporary name and renamed when complete."""

  def __init__(self, folder, max_bytes: int, prefix: str = 'shard', first: int = 0):
    self.folder = epath.Path(folder)
    self.max_bytes, self.prefix, self.number = max_bytes, prefix, first
    self.written: dict[str, int] = {}  # shard file name: samples
    self._tar = self._file = self._name = None
    self._bytes = self._count = 0

  def write(self, sample: dict) -> None:
    """Adds one sample: {'__key__': str, extension: bytes or str, ...}."""
    if self._tar is None:
      self._open()
    key = sample['__key__']
    for extension, value in sample.items():
      if extension.startswith('__'):
        continue
      data = value.encode('utf-8') if isinstance(value, str) else bytes(value)
      info = tarfile.TarInfo(f'{key}.{extension}')
      info.size, info.mtime, info.mode = len(data), 0, 0o444
      self._tar.addfile(info, io.BytesIO(data))
      self._bytes += len(data) + 1024  # the header and padding, roughly
    self._count += 1
    if self._bytes >= self.max_bytes:
      self.close()

  def _open(self):
    self._name = f'{self.prefix}-{self.number:06d}.tar'
    self._file = (self.folder / f'.{self._name}.tmp').open('wb')
    self._tar = tarfile.open(fileobj=self._file, mode='w')
    self._bytes = self._count = 0

  def abort(self) -> None:
    """Drops the open shard, if any (its temporary file): a failed write."""
    if self._tar is not None:
      self._file.close()
      (self.folder / f'.{self._name}.tmp').unlink(missing_ok=True)
      self._tar = self._file = None

  def close(self) -> None:
    """Completes the open shard, if any."""
    if self._tar is None:
      return
    self._tar.close()
    self._file.close()
    (self.folder / f'.{self._name}.tmp').rename(self.folder / self._name)
    self.written[self._name] = self._count
    self._tar = self._file = None
    self.number += 1
