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
formats re-encoded as JPEG (quality 95). Decoding and encoding run in
`workers` processes, a bounded chunk of rows at a time, so memory does not
grow with the input. Shards close at about `shard_mb` MB and appear under
their final name only when complete. Bad rows and images are skipped,
counted and listed in manifest.json, with the counts and the shard names;
sizes.json holds the samples per shard (open_clip's convention).
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import multiprocessing

from etils import epath

from jaxcl import errors, files
from jaxcl.data.images import IMAGE_SUFFIXES
from jaxcl.data.pair_rows import JSON_SUFFIXES, DELIMITERS, in_test_split, read_pairs
from jaxcl.data.shards import MANIFEST_FILE, SIZES_FILE, ShardWriter

CHUNK = 256  # rows encoded per round: what the workers hold at once
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


def _rows(source: str, test_fraction: float):
  """(rows, bad, classes): rows of (where, image path, caption or None,
  label, split), bad rows of (where, why)."""
  path = epath.Path(source)
  if path.is_dir():
    return _folder_rows(path)
  if path.suffix.lower() not in JSON_SUFFIXES and path.suffix.lower() not in DELIMITERS:
    raise errors.DatasetError(f'--input {source} is neither a folder nor a pairs file '
                              f'(.jsonl, .json, .csv, .tsv)')
  try:
    pairs, bad = read_pairs(source)
  except ValueError as e:
    raise errors.DatasetError(str(e)) from None
  folder = str(path.absolute().parent)
  rows = [(f'line {line}', image, caption, -1,
           'test' if test_fraction and in_test_split(image, folder, test_fraction) else 'train')
          for line, image, caption in pairs]
  return rows, [(f'line {line}', why) for line, why in bad], []


def _folder_rows(root: epath.Path):
  splits = [s for s in ('train', 'test') if (root / s).is_dir()] if (root / 'train').is_dir() \
      else [None]
  train_root = root / 'train' if splits != [None] else root
  classes = sorted(p.name for p in train_root.iterdir() if p.is_dir())
  rows = []
  for split in splits:
    base = root / split if split else root
    folders = [(base / name, label) for label, name in enumerate(classes)] if classes \
        else [(base, -1)]
    for folder, label in folders:
      if folder.is_dir():
        rows += [(str(p), str(p), None, label, split or 'train') for p in sorted(folder.iterdir())
                 if p.suffix.lower() in IMAGE_SUFFIXES]
  return rows, [], classes


def write_shards(source: str, output: str, *, shard_mb: float = 256, workers: int = 0,
                 test_fraction: float = 0.0, log=print) -> dict:
  """Writes the shards of `source` into the new folder `output`; returns the
  manifest. Raises DatasetError (one line) for a missing or unusable input,
  an output folder that is not empty, or an input with no usable image."""
  out = epath.Path(output)
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise errors.DatasetError(f'--output {output} exists and is not an empty folder')
  if not epath.Path(source).exists():
    raise errors.DatasetError(f'--input {source} does not exist')
  if not 0 <= test_fraction < 1:
    raise errors.DatasetError(f'--test_fraction must be in [0, 1), got {test_fraction}')
  rows, bad, classes = _rows(source, test_fraction)
  if not rows:
    raise errors.DatasetError(f'--input {source} has no image rows'
                              + (f' ({bad[0][0]}: {bad[0][1]})' if bad else ''))
  out.mkdir(parents=True, exist_ok=True)
  writers = {}
  reencoded = written = 0
  pool = (concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(
      'spawn')) if workers > 0 else None)
  try:
    for start in range(0, len(rows), CHUNK):
      chunk = rows[start:start + CHUNK]
      paths = [row[1] for row in chunk]
      encoded = list(pool.map(encode_image, paths, chunksize=8) if pool else map(encode_image, paths))
      for (where, _, caption, label, split), (data, how) in zip(chunk, encoded):
        if data is None:
          bad.append((where, how))
          continue
        reencoded += bool(how)
        if split not in writers:
          writers[split] = ShardWriter(out, int(shard_mb * 2**20), prefix=split)
        sample = {'__key__': f'{written:09d}', 'jpg': data}
        written += 1
        if caption is not None:
          sample['txt'] = caption
        if label >= 0:
          sample['cls'] = str(label)
        writers[split].write(sample)
  finally:
    if pool:
      pool.shutdown()
    for writer in writers.values():
      writer.close()
  if not writers:
    raise errors.DatasetError(f'no usable image in {source} ({bad[0][0]}: {bad[0][1]}); '
                              f'{output} has no shards')
  return _finish(source, out, writers, bad, reencoded, classes, log)


def _finish(source, out, writers, bad, reencoded, classes, log) -> dict:
  sizes = {name: count for writer in writers.values() for name, count in writer.written.items()}
  files.write_atomically(out / SIZES_FILE, json.dumps(sizes, indent=1) + '\n')
  splits = {}
  for split, writer in writers.items():
    names = sorted(writer.written)
    splits[split] = {'samples': sum(writer.written.values()), 'shards': len(names),
                     'urls': f'{out.absolute()}/{split}-{{000000..{len(names) - 1:06d}}}.tar'}
  manifest = {'input': str(source), 'splits': splits, 'skipped': len(bad),
              'reencoded_as_jpeg': reencoded, 'classes': classes,
              'bad': [list(item) for item in bad[:MAX_LISTED_BAD]]}
  files.write_atomically(out / MANIFEST_FILE, json.dumps(manifest, indent=1) + '\n')
  for split, info in splits.items():
    log(f'{split}: {info["samples"]} samples in {info["shards"]} shard(s): '
        f"--config.dataset.{'urls' if split == 'train' else 'eval_urls'}='{info['urls']}'")
  log(f'{len(bad)} bad row(s) or image(s) skipped, {reencoded} image(s) re-encoded as JPEG; '
      f'{out / MANIFEST_FILE}')
  for where, why in bad[:10]:
    log(f'  {where}: {why}')
  return manifest
