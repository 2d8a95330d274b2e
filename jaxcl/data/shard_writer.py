"""`jaxcl shard`: a pairs file or an image folder written as webdataset
shards, the input jaxcl streams (jaxcl.data.stream).

- A pairs file (JSONL/CSV/TSV, jaxcl.data.pair_rows): one sample per row,
  ``KEY.jpg`` + ``KEY.txt``; with test_fraction > 0 the images
  pair_rows.in_test_split puts in 'test' go to ``test-*.tar``.
- An image folder: ``FOLDER/CLASS/*.png`` (``KEY.cls`` = the class's index
  in sorted order) or ``FOLDER/*.png``; a folder with ``train/`` (and
  ``test/``) sub-folders gives both splits, as dataset.name=image_folder
  reads it.

Images are checked by decoding them; JPEGs are copied byte for byte, other
formats re-encoded as JPEG (quality 95). Rows are read one at a time and
decoded and encoded in `workers` processes with a bounded number of chunks
in flight, so memory does not grow with the input. Shards close at about
`shard_mb` MB. Bad rows and images are skipped, counted and listed in
manifest.json, with the counts and the shard names; sizes.json holds the
samples per shard (open_clip's convention). A class folder with no image is
refused (it would be a label with no example).

The output appears whole or not at all: the shards are written into
OUTPUT/.jaxcl-shard-unfinished/ and moved into OUTPUT once all are
complete, then sizes.json, then manifest.json, which marks the output
complete. A failed or interrupted (Ctrl-C) run removes what it wrote; one
killed outright leaves the unfinished folder, and a rerun into the same
OUTPUT removes that run's files (nothing else is there) and starts over.
"""

from __future__ import annotations

import collections
import concurrent.futures
import io
import json
import math
import multiprocessing
import re
import signal
import sys
import threading

from etils import epath
from PIL import Image

from jaxcl import errors, files
from jaxcl.data import images
from jaxcl.data.pair_rows import DELIMITERS, JSON_SUFFIXES, absolute_path, in_test_split, iter_pairs
from jaxcl.data.shards import MANIFEST_FILE, SIZES_FILE, ShardWriter

CHUNK = 16  # rows a worker encodes per task
IN_FLIGHT_PER_WORKER = 4  # tasks queued per worker: memory bounded, workers never idle
JPEG_QUALITY = 95
MAX_LISTED_BAD = 100
UNFINISHED_DIR = '.jaxcl-shard-unfinished'  # the shards of a run not yet complete
# What a run puts in OUTPUT (files.write_atomically's temporary names too):
# all a rerun may remove from an unfinished output.
_OWN_NAME = re.compile(r'(train|test)-\d{6}\.tar|sizes\.json|'
                       r'\.(sizes|manifest)\.json\.[0-9a-f]{8}\.tmp|' + re.escape(UNFINISHED_DIR))


def encode_image(path: str):
  """(JPEG bytes, re-encoded?) of the image file at `path`, or (None, why)."""
  try:
    data = epath.Path(path).read_bytes()
    pil = Image.open(io.BytesIO(data))
    pil.load()  # a truncated file fails here
  except Exception as e:  # PIL raises many kinds
    return None, f'unreadable image {path}: {images.pil_error(e)}'
  if pil.format == 'JPEG' and pil.mode in ('RGB', 'L'):
    return data, False
  out = io.BytesIO()
  pil.convert('RGB').save(out, format='JPEG', quality=JPEG_QUALITY)
  return out.getvalue(), True


def _rows(source: str, test_fraction: float, classes: list):
  """Rows of (where, image path, caption or None, label, split), one at a
  time; a bad row of a pairs file is (where, None, reason, -1, '')."""
  path = epath.Path(source)
  if path.is_dir():
    yield from _folder_rows(path, classes)
    return
  folder = str(path.absolute().parent)
  try:
    for line, image, caption in iter_pairs(source):
      if image is None:
        yield f'line {line}', None, caption, -1, ''
      else:
        test = test_fraction and in_test_split(image, folder, test_fraction)
        yield f'line {line}', image, caption, -1, 'test' if test else 'train'
  except ValueError as e:
    raise errors.DatasetError(str(e)) from None


def _folder_classes(root: epath.Path) -> list:
  """The class folders of the (train split of the) image folder `root`;
  DatasetError if one holds no image."""
  train_root = root / 'train' if (root / 'train').is_dir() else root
  classes = images.class_folders(train_root)
  images.check_classes_have_images(train_root, classes)
  return classes


def _folder_rows(root: epath.Path, classes: list):
  splits = [s for s in ('train', 'test') if (root / s).is_dir()] if (root / 'train').is_dir() \
      else [None]
  for split in splits:
    base = root / split if split else root
    folders = [(base / name, label) for label, name in enumerate(classes)] if classes \
        else [(base, -1)]
    for folder, label in folders:
      if folder.is_dir():
        for p in sorted(folder.iterdir()):
          if p.suffix.lower() in images.IMAGE_SUFFIXES:
            yield str(p), str(p), None, label, split or 'train'


def _encode_chunk(paths: list) -> list:
  return [encode_image(path) for path in paths]


def _encoded(rows, workers: int):
  """(row, (JPEG bytes or None, re-encoded? or why)) in row order, the
  images encoded by `workers` processes with a bounded number of chunks in
  flight, so memory does not grow with the input."""
  def chunks():
    chunk = []
    for row in rows:
      chunk.append(row)
      if len(chunk) == CHUNK:
        yield chunk
        chunk = []
    if chunk:
      yield chunk

  def encode(chunk):
    return _encode_chunk([row[1] for row in chunk if row[1] is not None])

  if not workers:
    for chunk in chunks():
      yield from _merge(chunk, encode(chunk))
    return
  context = multiprocessing.get_context('spawn')
  with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
    pending = collections.deque()
    try:
      for chunk in chunks():
        pending.append((chunk, _submit(pool, [row[1] for row in chunk if row[1] is not None])))
        if len(pending) >= IN_FLIGHT_PER_WORKER * workers:
          chunk, future = pending.popleft()
          yield from _merge(chunk, future.result())
      while pending:
        chunk, future = pending.popleft()
        yield from _merge(chunk, future.result())
    except BaseException:  # Ctrl-C, a failed write: no reason to encode the rest
      pool.shutdown(cancel_futures=True)
      raise


def _submit(pool, paths: list) -> concurrent.futures.Future:
  """pool.submit of one chunk, with Ctrl-C blocked meanwhile: a worker starts
  on a submit and keeps the signal mask it started with, so the terminal's
  Ctrl-C, sent to the whole process group, reaches this process alone (once
  unblocked here; it stops the workers), not a worker, which would print a
  traceback wherever it was (importing jaxcl, say).

  The mask only blocks this thread: the kernel may hand the signal to the
  pool's manager thread, and Python would then raise KeyboardInterrupt in
  this thread, in the middle of submit's bookkeeping, leaving a pool whose
  shutdown can wait forever. So a Ctrl-C is also held back at the Python
  level and raised once submit has returned."""
  received = []
  handler = signal.getsignal(signal.SIGINT)
  held = callable(handler) and threading.current_thread() is threading.main_thread()
  if held:  # not when SIGINT is ignored (a background job) or not ours to handle
    signal.signal(signal.SIGINT, lambda *_: received.append(True))
  old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
  try:
    return pool.submit(_encode_chunk, paths)
  finally:
    signal.pthread_sigmask(signal.SIG_SETMASK, old)
    if held:
      signal.signal(signal.SIGINT, handler)
      if received:
        handler(signal.SIGINT, None)  # KeyboardInterrupt, or the caller's own handler


def _merge(chunk, encoded):
  """Rows with their encodings (bad pairs-file rows have none: their reason)."""
  results = iter(encoded)
  for row in chunk:
    yield row, next(results) if row[1] is not None else (None, row[2])


def write_shards(source: str, output: str, *, shard_mb: float = 256, workers: int = 0,
                 test_fraction: float = 0.0, log=print) -> dict:
  """Writes the shards of `source` into the new folder `output`; returns the
  manifest. Raises DatasetError (one line, nothing written) for a missing or
  unusable input, an output that is not an empty folder (or the unfinished
  output of an interrupted run), or an input with no usable image;
  errors.Interrupted after Ctrl-C, once what it wrote is removed."""
  out, path = epath.Path(output), epath.Path(source)
  unfinished = _check_output(out, output)
  if not path.exists():
    raise errors.DatasetError(f'--input {source} does not exist')
  if not path.is_dir() and path.suffix.lower() not in JSON_SUFFIXES + tuple(DELIMITERS):
    raise errors.DatasetError(f'--input {source} is neither a folder nor a pairs file '
                              f'(.jsonl, .json, .csv, .tsv)')
  if not 0 <= test_fraction < 1:
    raise errors.DatasetError(f'--test_fraction must be in [0, 1), got {test_fraction}')
  if not 0 < shard_mb < math.inf:  # nan too
    raise errors.DatasetError(f'--shard_size must be a positive number of MB, got {shard_mb}')
  classes = _folder_classes(path) if path.is_dir() else []
  if unfinished:
    log(f'removing the unfinished output of an interrupted jaxcl shard from {output}')
    if not _remove_unfinished(out):
      raise errors.DatasetError(f'--output {output} holds the unfinished output of an '
                                f'interrupted jaxcl shard, which cannot be removed; delete it')
  new_folders = _make_output(out, output)
  try:
    return _write(source, out, classes, shard_mb, workers, test_fraction, log)
  except BaseException as e:
    if (out / MANIFEST_FILE).exists():  # written last: the output is complete
      raise
    removed = _remove_unfinished(out, new_folders)
    if isinstance(e, KeyboardInterrupt):
      raise _interrupted(output, removed) from None
    raise


def _check_output(out: epath.Path, output: str) -> bool:
  """Whether `out` is the unfinished output of an interrupted run, which
  holds nothing but that run's files (a rerun removes them); DatasetError
  unless it is that, an empty folder or not there."""
  if out.exists() and not out.is_dir():
    raise errors.DatasetError(f'--output {output} exists and is not an empty folder')
  names = {p.name for p in out.iterdir()} if out.exists() else set()
  if UNFINISHED_DIR in names and MANIFEST_FILE not in names and all(
      _OWN_NAME.fullmatch(name) for name in names):
    return True
  if names:
    raise errors.DatasetError(f'--output {output} exists and is not an empty folder')
  return False


def _make_output(out: epath.Path, output: str) -> list:
  """Makes the folder `out`; returns the folders made (it and any missing
  parents, innermost first), which a failed run removes."""
  new = []
  for folder in [out, *out.parents]:
    if folder.exists():
      break
    new.append(folder)
  try:
    out.mkdir(parents=True, exist_ok=True)
  except OSError as e:  # permission denied, a file on the way (X/sub, X a file)
    raise errors.DatasetError(f'cannot make --output {output}: '
                              f'{e.strerror or errors.first_line(e)}') from None
  return new


def _remove_unfinished(out: epath.Path, new_folders=()) -> bool:
  """Removes what a run wrote into `out` (its own names only) and the
  folders it made; whether that worked."""
  try:
    for path in out.iterdir() if out.exists() else ():
      if path.name == UNFINISHED_DIR:
        path.rmtree()
      elif _OWN_NAME.fullmatch(path.name):
        path.unlink()
    for folder in new_folders:
      if folder.exists():
        folder.rmdir()
  except OSError:  # the caller says what is left; the original error is the one to report
    return False
  return True


def _interrupted(output: str, removed: bool) -> errors.Interrupted:
  """Ctrl-C's message, printed, as the exception that exits with code 130."""
  if removed:
    message = (f'stopped (Ctrl-C) before the shards were complete; what it wrote to {output} '
               f'is removed: run the same command again to start over')
  else:
    message = (f'stopped (Ctrl-C) before the shards were complete; {output} is unfinished '
               f'(no {MANIFEST_FILE}): the same command again removes it and starts over')
  print(f'\njaxcl: {message}', file=sys.stderr, flush=True)
  return errors.Interrupted(message, 128 + signal.SIGINT)


def _write(source, out, classes, shard_mb, workers, test_fraction, log) -> dict:
  """The shards, written into out/UNFINISHED_DIR, then moved into `out` by _finish."""
  unfinished = out / UNFINISHED_DIR
  unfinished.mkdir()
  writers, bad, counts = {}, [], {'bad': 0, 'reencoded': 0, 'written': 0}
  try:
    for (where, _, caption, label, split), (data, how) in _encoded(
        _rows(source, test_fraction, classes), workers):
      if data is None:
        counts['bad'] += 1
        if len(bad) < MAX_LISTED_BAD:
          bad.append((where, how))
        continue
      counts['reencoded'] += bool(how)
      if split not in writers:
        writers[split] = ShardWriter(unfinished, int(shard_mb * 2**20), prefix=split)
      sample = {'__key__': f'{counts["written"]:09d}', 'jpg': data}
      counts['written'] += 1
      if caption is not None:
        sample['txt'] = caption
      if label >= 0:
        sample['cls'] = str(label)
      writers[split].write(sample)
  except BaseException:
    for writer in writers.values():
      writer.abort()
    raise
  for writer in writers.values():
    writer.close()
  if not writers:
    raise errors.DatasetError(f'no usable image in {source}'
                              + (f' ({_describe(*bad[0])})' if bad else ''))
  return _finish(source, out, writers, bad, counts, classes, log)


def _describe(where: str, why: str) -> str:
  """A bad row or image in words; an image's reason names its file already."""
  return why if where in why else f'{where}: {why}'


def _finish(source, out, writers, bad, counts, classes, log) -> dict:
  """Moves the complete shards into `out`, then writes sizes.json and, last,
  manifest.json; removes the emptied unfinished folder."""
  sizes = {name: count for writer in writers.values() for name, count in writer.written.items()}
  for name in sizes:
    (out / UNFINISHED_DIR / name).rename(out / name)
  files.write_atomically(out / SIZES_FILE, json.dumps(sizes, indent=1) + '\n')
  splits = {}
  for split, writer in writers.items():
    names = sorted(writer.written)
    splits[split] = {'samples': sum(writer.written.values()), 'shards': len(names),
                     'urls': f'{absolute_path(out)}/{split}-{{000000..{len(names) - 1:06d}}}.tar'}
  manifest = {'input': str(source), 'splits': splits, 'skipped': counts['bad'],
              'reencoded_as_jpeg': counts['reencoded'], 'classes': classes,
              'bad': [list(item) for item in bad[:MAX_LISTED_BAD]]}
  files.write_atomically(out / MANIFEST_FILE, json.dumps(manifest, indent=1) + '\n')
  # On an object store (gcsfs) the emptied prefix no longer exists.
  (out / UNFINISHED_DIR).rmtree(missing_ok=True)
  for split, info in splits.items():
    log(f'{split}: {info["samples"]} samples in {info["shards"]} shard(s): '
        f"--config.dataset.{'urls' if split == 'train' else 'eval_urls'}='{info['urls']}'")
  log(f'{counts["bad"]} bad row(s) or image(s) skipped, {counts["reencoded"]} image(s) '
      f're-encoded as JPEG; {out / MANIFEST_FILE}')
  for where, why in bad[:10]:
    log(f'  {_describe(where, why)}')
  return manifest
