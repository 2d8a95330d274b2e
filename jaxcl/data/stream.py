"""Streams of webdataset shards: exact, resumable, split across processes,
decoded in grain worker processes.

The global batch is made of S streams (`StreamPlan.streams`), each giving
B / S rows per step, stream 0's rows first. Stream s reads the shards at
positions s, s + S, s + 2S, ... of an endless shard sequence: every epoch
of the shard list in its own seeded order, one after the other. It cuts
what it reads into windows of `window` samples (dataset.shuffle_buffer / S) and
takes each window in a seeded random order; a bad sample is skipped and
counted. So a stream's output depends only on (seed, S, its position), and:

- process p of P reads streams [p S/P, (p+1) S/P): its own shards only, and
  its rows of the global batch, which is the same whatever P divides S;
- a stream's position after a step is four integers (`POSITION_FIELDS`:
  window number, the shard cursor and sample offset where that window
  starts, samples of it taken) plus two counters (samples read, skipped).
  The trainer saves them with each checkpoint; a resumed run, with any P
  that divides S, continues every stream exactly where it stopped.

Each element grain produces is one stream's rows for one step, decoded and
cropped in a worker (`dataset.workers` processes, each owning every W-th of
this process's streams; grain interleaves them back in stream order).

Imports jaxcl.data.shards and jaxcl.data.decode.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import grain
import numpy as np

from jaxcl import errors
from jaxcl.data import decode as decode_lib
from jaxcl.data import shards as shards_lib

POSITION_FIELDS = ('window', 'cursor', 'offset', 'taken', 'read', 'skipped')
MAX_LISTED_BAD = 20  # bad samples listed by shard and key (all are counted)
MIN_SAMPLES_FOR_BAD_FRACTION = 200  # fewer read: too early to judge a fraction


@dataclasses.dataclass(frozen=True)
class StreamPlan:
  """Which shards stream `s` reads, in which order, and its window size."""
  shards: tuple[str, ...]
  streams: int
  window: int
  seed: int

  def shard(self, stream: int, cursor: int) -> str:
    """The shard a stream reads `cursor`-th."""
    epoch, index = divmod(stream + cursor * self.streams, len(self.shards))
    return self.shards[_epoch_order(self.seed, len(self.shards), epoch)[index]]


@functools.lru_cache(maxsize=8)
def _epoch_order(seed: int, num_shards: int, epoch: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch, 0x5A4D]).permutation(num_shards)


def start_positions(streams: int) -> np.ndarray:
  """int64 [streams, len(POSITION_FIELDS)]: every stream at its start."""
  return np.zeros((streams, len(POSITION_FIELDS)), np.int64)


class _ShardReader:
  """Reads a stream's raw samples from (cursor, offset) on, across shards."""

  def __init__(self, plan: StreamPlan, stream: int, cursor: int, offset: int):
    self.plan, self.stream, self.cursor, self.offset = plan, stream, cursor, offset
    self._samples = None
    self._empty_in_a_row = 0

  def take(self, count: int) -> list:
    """The next `count` items: sample dicts or shards.TruncatedShard."""
    items = []
    while len(items) < count:
      if self._samples is None:
        shard = self.plan.shard(self.stream, self.cursor)
        self._samples = shards_lib.read_samples(shard, skip=self.offset)
      item = next(self._samples, None)
      if item is None or isinstance(item, shards_lib.TruncatedShard):
        if item is not None:
          items.append(item)
        self._next_shard(got_any=item is not None or self.offset > 0)
        continue
      items.append(item)
      self.offset += 1
      self._empty_in_a_row = 0
    return items

  def _next_shard(self, got_any: bool):
    self._samples, self.cursor, self.offset = None, self.cursor + 1, 0
    self._empty_in_a_row = 0 if got_any else self._empty_in_a_row + 1
    if self._empty_in_a_row > len(self.plan.shards):
      raise errors.DatasetError(f'no sample in any of the {len(self.plan.shards)} shards '
                                f'(first: {self.plan.shards[0]})')


def stream_elements(plan: StreamPlan, fmt: decode_lib.SampleFormat, stream: int, rows: int,
                    position):
  """Endless elements of one stream from `position`: each `rows` usable
  records {'stream', 'image' [rows, S, S, 3], 'label' [rows], 'caption'
  [rows] (objects, with text), 'position' [6], 'bad' (up to MAX_LISTED_BAD
  'shard key: reason' lines)}."""
  window, cursor, offset, taken, read, skipped = (int(v) for v in position)
  reader = _ShardReader(plan, stream, cursor, offset)
  items = reader.take(plan.window)
  order = _window_order(plan, stream, window)
  while True:
    records, bad = [], []
    while len(records) < rows:
      if taken == len(items):  # the window is used up: the next one starts where reading is
        window, cursor, offset, taken = window + 1, reader.cursor, reader.offset, 0
        items = reader.take(plan.window)
        order = _window_order(plan, stream, window)
      item = items[order[taken]]
      crop_rng = np.random.default_rng([plan.seed, stream, window, taken])
      taken, read = taken + 1, read + 1
      if isinstance(item, shards_lib.TruncatedShard):
        record, why = None, f'truncated shard: {item.reason}'
        where = f'{item.shard} after {item.key}' if item.key else item.shard
      else:
        record, why = decode_lib.decode(item, fmt, crop_rng)
        where = f'{item["__shard__"]} {item["__key__"]}'
      if record is None:
        skipped += 1
        if len(bad) < MAX_LISTED_BAD:
          bad.append(f'{where}: {why}')
        continue
      records.append(record)
    element = {
        'stream': np.int32(stream),
        'image': np.stack([r['image'] for r in records]),
        'label': np.array([r['label'] for r in records], np.int32),
        'position': np.array([window, cursor, offset, taken, read, skipped], np.int64),
        'bad': bad}
    if fmt.text_key:
      element['caption'] = np.array([r['caption'] for r in records], dtype=object)
    yield element


def _window_order(plan: StreamPlan, stream: int, window: int) -> np.ndarray:
  return np.random.default_rng([plan.seed, stream, window, 0x5A4E]).permutation(plan.window)


class _StreamsDataset(grain.IterDataset):
  """Elements of `streams` in turn, one step's rows each; grain's workers
  each take every W-th stream (set_slice)."""

  def __init__(self, plan, fmt, rows, streams, positions):
    super().__init__([])
    self._plan, self._fmt, self._rows = plan, fmt, rows
    self._streams, self._positions = list(streams), dict(zip(streams, positions))

  def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
    del sequential_slice
    self._streams = self._streams[sl]

  def __iter__(self):
    return _StreamsIterator([stream_elements(self._plan, self._fmt, s, self._rows,
                                             self._positions[s]) for s in self._streams])

  def __str__(self):
    return f'_StreamsDataset(streams={self._streams})'


class _StreamsIterator(grain.DatasetIterator):

  def __init__(self, generators):
    super().__init__()
    self._generators, self._count = generators, 0

  def __next__(self):
    element = next(self._generators[self._count % len(self._generators)])
    self._count += 1
    return element

  def get_state(self) -> dict[str, Any]:
    return {'elements': self._count}  # positions travel in the elements themselves

  def set_state(self, state):
    raise NotImplementedError('a stream resumes from the positions it is built with')


def worker_count(local_streams: int, workers: int) -> int:
  """The most workers <= `workers` that divide this process's streams evenly."""
  return max(w for w in range(1, max(1, min(workers, local_streams)) + 1)
             if local_streams % w == 0)


class StreamBatches:
  """This process's rows of every global batch, endlessly: {'image' uint8
  [b, S, S, 3], 'label' int32 [b], and with text 'text' (int32 [b, L] ids
  from `tokenizer`; without one 'captions', a list of str)}.

  `positions` (int64 [local streams, 6]) is where each of this process's
  streams stands after the batches returned so far; `bad` lists the first
  bad samples seen. Raises DatasetError once more than `max_bad_fraction`
  of the samples read are bad.
  """

  def __init__(self, plan: StreamPlan, fmt, *, batch_size: int, process_index: int,
               process_count: int, positions: np.ndarray, workers: int,
               max_bad_fraction: float = 1.0, tokenizer=None):
    local = plan.streams // process_count
    self.streams = list(range(process_index * local, (process_index + 1) * local))
    self.positions = np.array(positions[self.streams[0]:self.streams[-1] + 1], np.int64)
    self.bad: list[str] = []
    self._max_bad_fraction, self._tokenizer = max_bad_fraction, tokenizer
    dataset = _StreamsDataset(plan, fmt, batch_size // plan.streams, self.streams,
                              self.positions)
    self.workers = worker_count(local, workers) if workers else 0
    if self.workers:
      from absl import flags  # pylint: disable=g-import-not-at-top
      if not flags.FLAGS.is_parsed():  # grain's worker start reads its absl flags' defaults
        flags.FLAGS.mark_as_parsed()
      dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=self.workers, per_worker_buffer_size=2))
    self._iterator = iter(dataset)

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    elements = [next(self._iterator) for _ in self.streams]
    got = [int(e['stream']) for e in elements]
    if got != self.streams:  # grain's interleaving is round-robin: a broken promise, not data
      raise RuntimeError(f'stream elements out of order: {got}, expected {self.streams}')
    self.positions = np.stack([e['position'] for e in elements])
    for element in elements:
      self.bad.extend(element['bad'][:MAX_LISTED_BAD - len(self.bad)])
    self._check_bad_fraction()
    batch = {'image': np.concatenate([e['image'] for e in elements]),
             'label': np.concatenate([e['label'] for e in elements])}
    if 'caption' in elements[0]:
      captions = [str(c) for e in elements for c in e['caption']]
      if self._tokenizer is None:
        batch['captions'] = captions
      else:
        batch['text'] = self._tokenizer.encode(captions)
    return batch

  def counts(self) -> tuple[int, int]:
    """(samples read, samples skipped) by this process's streams so far."""
    read, skipped = self.positions[:, 4].sum(), self.positions[:, 5].sum()
    return int(read), int(skipped)

  def _check_bad_fraction(self):
    read, skipped = self.counts()
    if read >= MIN_SAMPLES_FOR_BAD_FRACTION and skipped > self._max_bad_fraction * read:
      raise errors.DatasetError(
          f'{skipped} of the {read} samples read are bad, more than dataset.max_bad_fraction='
          f'{self._max_bad_fraction}; first: {self.bad[0] if self.bad else "?"}')

  def close(self):
    close = getattr(self._iterator, 'close', None)
    if close is not None:
      close()
