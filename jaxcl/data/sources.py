"""Datasets by name as random-access sources of {'image', 'label'} records
(plus 'captions' for image-text training), with their DatasetInfo.

`Dataset` opens the dataset a config's `dataset` group names, once per run;
`load_source` is the one-call form. Importing this module imports the
package's builders (digits, shapes, pairs), which registers them with TFDS.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from jaxcl import errors, presets
from jaxcl.data import (
  catalog,
  decode as decode_lib,
  digits,  # noqa: F401  (registers its TFDS builder)
  naflex,
  pairs,
  shapes,
  shard_sources,
  stream as stream_lib,
)
from jaxcl.data.images import ImageFolderSource
from jaxcl.data.pipeline import train_iterator
from jaxcl.data.tfds_records import TfdsRecords, tfds_builder

DatasetError = errors.DatasetError

EMBEDDED, PAIRS = presets.EMBEDDED_DATASETS, presets.PAIRS


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  image_shape: tuple[int, int, int]  # the stored resolution (H, W, C)
  num_classes: int  # 0 when unlabeled
  class_names: tuple[str, ...] = ()  # the label feature's names, when it has them


DEFAULT_TEMPLATES = ('a photo of a {}.',)


def zeroshot_templates(name: str) -> tuple[str, ...]:
  """The zero-shot prompt templates of dataset `name` ('{}' = class name):
  the embedded shapes' own list, else CLIP's basic 'a photo of a {}.'."""
  if name in ('captioned_shapes', 'captioned_shapes_flex'):
    return tuple(shapes.ZEROSHOT_TEMPLATES)
  return DEFAULT_TEMPLATES


class Dataset:
  """The dataset that `cfg` (the config's `dataset` group) names, opened once.

  The TFDS builder is resolved (and the dataset prepared or converted, when
  that is allowed) on the first `split` call; each (split, with_text) is
  opened once, an image folder's split scanned once, and the same source
  returned again. A call that raises caches nothing.
  """

  def __init__(self, cfg, patch_size: int = 0):
    self.cfg = cfg
    # dataset.resolution='naflex': each split's images as NaFlex patches of the
    # model's patch size at the evaluation budget; the training split's native,
    # for the pipeline to patch at each batch's budget.
    self.patching = naflex.patching(cfg, patch_size)
    self._patch_size = patch_size  # a mixture's sources are opened with it
    self._builder = None
    self._classes = None  # an image folder's classes: its train split's sub-folders
    self._splits = {}  # (split, with_text): (source, DatasetInfo)
    self._first = None  # a mixture's first source, whose splits it evaluates on
    self._training = {}  # with_text: (source, DatasetInfo) of the pretraining split

  def split(self, split: str, with_text: bool = False):
    """(random-access source, DatasetInfo) for `split`.

    with_text: records also carry 'captions' (from the `cfg.text_key`
    feature). Raises DatasetError if the dataset, the split or a feature is
    missing.
    """
    if self.cfg.name == shard_sources.MIXTURE:  # evaluated on its first source's splits
      return self._first_source().split(split, with_text)
    folder = self.cfg.name == 'image_folder'
    key = (split, False if folder else bool(with_text))  # an image folder has no captions
    if key not in self._splits:
      if folder:
        self._splits[key] = self._open_folder(split)
      elif self.cfg.name == shard_sources.NAME:
        self._splits[key] = self._open_shards(split, with_text)
      else:
        self._splits[key] = self._open_tfds(split, with_text)
    return self._splits[key]

  def training(self, with_text: bool = False):
    """(source, DatasetInfo) of the pretraining split: random-access records,
    or for shards and mixtures a jaxcl.data.shard_sources.Stream; opened
    once (the shards listed once, a mixture's sources opened once)."""
    if with_text not in self._training:
      source, info = self._open_training(with_text)
      if isinstance(source, naflex.PatchedSource):
        source = source.records
      self._training[with_text] = source, info
    return self._training[with_text]

  def _open_training(self, with_text: bool):
    cfg = self.cfg
    size = 0 if self.patching else cfg.image_size  # NaFlex: each image at its own size
    info = DatasetInfo((size, size, 3), 0)
    if cfg.name == shard_sources.NAME:
      component = shard_sources.shard_component(cfg, with_text, cfg.urls, 'dataset.urls',
                                                patching=self.patching)
      return shard_sources.Stream(cfg, with_text, [component], [1.0]), info
    if cfg.name != shard_sources.MIXTURE:
      return self.split(cfg.train_split, with_text)
    components, weights = [], []
    for index, (sub, kind, weight) in enumerate(component_configs(cfg)):
      name = f'{index}:{_short_name(sub)}'
      if kind == 'shards':
        components.append(shard_sources.shard_component(
            sub, with_text, sub.urls, f'dataset.mixture[{index}]', name=name,
            patching=self.patching))
      elif kind == 'folder' and with_text:
        raise DatasetError(f'dataset.mixture[{index}] is an image folder: it has no captions '
                           f'for a method with a text tower')
      else:
        source, sub_info = Dataset(sub, self._patch_size).training(with_text)
        if sub_info.image_shape != info.image_shape:
          raise DatasetError(f'dataset.mixture[{index}] ({sub.name}) has images '
                             f'{sub_info.image_shape}, the mixture {info.image_shape}')
        components.append(stream_lib.RecordComponent(name, source, with_text))
      weights.append(weight)
    return shard_sources.Stream(cfg, with_text, components, weights), info

  def missing_split(self, split: str) -> str | None:
    """An optional evaluation split that is absent: an image folder's
    missing folder, a webdataset's test split without dataset.eval_urls;
    None otherwise."""
    if self.cfg.name == shard_sources.MIXTURE:
      return self._first_source().missing_split(split)
    if self.cfg.name == shard_sources.NAME:
      missing = split == 'test' and not self.cfg.eval_urls
      return 'the test split (dataset.eval_urls is empty)' if missing else None
    if self.cfg.name != 'image_folder':
      return None
    folder = epath.Path(self.cfg.path) / split
    return None if folder.is_dir() else str(folder)

  def _first_source(self) -> 'Dataset':
    if self._first is None:
      self._first = Dataset(component_configs(self.cfg)[0][0], self._patch_size)
    return self._first

  def _open_shards(self, split, with_text):
    source = shard_sources.open_split(self.cfg, split, with_text, self.patching)
    # Classes 0..max of the `cls` members; -1 (no cls) is unlabeled, as in TFDS's shapes.
    num_classes = max(int(r['label']) for r in source.records) + 1
    size = self.cfg.image_size
    if self.patching is not None:
      return naflex.PatchedSource(source, self.patching), DatasetInfo((0, 0, 3), num_classes)
    return source, DatasetInfo((size, size, 3), num_classes)

  def opened_splits(self) -> list[tuple[str, object]]:
    """(split, source) of every split opened so far, in opening order (a TFDS
    split opened both with and without text appears twice)."""
    return [(split, source) for (split, _), (source, _) in self._splits.items()]

  def _open_folder(self, split):
    cfg = self.cfg
    if self._classes is None:
      train_root = epath.Path(cfg.path) / cfg.train_split
      if train_root.is_dir():
        self._classes = sorted(p.name for p in train_root.iterdir() if p.is_dir())
    source = ImageFolderSource(str(epath.Path(cfg.path) / split), cfg.image_size, self._classes)
    channels = 3
    return source, DatasetInfo((cfg.image_size, cfg.image_size, channels), len(source.classes),
                               tuple(source.classes))

  def builder(self):
    """The dataset's TFDS builder, prepared: resolved once, then reused."""
    if self._builder is None:
      self._builder = self._prepared_builder()
    return self._builder

  def _prepared_builder(self):
    cfg = self.cfg
    if cfg.name == PAIRS:
      # NaFlex: the images' own bytes, checked at the run's largest budget.
      native = ({'image_size': 0, 'patch_size': self.patching.patch_size,
                 'max_patches': self.patching.eval_budget} if self.patching
                else {'image_size': cfg.image_size})
      try:
        return pairs.prepare_pairs(cfg.path, data_dir=cfg.data_dir,
                                   image_key=cfg.pairs.image_column,
                                   caption_key=cfg.pairs.caption_column,
                                   test_fraction=cfg.pairs.test_fraction, **native)
      except ValueError as e:
        raise DatasetError(str(e)) from None
    builder = tfds_builder(cfg.name, cfg.data_dir)
    if not catalog.is_prepared(builder):
      if cfg.name in EMBEDDED or cfg.download:
        catalog.prepare(builder, cfg.name)
        builder = tfds_builder(cfg.name, cfg.data_dir)  # reads what was prepared
      else:
        raise DatasetError(
            f'TFDS dataset {cfg.name!r} is not prepared in {builder.data_dir_root}; prepare it '
            f'(array_record format) or set --config.dataset.download=True')
    return builder

  def _open_tfds(self, split, with_text):
    cfg = self.cfg
    builder = self.builder()
    # TFDS's split syntax: 'train', 'train[:80%]', 'train[1000:]+test'
    if any(part.split('[')[0].strip() not in builder.info.splits for part in split.split('+')):
      raise DatasetError(f'dataset {cfg.name!r} has no split {split!r} '
                         f'(it has {", ".join(builder.info.splits)})')
    features = builder.info.features
    for key, what in [(cfg.image_key, 'dataset.image_key')] + (
        [(cfg.text_key, 'dataset.text_key')] if with_text else []):
      if key.split('/')[0] not in features:
        raise DatasetError(f'dataset {cfg.name!r} has no feature {key!r} ({what}); '
                           f'it has {", ".join(features.keys())}')
    image_feature = features[cfg.image_key]
    # Encoded images: TFDS's Image feature, or a native pairs file's scalar bytes.
    encoded = isinstance(image_feature, tfds.features.Image) or (
        image_feature.shape == () and image_feature.np_dtype == np.object_)
    shape = (None, None, 3) if image_feature.shape == () else tuple(image_feature.shape)
    if len(shape) == 2:
      shape = (*shape, 1)
    if self.patching is not None:  # each image at its own size
      shape = (0, 0, shape[-1])
    elif cfg.image_size:
      shape = (cfg.image_size, cfg.image_size, shape[-1])
    if None in shape:
      raise DatasetError(f'{cfg.name!r} images have no fixed size {shape}; set dataset.image_size')
    label = features[cfg.label_key] if cfg.label_key in features else None
    num_classes = getattr(label, 'num_classes', 0) or 0
    names = tuple(getattr(label, 'names', None) or ()) if num_classes else ()
    decode = workers = None
    image_size = 0 if self.patching is not None else cfg.image_size
    if encoded:  # decoded by jaxcl, not TFDS
      # A curated dataset (or a pairs file, checked when converted): every image
      # is used, however small (as TFDS's own decode would).
      decode = decode_lib.SampleFormat(image_size=image_size, channels=shape[-1],
                                       reject_small=False,
                                       crop=decode_lib.evaluation_crop(cfg.crop))
      workers = shard_sources.host_cores() if cfg.workers < 0 else cfg.workers
      skip = ({cfg.image_key: tfds.decode.SkipDecoding()}
              if isinstance(image_feature, tfds.features.Image) else None)
      data_source = builder.as_data_source(split=split, decoders=skip)
    else:
      data_source = builder.as_data_source(split=split)
    source = TfdsRecords(data_source, cfg.image_key, cfg.label_key, image_size,
                         text_key=cfg.text_key if with_text else None, decode=decode,
                         workers=workers or 0, where=f'{cfg.name} {split}')
    if self.patching is not None:
      source = naflex.PatchedSource(source, self.patching)
    return source, DatasetInfo(shape, num_classes, names)


def component_configs(cfg) -> list:
  """[(dataset group, kind, weight)] of a mixture's sources (dataset.mixture):
  each a copy of `cfg` naming one source, read at the mixture's image_size
  (the first, when it is shards, with dataset.eval_urls as its test split)."""
  configs = []
  for index, (kind, what, weight) in enumerate(shard_sources.parse_mixture(cfg.mixture)):
    sub = cfg.copy_and_resolve_references()
    sub.mixture = ()
    if kind == 'shards':  # the first keeps dataset.eval_urls: a mixture evaluates on its splits
      sub.update(name=shard_sources.NAME, urls=what,
                 eval_urls=cfg.eval_urls if index == 0 else '')
    elif kind == 'pairs':
      sub.update(name=PAIRS, path=what)
    elif kind == 'folder':
      sub.update(name='image_folder', path=what)
    else:
      sub.name = what
    configs.append((sub, kind, weight))
  return configs


def _short_name(cfg) -> str:
  """A mixture source's name in the log and metrics: the TFDS name, or the
  file or folder of a pairs file, an image folder or shards."""
  if cfg.name == shard_sources.NAME:
    return epath.Path(shard_sources.shards_lib.expand_urls(cfg.urls)[0]).parent.name
  if cfg.name in (PAIRS, 'image_folder'):
    return epath.Path(cfg.path).stem
  return cfg.name


def load_source(cfg, split: str, with_text: bool = False):
  """(random-access source, DatasetInfo) for `split` of the dataset `cfg` names.

  cfg: the config's `dataset` group. with_text: records also carry
  'captions' (from the `cfg.text_key` feature). Raises DatasetError if the
  dataset, the split or a feature is missing. Opens the dataset anew at
  every call: a run that reads several splits opens one `Dataset`.
  """
  return Dataset(cfg).split(split, with_text)


def train_batches(source, *, batch_size: int, seed: int, process_index: int, process_count: int,
                  transform=None, tokenizer=None, start_record: int = 0, start_batch: int = 0,
                  start_step: int = 0, stream_positions=None, patching=None):
  """This process's rows of every global batch from the training `source`
  (Dataset.training): for records, `train_iterator` (its position follows
  from start_record and start_batch; encoded TFDS images are decoded in the
  source's worker processes); for shards, a StreamBatches from
  `stream_positions` (saved with the checkpoint; None: the start), which
  tokenizes its captions with `tokenizer`."""
  if isinstance(source, shard_sources.Stream):
    return source.batches(batch_size=batch_size, seed=seed, process_index=process_index,
                          process_count=process_count, positions=stream_positions,
                          start_step=start_step, tokenizer=tokenizer, patching=patching)
  return train_iterator(source, batch_size=batch_size, seed=seed, process_index=process_index,
                        process_count=process_count, transform=transform,
                        start_record=start_record, start_batch=start_batch,
                        workers=getattr(source, 'workers', 0), patching=patching)


def known_size(source) -> int | None:
  """Examples of a training source; None for a stream of shards."""
  return None if isinstance(source, shard_sources.Stream) else len(source)


def describe_size(source) -> str:
  """The training source's size for the run's first line."""
  size = known_size(source)
  return source.describe() if size is None else str(size)
