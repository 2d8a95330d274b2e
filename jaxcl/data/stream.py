"""Streams: the global batch of shard datasets and mixtures, exact,
resumable, split across processes, decoded in grain worker processes.

The global batch is made of S streams (`Mixture.streams`), each giving
B / S rows per step, stream 0's rows first. At each step a stream draws one
of the mixture's components by their weights (a pure function of seed, step
and stream; one component: no draw) and takes its rows from its own stream
of that component:

- shards (`ShardComponent`): stream s reads the shards at positions s,
  s + S, ... of an endless shard sequence (every epoch of the shard list in
  its own seeded order), cut into windows of `window` samples
  (dataset.shuffle_buffer / S) taken in a seeded order;
- records (`RecordComponent`, TFDS / pairs / folders): stream s reads the
  records at positions s, s + S, ... of the seeded epoch orders.

Bad samples are skipped and counted; a shard that stops being readable
counts as the samples it holds past those read (shards.estimated_samples).
A stream's position in a component is
seven integers (`POSITION_FIELDS`: window number, the shard cursor and
sample offset where that window starts, samples of it taken; samples read,
skipped; rows given), so a stream's output depends only on (seed, S, step,
its positions), and:

- process p of P reads streams [p S/P, (p+1) S/P): its own shards only, and
  its rows of the global batch, which is the same whatever P divides S;
- the trainer saves the positions with each checkpoint; a resumed run, with
  any P that divides S, continues every stream exactly where it stopped.

Each element grain produces is one stream's rows for one step, decoded and
cropped in a worker (`dataset.workers` processes, each owning every W-th of
this process's streams; grain interleaves them back in stream order).

Imports jaxcl.data.shards, decode and pipeline.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import grain
import numpy as np
from grain.experimental import index_shuffle
from grain.python import SharedMemoryArray

from jaxcl import errors
from jaxcl.data import decode as decode_lib, pipeline, shards as shards_lib

POSITION_FIELDS = ('window', 'cursor', 'offset', 'taken', 'read', 'skipped', 'rows')
READ, SKIPPED, ROWS = 4, 5, 6
MAX_LISTED_BAD = 20  # bad samples listed by shard and key (all are counted)
MIN_SAMPLES_FOR_BAD_FRACTION = 200  # fewer read: too early to judge a fraction
MAX_BAD_IN_A_ROW = 1000  # a stream stops, whatever max_bad_fraction allows


@functools.lru_cache(maxsize=4)
def _order(seed: int, salt: int, size: int, epoch: int) -> np.ndarray:
  """The seeded order of epoch `epoch` of `size` shards."""
  return np.random.default_rng([seed, salt, epoch, 0x5A4D]).permutation(size)


@functools.lru_cache(maxsize=4)
def _epoch_seed(seed: int, salt: int, epoch: int) -> int:
  return int(np.random.SeedSequence([seed, salt, epoch, 0x5A50]).generate_state(1)[0] >> 1)


@dataclasses.dataclass(frozen=True)
class ShardComponent:
  """Webdataset shards read as streams: stream s of S reads the shards at
  positions s, s + S, ... of the endless sequence of seeded epoch orders,
  in windows of `window` samples taken in a seeded order."""
  name: str
  shards: tuple[str, ...]
  format: decode_lib.SampleFormat
  window: int = 1

  def shard(self, seed: int, salt: int, streams: int, stream: int, cursor: int) -> str:
    """The shard that stream `stream` reads `cursor`-th."""
    epoch, index = divmod(stream + cursor * streams, len(self.shards))
    return self.shards[_order(seed, salt, len(self.shards), epoch)[index]]

  def records(self, seed: int, salt: int, streams: int, stream: int, position):
    """Endless (record or None, 'where: why' or None, position after: its
    first 6 fields) from `position`; record: {'image', 'label', 'caption'
    (with text)}."""
    window, cursor, offset, taken, read, skipped = (int(v) for v in position[:ROWS])
    reader = _ShardReader(self, (seed, salt, streams, stream), cursor, offset)
    items, order = reader.take(self.window), self._window_order(seed, salt, stream, window)
    while True:
      if taken == len(items):  # the window is used up: the next one starts where reading is
        window, cursor, offset, taken = window + 1, reader.cursor, reader.offset, 0
        items, order = reader.take(self.window), self._window_order(seed, salt, stream, window)
      item = items[order[taken]]
      crop_rng = np.random.default_rng([seed, salt, stream, window, taken])
      if isinstance(item, shards_lib.BadShard):  # counts as the samples it holds unread
        record, why, where, count = None, item.why, item.where, item.samples
        why += f'; counted as {count} bad sample{"s" if count > 1 else ""}'
      else:
        record, why = decode_lib.decode(item, self.format, crop_rng)
        where, count = f'{item["__shard__"]} {item["__key__"]}', 1
      taken, read = taken + 1, read + count
      skipped += count if record is None else 0
      yield record, None if record else f'{where}: {why}', (
          window, cursor, offset, taken, read, skipped)

  def _window_order(self, seed, salt, stream, window) -> np.ndarray:
    return np.random.default_rng([seed, salt, stream, window, 0x5A4E]).permutation(self.window)


@dataclasses.dataclass(frozen=True)
class RecordComponent:
  """A random-access source ({'image', 'label', 'captions'} records: TFDS,
  a converted pairs file, an image folder) read as streams: stream s of S
  reads the records at positions s, s + S, ... of the endless sequence of
  seeded epoch orders (a global shuffle); its position is the count read."""
  name: str
  source: Any
  with_text: bool

  def records(self, seed: int, salt: int, streams: int, stream: int, position):
    read, skipped = (int(v) for v in position[READ:ROWS])
    size = len(self.source)
    while True:
      epoch, index = divmod(stream + read * streams, size)
      # A permutation computed per index: nothing held, whatever the source's size.
      record_index = int(index_shuffle(index, max_index=size - 1,
                                       seed=_epoch_seed(seed, salt, epoch), rounds=4))
      caption_rng = np.random.default_rng([seed, salt, stream, read])
      read += 1
      try:
        record, why = dict(self.source[record_index]), None
      except errors.DatasetError as e:  # an encoded image that does not decode
        record, why = None, str(e)
      if record is not None and self.with_text:
        captions = record.pop('captions', [])
        if captions:
          record['caption'] = captions[caption_rng.integers(len(captions))]
        else:
          record, why = None, 'no caption'
      skipped += record is None
      yield record, None if record else f'{self.name} record {record_index}: {why}', (
          0, 0, 0, 0, read, skipped)


@dataclasses.dataclass(frozen=True)
class Mixture:
  """The global batch's S streams over one or more components: at each step
  each stream draws its component by the weights (seeded by step and
  stream) and gives B / S rows of it. One component: no draw."""
  components: tuple
  weights: tuple[float, ...]
  streams: int
  seed: int
  with_text: bool
  patching: Any = None  # jaxcl.data.naflex.Patching: images as patches at each step's budget

  def choose(self, stream: int, step: int) -> int:
    if len(self.components) == 1:
      return 0
    p = np.asarray(self.weights, np.float64)
    rng = np.random.default_rng([self.seed, step, stream, 0x5A4F])
    return int(rng.choice(len(p), p=p / p.sum()))


def start_positions(streams: int, components: int = 1) -> np.ndarray:
  """int64 [streams, components, len(POSITION_FIELDS)]: every stream at its start."""
  return np.zeros((streams, components, len(POSITION_FIELDS)), np.int64)


class _ShardReader:
  """Reads a stream's raw samples from (cursor, offset) on, across shards."""

  def __init__(self, component: ShardComponent, where: tuple, cursor: int, offset: int):
    self.component, self.where, self.cursor, self.offset = component, where, cursor, offset
    self._samples = self._shard = None

  def take(self, count: int) -> list:
    """The next `count` items: sample dicts, or a shards.BadShard for each
    shard that stops being readable (standing for its samples not read)."""
    items = []
    while len(items) < count:
      if self._samples is None:
        self._shard = self.component.shard(*self.where, self.cursor)
        self._samples = shards_lib.read_samples(self._shard, skip=self.offset)
      item = next(self._samples, None)
      if item is None or isinstance(item, shards_lib.BadShard):
        if item is not None:
          items.append(dataclasses.replace(item, samples=self._unread(item)))
        self._samples, self.cursor, self.offset = None, self.cursor + 1, 0
        continue
      items.append(item)
      self.offset += 1
    return items

  def _unread(self, bad: shards_lib.BadShard) -> int:
    """The samples of the current shard past the `offset` read (an empty
    one: none; it counts once): a function of the shards alone, so that a
    resumed stream counts as the first did."""
    if bad.problem == shards_lib.NO_SAMPLE:
      return 1
    shards = self.component.shards
    return max(1, shards_lib.estimated_samples(self._shard, shards) - self.offset)


def stream_elements(mixture: Mixture, stream: int, rows: int, positions, start_step: int,
                    shared_memory: bool = False):
  """Endless elements of one stream, one per step from `start_step`, from
  `positions` (int64 [components, 7]): `rows` usable records {'stream',
  'image' [rows, S, S, C], 'label' [rows], 'caption' [rows] (objects, with
  text), 'positions' [components, 7], 'bad' (up to MAX_LISTED_BAD 'where:
  why' lines)}. shared_memory: images stacked straight into shared memory,
  which grain hands to the training process without a copy."""
  positions = np.array(positions, np.int64)
  generators = [None] * len(mixture.components)
  step, bad_in_a_row = start_step, 0
  while True:
    chosen = mixture.choose(stream, step)
    if generators[chosen] is None:
      generators[chosen] = mixture.components[chosen].records(
          mixture.seed, chosen, mixture.streams, stream, positions[chosen])
    records, bad = [], []
    while len(records) < rows:
      record, why, after = next(generators[chosen])
      positions[chosen, :ROWS] = after
      if record is None:
        if len(bad) < MAX_LISTED_BAD:
          bad.append(why)
        bad_in_a_row += 1
        if bad_in_a_row == MAX_BAD_IN_A_ROW:  # the data, or its keys, are wrong: not a few rows
          raise errors.DatasetError(f'the last {MAX_BAD_IN_A_ROW} samples read were all bad '
                                    f'({mixture.components[chosen].name}); the last: {why}')
        continue
      bad_in_a_row = 0
      records.append(record)
    positions[chosen, ROWS] += rows
    if mixture.patching is not None:  # one budget for the global batch of this step
      budget = mixture.patching.batch_budget(mixture.seed, step)
      records = [mixture.patching.patched(r, budget) for r in records]
    element = {
        'stream': np.int32(stream),
        'image': _stack([r['image'] for r in records], shared_memory),
        'label': np.array([r['label'] for r in records], np.int32),
        'positions': positions.copy(),
        'bad': bad}
    if mixture.with_text:
      element['caption'] = np.array([r['caption'] for r in records], dtype=object)
    yield element
    step += 1


def _stack(images: list, shared_memory: bool):
  if isinstance(images[0], dict):  # NaFlex: the patches (in shared memory) and the grids
    return {'patches': _stack([i['patches'] for i in images], shared_memory),
            'grid': np.stack([i['grid'] for i in images])}
  if not shared_memory:
    return np.stack(images)
  return np.stack(images, out=SharedMemoryArray((len(images), *images[0].shape), np.uint8))


class _StreamsDataset(grain.IterDataset):
  """Elements of `streams` in turn, one step's rows each; grain's workers
  each take every W-th stream (set_slice)."""

  def __init__(self, mixture, rows, streams, positions, start_step):
    super().__init__([])
    self._mixture, self._rows, self._start_step = mixture, rows, start_step
    self._streams, self._positions = list(streams), dict(zip(streams, positions))
    self._shared_memory = False

  def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
    del sequential_slice
    self._streams = self._streams[sl]

  def enable_shared_memory_output(self) -> None:  # grain calls it in its workers
    self._shared_memory = True

  def __iter__(self):
    return _StreamsIterator([stream_elements(self._mixture, s, self._rows, self._positions[s],
                                             self._start_step, self._shared_memory)
                             for s in self._streams])

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
  [b, S, S, C], 'label' int32 [b], and with text 'text' (int32 [b, L] ids
  from `tokenizer`, and a teacher's ids under its key with a dict of
  tokenizers: jaxcl.data.pipeline.tokenized; without one 'captions', a
  list of str)}.

  `positions` (int64 [local streams, components, 7]) is where each of this
  process's streams stands after the batches returned so far; `bad` lists
  the first bad samples seen (the trainer judges their fraction over all
  processes: jaxcl.workdir.run_files.stream_metrics). A stream whose last
  MAX_BAD_IN_A_ROW samples were all bad raises DatasetError.
  """

  def __init__(self, mixture: Mixture, *, batch_size: int, process_index: int,
               process_count: int, positions: np.ndarray, start_step: int = 0, workers: int = 0,
               tokenizer=None):
    local = mixture.streams // process_count
    self.streams = list(range(process_index * local, (process_index + 1) * local))
    self.positions = np.array(positions[self.streams[0]:self.streams[-1] + 1], np.int64)
    self.bad: list[str] = []
    self.names = tuple(c.name for c in mixture.components)
    self._tokenizer = tokenizer
    dataset = _StreamsDataset(mixture, batch_size // mixture.streams, self.streams,
                              self.positions, start_step)
    self.workers = worker_count(local, workers) if workers else 0
    self._iterator = iter(pipeline.in_workers(dataset, self.workers))

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    elements = [next(self._iterator) for _ in self.streams]
    got = [int(e['stream']) for e in elements]
    if got != self.streams:  # grain's interleaving is round-robin: a broken promise, not data
      raise RuntimeError(f'stream elements out of order: {got}, expected {self.streams}')
    self.positions = np.stack([e['positions'] for e in elements])
    for element in elements:
      self.bad.extend(element['bad'][:MAX_LISTED_BAD - len(self.bad)])
    images = [e['image'] for e in elements]
    batch = {'image': ({key: np.concatenate([i[key] for i in images]) for key in images[0]}
                       if isinstance(images[0], dict) else np.concatenate(images)),
             'label': np.concatenate([e['label'] for e in elements])}
    if 'caption' in elements[0]:
      captions = [str(c) for e in elements for c in e['caption']]
      if self._tokenizer is None:
        batch['captions'] = captions
      else:
        batch.update(pipeline.tokenized(self._tokenizer, captions))
    return batch

  def counts(self) -> np.ndarray:
    """int64 [3, components]: samples read, skipped and rows given by this
    process's streams so far, per component."""
    return self.positions[:, :, READ:].sum(axis=0).T

  def close(self):
    close = getattr(self._iterator, 'close', None)
    if close is not None:
      close()
