"""Webdataset shards: tar files whose consecutive members sharing a key form
one sample (``000123.jpg``, ``000123.txt``, ``000123.cls``), as LAION,
DataComp and CC12M are distributed and open_clip reads them.

- `expand_urls`: ``'DIR/shard-{000000..000099}.tar::OTHER/{0..9}.tar'`` ->
  the list of shard paths (brace ranges, sources joined by ``::``), local
  or any epath scheme (``gs://``).
- `read_samples`: one shard as a stream of samples ``{'__key__', ext:
  bytes, ...}``, read sequentially (one pass, bounded memory), from any
  sample offset; a truncated member ends the shard with a `TruncatedShard`
  marker instead of an exception.
- `ShardWriter`: writes samples into numbered shards of about N bytes.
- `sizes`: the sample counts a shard folder declares (``sizes.json``, as
  open_clip reads them), when it has them.

This module imports no other module of the package.
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
import tarfile
import zlib
from typing import Iterator

import braceexpand
from etils import epath

from jaxcl import errors

SOURCE_SEPARATOR = '::'
SIZES_FILE = 'sizes.json'  # {shard file name: samples}, open_clip's convention
MANIFEST_FILE = 'manifest.json'  # what `jaxcl shard` wrote, with its counts

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


@dataclasses.dataclass(frozen=True)
class TruncatedShard:
  """Where a shard stopped being readable: after `key` (None: at its start)."""
  shard: str
  key: str | None
  reason: str


def split_name(name: str) -> tuple[str, str] | None:
  """(key, extension) of a tar member name, None for a name without one."""
  match = _KEY_EXTENSION.match(name)
  return (match.group(1), match.group(2).lower()) if match else None


def read_samples(shard: str, skip: int = 0) -> Iterator[dict | TruncatedShard]:
  """The samples of one shard in file order, from sample number `skip` on.

  A sample is ``{'__key__': key, '__shard__': shard, ext: bytes, ...}``.
  Members that are not regular files or have no extension are ignored (as
  webdataset does). A shard that ends in the middle of a member, or whose
  bytes are not a tar, ends with one TruncatedShard; a shard that cannot be
  opened raises DatasetError (one line naming it).
  """
  try:
    handle = epath.Path(shard).open('rb')
  except OSError as e:
    raise errors.DatasetError(f'cannot open shard {shard}: {errors.type_and_first_line(e)}') \
        from None
  with handle:
    index, current, last_key = 0, None, None
    try:
      # Stream mode: one sequential pass, which object stores serve well; '*':
      # .tar.gz shards too.
      with tarfile.open(fileobj=handle, mode='r|*') as tar:
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
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
      yield TruncatedShard(shard, last_key, errors.type_and_first_line(e))
      return
    if current is not None and index >= skip:
      yield current


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
