"""The host pipelines over a random-access source: the endless, shuffled,
resumable training stream (grain), the captions' sampling in it, and one
padded pass over an evaluation split. This module imports no other module
of the package.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import threading
import time
from typing import Iterator

import grain
import numpy as np
from absl import flags

from jaxcl.data import locca


@dataclasses.dataclass(frozen=True)
class TextFields:
  """What a batch holds of each record's caption: its token ids under each
  key of `tokenizers` ('text': the run's; 'teacher_text': a teacher's own),
  and with `decoder_tasks` the decoder's rows from the 'text' tokenizer
  ('decoder_ids', 'decoder_weights': jaxcl.data.locca; a stream's records
  have no regions: the caption task)."""
  tokenizers: dict
  decoder_tasks: tuple = ()

  def of_record(self, record, caption: str, rng: np.random.Generator) -> dict:
    out = {key: each.encode([caption])[0] for key, each in self.tokenizers.items()}
    if self.decoder_tasks:
      ids, weights, _ = locca.example(record, caption, self.tokenizers['text'],
                                      self.decoder_tasks, rng)
      out.update(decoder_ids=ids, decoder_weights=weights)
    return out

  def of_captions(self, captions: list) -> dict:
    out = {key: each.encode(captions) for key, each in self.tokenizers.items()}
    if self.decoder_tasks:
      rows = [locca.sequence(self.tokenizers['text'], '', caption) for caption in captions]
      counted = 'caption' in self.decoder_tasks
      out.update(decoder_ids=np.stack([ids for ids, _ in rows]),
                 decoder_weights=np.stack([weights * counted for _, weights in rows]))
    return out


def _fields(tokenizer) -> TextFields:
  return tokenizer if isinstance(tokenizer, TextFields) else TextFields({'text': tokenizer})


def caption_sampler(tokenizer):
  """A grain random_map transform: record -> {'image', 'label', 'index', 'text'}, the
  text being one caption drawn at random (anew each epoch: the generator
  depends on the record's position in the repeated dataset), tokenized to
  int32 [max_length]; with TextFields, its fields of that caption."""

  def sample(record, rng: np.random.Generator):
    captions = record['captions']
    caption = captions[rng.integers(len(captions))] if captions else ''
    return {'image': record['image'], 'label': record['label'], 'index': record['index'],
            **_fields(tokenizer).of_record(record, caption, rng)}

  return sample


def tokenized(tokenizer, captions: list) -> dict:
  """{batch key: [n, L]} of the captions: 'text' for one tokenizer; a
  TextFields' fields."""
  return _fields(tokenizer).of_captions(captions)


def train_iterator(source, *, batch_size: int, seed: int, process_index: int = 0,
                   process_count: int = 1, num_threads: int = 4, transform=None,
                   start_record: int = 0, start_batch: int = 0, workers: int = 0,
                   patching=None):
  """An endless iterator of this process's share of each global batch: dicts
  of numpy arrays with leading dim batch_size / processes; 'index' holds
  each record's index in `source`.

  The records form one stream: epochs of the source, each in its own
  shuffled order, which depends only on the seed and the source. Global
  batch k holds records [start_record + k B, start_record + (k+1) B) of
  that stream; iteration starts at batch `start_batch`. A resumed run
  therefore reads on from its position whatever its process count, and a
  run whose global batch changed from B to B' at step s passes
  start_record = (records read so far) and start_batch = 0.
  transform: an optional grain random_map function (record, np Generator) ->
  record, e.g. `caption_sampler`; its randomness is seeded by the record's
  place in the stream, so it too survives a resume.
  workers: processes that read (and decode) the batches, each every W-th
  batch, interleaved back in order: the same batches for any W.
  patching: a jaxcl.data.naflex.Patching: each record's image becomes NaFlex
  patches at its global batch's budget (in the workers).
  """
  local_batch = batch_size // process_count
  rows = len(source)
  ds = grain.MapDataset.source(source).map_with_index(functools.partial(_with_index, rows))
  ds = ds.seed(seed).shuffle().repeat()
  if transform is not None:
    ds = ds.random_map(transform)
  if patching is not None:
    ds = ds.map_with_index(functools.partial(_patched, patching, seed, start_record, batch_size))
  if start_record:
    ds = ds[start_record:]
  # Process p reads the p-th block of every global batch, so the assembled
  # global batch is the same, row for row, whatever the number of processes.
  ds = ds.batch(local_batch, drop_remainder=True)[process_index::process_count]
  if start_batch:
    ds = ds[start_batch:]
  options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * num_threads)
  return iter(in_workers(ds.to_iter_dataset(options), workers))


def _with_index(rows: int, position: int, record: dict) -> dict:
  """The record with its row in the source (per-example state's row). In a
  repeated dataset grain hands every function its position in the stream,
  epoch * rows + row, wherever it sits in the chain: the row is its
  remainder (without it the rows of epoch 2 on lie outside the tables)."""
  return {**record, 'index': np.int32(position % rows)}


def _patched(patching, seed: int, start_record: int, batch_size: int, position: int,
             record: dict) -> dict:
  """The record's image as NaFlex patches at the budget of the global batch
  that its position in the stream falls in."""
  batch = (position - start_record) // batch_size
  return patching.patched(record, patching.batch_budget(seed, batch))


def in_workers(ds, workers: int):
  """The grain IterDataset `ds` computed in `workers` processes (0: here),
  each taking every W-th element, interleaved back in order."""
  if not workers:
    return ds
  if not flags.FLAGS.is_parsed():  # grain's worker start reads its absl flags' defaults
    flags.FLAGS.mark_as_parsed()
  return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                     per_worker_buffer_size=2),
                        worker_init_fn=_exit_with_parent)


def _exit_with_parent(worker_index: int, worker_count: int) -> None:
  """Runs in each worker: it exits once the training process is gone (a
  SIGKILL gives that process no chance to stop its workers), instead of
  living on as an orphan holding memory."""
  del worker_index, worker_count
  parent = os.getppid()

  def watch():
    while os.getppid() == parent:
      time.sleep(1.0)
    os._exit(0)

  threading.Thread(target=watch, daemon=True, name='jaxcl-exit-with-parent').start()


def _padded_images(images: list, rows: int, real: int):
  """The first `real` of `images` stacked, zeros up to `rows`; for NaFlex
  images (dicts), each part so, padding grids 1 x 1 (a softmax over no patch
  would be undefined)."""
  if isinstance(images[0], dict):
    out = {key: _padded_images([image[key] for image in images], rows, real)
           for key in images[0]}
    out['grid'][real:] = 1
    return out
  out = np.zeros((rows, *np.shape(images[0])), np.asarray(images[0]).dtype)
  if real:
    out[:real] = np.stack(images[:real])
  return out


def eval_batches(source, *, batch_size: int, process_index: int = 0, process_count: int = 1,
                 indices=None) -> Iterator[dict]:
  """One pass over a split (or over the records `indices`) in fixed-size
  batches, the last one padded.

  Yields this process's share of each global batch with a 'mask' (1 = real
  record) so padding never counts; every process yields the same number of
  batches, as collective computations require.
  """
  indices = np.arange(len(source)) if indices is None else np.asarray(indices)
  total = len(indices)
  local_batch = batch_size // process_count
  num_batches = -(-total // batch_size)
  for b in range(num_batches):
    start = b * batch_size + process_index * local_batch
    chunk = indices[start:min(start + local_batch, total)]
    records = [source[int(i)] for i in chunk]
    labels = np.array([r['label'] for r in records], np.int32)
    pad = local_batch - len(records)
    images = _padded_images([r['image'] for r in records] or [source[0]['image']], local_batch,
                            len(records))
    yield {'image': images,
           'label': np.concatenate([labels, np.full(pad, -1, np.int32)]),
           'mask': np.concatenate([np.ones(len(records), bool), np.zeros(pad, bool)])}
