"""The ``webdataset`` dataset: shards named by ``dataset.urls`` (training,
streamed) and ``dataset.eval_urls`` (held out, read once into memory); and
the streamed training split of a ``mixture``.

- `Stream`: the training split, also of a ``mixture`` of shards, TFDS
  datasets, pairs files and image folders (``dataset.mixture``). It has no
  length and no random access; `batches` returns a
  jaxcl.data.stream.StreamBatches from saved positions.
- `ShardSamples`: a split held in memory as a random-access source of
  {'image', 'label', 'captions'} records, center-cropped: 'test' is every
  sample of eval_urls, 'train' (SimCLR's kNN bank and probe) the first
  ``dataset.eval_samples`` of the training shards. Bad samples are skipped
  and listed in `skipped`, like an image folder's unreadable files.

Imports jaxcl.data.shards, decode, stream.
"""

from __future__ import annotations

import dataclasses
import os

from jaxcl import errors
from jaxcl.data import decode as decode_lib, shards as shards_lib, stream as stream_lib

NAME = 'webdataset'
MIXTURE = 'mixture'
# Streams per process by default: enough to keep the workers of a large host
# busy (each worker decodes whole streams), few enough to keep each stream's
# window (shuffle_buffer / streams) useful.
STREAMS_PER_PROCESS = 64
TRAIN, TEST = 'train', 'test'


def sample_format(cfg, with_text: bool, crop: str = 'center', patching=None,
                  training: bool = False) -> decode_lib.SampleFormat:
  """How the samples decode: at dataset.image_size, or for NaFlex
  (`patching`, a jaxcl.data.naflex.Patching) at their own size, checked at
  its largest budget."""
  keys = cfg.webdataset
  return decode_lib.SampleFormat(
      image_size=0 if patching else cfg.image_size,
      image_keys=tuple(k for k in keys.image.split(';') if k),
      text_key=keys.text if with_text else None, label_key=keys.label, crop=crop,
      crop_scale=tuple(cfg.crop_scale),
      naflex=(patching.patch_size, patching.eval_budget) if patching else None,
      naflex_draft=training)


def host_cores() -> int:
  return os.cpu_count() or 1


class Stream:
  """The training split of a webdataset (one shard component) or a mixture
  (components with weights), as streams: no length, no random access;
  `batches` returns a jaxcl.data.stream.StreamBatches from saved positions."""

  def __init__(self, cfg, with_text: bool, components: list, weights: list[float]):
    self.cfg, self.with_text = cfg, with_text
    self.components, self.weights = tuple(components), tuple(weights)
    self.names = tuple(c.name for c in components)

  def describe(self) -> str:
    if len(self.components) > 1:
      return 'a mixture of ' + ', '.join(f'{name} ({weight:g})' for name, weight
                                          in zip(self.names, self.weights)) + ', streamed'
    shards = self.components[0].shards
    size = sum(shards_lib.sizes(list(shards)).values())
    return f'{len(shards)} shards ({f"{size} samples" if size else "samples uncounted"}), streamed'

  def workers(self) -> int:
    return host_cores() if self.cfg.workers < 0 else self.cfg.workers

  def default_streams(self, batch_size: int, process_count: int) -> int:
    """dataset.streams, or (0) per process the most streams up to
    STREAMS_PER_PROCESS (and up to its share of the shards) that divide its
    rows: never the host's cores, so that the batches do not depend on the
    machine."""
    if self.cfg.streams:
      return self.cfg.streams
    check_streams(0, self.fewest_shards(), process_count)
    most = min([STREAMS_PER_PROCESS] + [len(c.shards) // process_count for c in self.components
                                        if isinstance(c, stream_lib.ShardComponent)])
    return process_count * stream_lib.worker_count(batch_size // process_count, most)

  def fewest_shards(self) -> int | None:
    """The fewest shards of a shard source: the most streams there can be
    without two starting on one shard (duplicate rows in a batch)."""
    counts = [len(c.shards) for c in self.components if isinstance(c, stream_lib.ShardComponent)]
    return min(counts, default=None)

  def batches(self, *, batch_size: int, seed: int, process_index: int, process_count: int,
              positions=None, start_step: int = 0, tokenizer=None,
              patching=None) -> stream_lib.StreamBatches:
    """This process's batches from step `start_step`; `positions` [S,
    components, 7] where the streams stand (None: a fresh run, S from
    default_streams); patching: NaFlex patches at each step's budget."""
    if positions is None:
      positions = stream_lib.start_positions(self.default_streams(batch_size, process_count),
                                             len(self.components))
    streams = len(positions)
    if positions.shape[1] != len(self.components):
      raise errors.ConfigError(f'the run read {positions.shape[1]} data source(s); the config '
                               f'names {len(self.components)}')
    check_streams(streams, self.fewest_shards(), process_count)
    if streams % process_count or batch_size % streams:
      raise errors.ConfigError(
          f'the run reads {streams} data streams: the number of processes ({process_count}) '
          f'must divide it and it must divide the global batch ({batch_size})')
    window = max(1, self.cfg.shuffle_buffer // streams)
    components = tuple(dataclasses.replace(c, window=window)
                       if isinstance(c, stream_lib.ShardComponent) else c
                       for c in self.components)
    mixture = stream_lib.Mixture(components, self.weights, streams, seed, self.with_text,
                                 patching)
    return stream_lib.StreamBatches(mixture, batch_size=batch_size,
                                    process_index=process_index, process_count=process_count,
                                    positions=positions, start_step=start_step,
                                    workers=self.workers(), tokenizer=tokenizer)


def check_streams(streams: int, shards: int | None, process_count: int) -> None:
  """Raises ConfigError when `streams` streams (0: as default_streams
  chooses) cannot read `shards` shards (None: no shard source) over
  `process_count` processes without two of them reading one shard."""
  if shards is None:
    return
  if streams > shards:
    raise errors.ConfigError(f'{streams} data streams read {shards} shards: some would read '
                             f'the same shard at once (the same rows twice in a batch); set '
                             f'dataset.streams to at most {shards}, or write smaller shards')
  if shards < process_count:
    raise errors.ConfigError(f'{shards} shard(s) for {process_count} processes: each process '
                             f'needs shards of its own')


def shard_component(cfg, with_text: bool, urls: str, what: str, name: str = 'shards',
                    patching=None) -> stream_lib.ShardComponent:
  """The shards `urls` names (checked to exist) as a stream component
  (`patching`: a NaFlex run's, whose images keep their size)."""
  shards = shards_lib.expand_urls(urls)
  shards_lib.check_shards(shards, what)
  fmt = sample_format(cfg, with_text, cfg.crop, patching, training=True)
  return stream_lib.ShardComponent(name, tuple(shards), fmt)


def parse_mixture(entries) -> list[tuple[str, str, float]]:
  """dataset.mixture entries 'SOURCE=WEIGHT' -> [(kind, what, weight)]:
  kind 'shards' (what: urls), 'pairs' (a pairs file), 'folder' (an image
  folder) or 'tfds' (what: the dataset's name). Raises ConfigError."""
  parsed = []
  for entry in entries:
    spec, _, weight = str(entry).rpartition('=')
    try:
      weight = float(weight)
    except ValueError:
      weight = -1.0
    if not spec or not weight > 0:
      raise errors.ConfigError(f"dataset.mixture entry {entry!r} is not 'SOURCE=WEIGHT' with a "
                               f"weight > 0 (SOURCE: shards:URLS, pairs:FILE, folder:PATH or a "
                               f"TFDS name)")
    kind, _, what = spec.partition(':')
    if kind not in MIXTURE_KINDS:
      kind, what = 'tfds', spec
    parsed.append((kind, what, weight))
  return parsed


MIXTURE_KINDS = ('shards', 'pairs', 'folder')


class ShardSamples:
  """Up to `limit` samples (0: all) of `shards` in file order, decoded and
  center-cropped, in memory."""

  def __init__(self, shards: list[str], fmt: decode_lib.SampleFormat, limit: int = 0):
    self.records, self.skipped = [], []
    for shard in shards:
      for sample in shards_lib.read_samples(shard):
        if isinstance(sample, shards_lib.BadShard):
          self.skipped.append((sample.where, sample.why))
          continue
        record, why = decode_lib.decode(sample, fmt)
        if record is None:
          self.skipped.append((f'{shard} {sample["__key__"]}', why))
          continue
        caption = record.pop('caption', None)
        record['captions'] = [caption] if caption is not None else []
        self.records.append(record)
        if limit and len(self.records) == limit:
          return
    if not self.records:
      reason = f'; first bad: {self.skipped[0][0]}: {self.skipped[0][1]}' if self.skipped else ''
      raise errors.DatasetError(f'no usable sample in {len(shards)} shard(s) (first: '
                                f'{shards[0]}){reason}')

  def __len__(self):
    return len(self.records)

  def __getitem__(self, index):
    return self.records[index]


def open_split(cfg, split: str, with_text: bool, patching=None) -> ShardSamples:
  """The in-memory evaluation split `split` ('train' or 'test') of `cfg`
  (`patching`: a NaFlex run's, whose images keep their size)."""
  if split == TEST:
    urls, what, limit = cfg.eval_urls, 'dataset.eval_urls', 0
  elif split == TRAIN:
    urls, what, limit = cfg.urls, 'dataset.urls', cfg.eval_samples
  else:
    raise errors.DatasetError(f"a webdataset has splits 'train' (dataset.urls) and 'test' "
                              f"(dataset.eval_urls), not {split!r}")
  shards = shards_lib.expand_urls(urls)
  shards_lib.check_shards(shards, what)
  fmt = sample_format(cfg, with_text, decode_lib.evaluation_crop(cfg.crop), patching)
  return ShardSamples(shards, fmt, limit)
