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
in flight, so memory does not grow with the input. Shards close at about `shard_mb` MB and appear under
their final name only when complete. Bad rows and images are skipped,
counted and listed in manifest.json, with the counts and the shard names;
sizes.json holds the samples per shard (open_clip's convention).
"""

from __future__ import annotations

import collections
import concurrent.futures
import io
import json
import multiprocessing

from etils import epath

from jaxcl import errors, files
from jaxcl.data.images import IMAGE_SUFFIXES
from jaxcl.data.pair_rows import DELIMITERS, JSON_SUFFIXES, in_test_split, iter_pairs
from jaxcl.data.shards import MANIFEST_FILE, SIZES_FILE, ShardWriter

CHUNK = 16  # rows a worker encodes per task
IN_FLIGHT_PER_WORKER = 4  # tasks queued per worker: memory bounded, workers never idle
JPEG_QUALITY = 95
MAX_LISTED_BAD = 100


def encode_image(path: str):
  """(JPEG bytes, re-encoded?) of the image file at `path`, or (None, why)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    data = epath.Path(path).read_bytes()
    pil = Image.open(io.BytesIO(data))
    pil.load()  # a truncated file fails here
  except Exception as e:  # noqa: BLE001  pylint: disable=broad-except  # PIL raises many kinds
    return None, f'unreadable image {path}: {type(e).__name__}: {errors.first_line(e, "")}'
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
  train_root = root / 'train' if (root / 'train').is_dir() else root
  return sorted(p.name for p in train_root.iterdir() if p.is_dir())


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
          if p.suffix.lower() in IMAGE_SUFFIXES:
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
    for chunk in chunks():
      pending.append((chunk, pool.submit(_encode_chunk,
                                         [row[1] for row in chunk if row[1] is not None])))
      if len(pending) >= IN_FLIGHT_PER_WORKER * workers:
        chunk, future = pending.popleft()
        yield from _merge(chunk, future.result())
    while pending:
      chunk, future = pending.popleft()
      yield from _merge(chunk, future.result())


def _merge(chunk, encoded):
  """Rows with their encodings (bad pairs-file rows have none: their reason)."""
  results = iter(encoded)
  for row in chunk:
    yield row, next(results) if row[1] is not None else (None, row[2])


def write_shards(source: str, output: str, *, shard_mb: float = 256, workers: int = 0,
                 test_fraction: float = 0.0, log=print) -> dict:
  """Writes the shards of `source` into the new folder `output`; returns the
  manifest. Raises DatasetError (one line) for a missing or unusable input,
  an output folder that is not empty, or an input with no usable image."""
  out, path = epath.Path(output), epath.Path(source)
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise errors.DatasetError(f'--output {output} exists and is not an empty folder')
  if not path.exists():
    raise errors.DatasetError(f'--input {source} does not exist')
  if not path.is_dir() and path.suffix.lower() not in JSON_SUFFIXES + tuple(DELIMITERS):
    raise errors.DatasetError(f'--input {source} is neither a folder nor a pairs file '
                              f'(.jsonl, .json, .csv, .tsv)')
  if not 0 <= test_fraction < 1:
    raise errors.DatasetError(f'--test_fraction must be in [0, 1), got {test_fraction}')
  classes = _folder_classes(path) if path.is_dir() else []
  out.mkdir(parents=True, exist_ok=True)
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
        writers[split] = ShardWriter(out, int(shard_mb * 2**20), prefix=split)
      sample = {'__key__': f'{counts["written"]:09d}', 'jpg': data}
      counts['written'] += 1
      if caption is not None:
        sample['txt'] = caption
      if label >= 0:
        sample['cls'] = str(label)
      writers[split].write(sample)
  except BaseException:
    for writer in writers.values():
      writer.abort()  # the complete shards stay; no manifest says they are all
    raise
  for writer in writers.values():
    writer.close()
  if not writers:
    raise errors.DatasetError(f'no usable image in {source}'
                              + (f' ({bad[0][0]}: {bad[0][1]})' if bad else '')
                              + f'; {output} has no shards')
  return _finish(source, out, writers, bad, counts, classes, log)


def _finish(source, out, writers, bad, counts, classes, log) -> dict:
  sizes = {name: count for writer in writers.values() for name, count in writer.written.items()}
  files.write_atomically(out / SIZES_FILE, json.dumps(sizes, indent=1) + '\n')
  splits = {}
  for split, writer in writers.items():
    names = sorted(writer.written)
    splits[split] = {'samples': sum(writer.written.values()), 'shards': len(names),
                     'urls': f'{out.absolute()}/{split}-{{000000..{len(names) - 1:06d}}}.tar'}
  manifest = {'input': str(source), 'splits': splits, 'skipped': counts['bad'],
              'reencoded_as_jpeg': counts['reencoded'], 'classes': classes,
              'bad': [list(item) for item in bad[:MAX_LISTED_BAD]]}
  files.write_atomically(out / MANIFEST_FILE, json.dumps(manifest, indent=1) + '\n')
  for split, info in splits.items():
    log(f'{split}: {info["samples"]} samples in {info["shards"]} shard(s): '
        f"--config.dataset.{'urls' if split == 'train' else 'eval_urls'}='{info['urls']}'")
  log(f'{counts["bad"]} bad row(s) or image(s) skipped, {counts["reencoded"]} image(s) '
      f're-encoded as JPEG; {out / MANIFEST_FILE}')
  for where, why in bad[:10]:
    log(f'  {where}: {why}')
  return manifest
