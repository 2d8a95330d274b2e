"""eval.zeroshot and eval.retrieval: the standard benchmark suite a two-tower
run is evaluated on at every evaluation, beside its own zero-shot and
retrieval; `jaxcl eval --zeroshot A,B --retrieval C` replaces the lists for
one call (the saved config is unchanged).

An entry is a string, as in big_vision's and clip_benchmark's dataset names:

- ``NAME[:SPLIT]``: a TFDS dataset, read from dataset.data_dir ('cifar10',
  'cifar100', 'imagenet2012', 'imagenet_v2/matched-frequency',
  'imagenet2012:validation[:10%]'; a version goes with the name,
  'cifar10:3.0.2:test'). Zero-shot reads its 'image' and 'label' features;
  retrieval its 'image' and its captions (coco_captions: 'captions/text',
  else dataset.text_key). Default split: 'validation' for imagenet2012 (its
  test split has no labels), else 'test', else 'validation' (then 'val').
- ``folder:PATH`` (zero-shot only): an image folder, PATH/CLASS/*.png|jpg;
  the class folders, sorted, are the labels 0, 1, ... (one with no image is
  refused: its class would be a candidate no image has).

Zero-shot class names and prompt templates: with a suffix ``=LIST`` (one of
jaxcl.evaluation.zeroshot_lists.NAMES: 'folder:/data/imagenet/val=imagenet',
'folder:/data/cifar=cifar10') that shipped list's, in label order; without
one, the list jaxcl ships for the TFDS dataset (zeroshot_lists.for_dataset:
the ImageNet and CIFAR families), else the label feature's names (a folder's
class folder names) and the dataset's default templates ('a photo of a {}.').
Images are center-cropped and resized to augment.image_size where the dataset
has no fixed size (an image folder: always), then go through the same
evaluation view as every evaluation (jaxcl.data.augment.eval_view).

Results: 'zeroshot/KEY/top1', 'zeroshot/KEY/top5' (top-5 with 5 classes or
more) and 'retrieval/KEY/i2t_r1' ... 't2i_r10', KEY the entry without its
'=LIST' (a folder's: its folder name). Nothing is downloaded: a TFDS dataset
must be prepared (or dataset.download set), which `check` checks before
anything is compiled.

Parsing imports no jax or TFDS; opening imports jaxcl.data.
"""

from __future__ import annotations

import dataclasses
import re
import sys

import ml_collections
from etils import epath

from jaxcl import errors
from jaxcl.errors import ConfigError
from jaxcl.evaluation import zeroshot_lists

FOLDER = 'folder:'
GROUPS = ('zeroshot', 'retrieval')  # the eval.* lists
# TFDS datasets whose labeled evaluation split is not 'test'.
DEFAULT_SPLITS = {'imagenet2012': 'validation', 'imagenet2012_real': 'validation',
                  'imagenet2012_subset': 'validation'}
# Image-text TFDS datasets whose captions are not in dataset.text_key's feature.
TEXT_KEYS = {'coco_captions': 'captions/text'}
# NAME (a TFDS name, /config, :version) then :SPLIT (which may hold ':' in a slice).
_TFDS_ENTRY = re.compile(r'^(?P<name>[A-Za-z0-9_][\w/.-]*(?::\d+\.[\d*]+\.[\d*]+)?)'
                         r'(?::(?P<split>.+))?$')
PREPARE = ("prepare it once in array_record format where TensorFlow and the network are "
           "(tfds.builder('{name}', file_format='array_record').download_and_prepare(); "
           "see docs/datasets.md) or set dataset.download=True")


@dataclasses.dataclass(frozen=True)
class Entry:
  group: str  # 'zeroshot' or 'retrieval'
  spec: str  # as the user wrote it
  key: str  # the results' name: GROUP/KEY/METRIC
  name: str = ''  # a TFDS dataset (with /config and :version), or ''
  split: str = ''  # '': the default split
  path: str = ''  # an image folder, or ''
  list_name: str = ''  # a shipped list (zeroshot_lists.NAMES), or ''

  @property
  def what(self) -> str:
    return f'eval.{self.group} {self.spec!r}'


def parse(spec, group: str = 'zeroshot') -> Entry:
  """An entry of eval.`group`, or ConfigError saying what is wrong with it."""
  if not isinstance(spec, str) or not spec.strip():
    raise ConfigError(f'eval.{group} entries must be non-empty strings, got {spec!r}')
  text, list_name, what = spec.strip(), '', f'eval.{group} {spec!r}'
  head, sep, tail = text.rpartition('=')
  if sep and '/' not in tail and group == 'zeroshot':  # '=/x' is part of a folder's path
    if tail not in zeroshot_lists.NAMES:
      raise ConfigError(f'{what}: unknown zero-shot list {tail!r} '
                        f'(jaxcl ships {", ".join(zeroshot_lists.NAMES)})')
    text, list_name = head, tail
  if text.startswith(FOLDER):
    if group != 'zeroshot':
      raise ConfigError(f'{what}: {group} reads TFDS image-text datasets, not image folders')
    path = text[len(FOLDER):]
    key = path.rstrip('/').rsplit('/', 1)[-1]
    if not key:
      raise ConfigError(f"{what}: 'folder:' needs a folder path")
    return Entry(group, spec=spec, key=key, path=path, list_name=list_name)
  match = _TFDS_ENTRY.match(text)
  if not match:
    kinds = (" or an image folder ('folder:PATH')" if group == 'zeroshot' else '')
    raise ConfigError(f'{what} is not a TFDS dataset (NAME or NAME:SPLIT){kinds}')
  return Entry(group, spec=spec, key=text, name=match['name'], split=match['split'] or '',
               list_name=list_name)


def parse_all(specs, group: str = 'zeroshot') -> list[Entry]:
  """The entries of eval.`group` (a list of strings); ConfigError for a bad
  one or two with the same results key."""
  if not isinstance(specs, (list, tuple)):
    raise ConfigError(f'eval.{group} must be a list of dataset names, got {specs!r}')
  entries, seen = [parse(s, group) for s in specs], {}
  for entry in entries:
    if entry.key in seen:
      raise ConfigError(f'eval.{group} {seen[entry.key]!r} and {entry.spec!r} would both '
                        f'report as {group}/{entry.key}; keep one (rename a folder)')
    seen[entry.key] = entry.spec
  return entries


def check(config, text_tower: bool, check_data: bool) -> None:
  """ConfigError for the first entry of eval.zeroshot or eval.retrieval
  that is malformed or, with check_data, names a dataset that is not there."""
  for group in GROUPS:
    entries = parse_all(config.eval[group], group)
    if entries and not text_tower:
      raise ConfigError(f'eval.{group} needs a text tower (clip, siglip); {config.method} has '
                        f'none')
    for entry in entries if check_data else ():
      if entry.path:
        _check_folder(entry)
      else:
        _tfds_builder(entry, config.dataset)


def _check_folder(entry: Entry) -> None:
  """ConfigError unless the entry's folder has class sub-folders, each with
  an image: an empty one would add a class no image has to the candidates."""
  from jaxcl.data import images  # noqa: PLC0415  (TFDS: not on `jaxcl --help`)
  folder = epath.Path(entry.path)
  errors.check(folder.is_dir(), f'{entry.what}: {folder} is not a folder')
  classes = images.class_folders(folder)
  errors.check(bool(classes), f'{entry.what}: {folder} has no class sub-folders (it needs '
                              f'CLASS/*.png)')
  try:
    images.check_classes_have_images(folder, classes)
  except errors.DatasetError as e:
    raise ConfigError(f'{entry.what}: {e}') from None


def _tfds_builder(entry: Entry, d):
  """The entry's TFDS builder; ConfigError if there is no such dataset or it
  is not prepared (and may not be)."""
  from jaxcl import data  # noqa: PLC0415  (TFDS: not on `jaxcl --help`)
  try:
    builder = data.tfds_builder(entry.name, d.data_dir)
  except data.DatasetError as e:
    raise ConfigError(f'{entry.what}: {e}') from None
  if not (data.is_prepared(builder) or d.download or _base(entry.name) in data.EMBEDDED):
    raise ConfigError(f'eval.{entry.group}: TFDS dataset {entry.name!r} is not prepared under '
                      f'{builder.data_dir_root}; ' + PREPARE.format(name=entry.name))
  return builder


@dataclasses.dataclass(frozen=True)
class Opened:
  """An entry ready to evaluate: its records (with 'label', or 'captions'
  for retrieval), and for zero-shot its prompts."""
  key: str
  source: object
  class_names: tuple[str, ...] = ()
  templates: tuple[str, ...] = ()


def open_entry(entry: Entry, config, channels: int) -> Opened:
  """Opens the entry's split; `channels`: the model's image channels.
  DatasetError or ConfigError (one line, naming the entry) when it cannot be
  evaluated."""
  from jaxcl import data  # noqa: PLC0415  (TFDS: not on `jaxcl --help`)
  if entry.group == 'retrieval':
    source, _, image_channels = _open_tfds(entry, config, channels)
    _check_channels(entry, image_channels, channels)
    return Opened(entry.key, source)
  if entry.path:
    patching = data.patching(config.dataset, config.model.vit.patch_size)
    source = data.ImageFolderSource(entry.path, 0 if patching else config.augment.image_size)
    if source.skipped:
      path, why = source.skipped[0]
      print(f'jaxcl: {entry.what}: {len(source.skipped)} image(s) skipped, unreadable or '
            f'wrongly sized (first: {path}: {why})', file=sys.stderr)
    # Folder names are identifiers ('golden_retriever'); prompts read them as words.
    own_names = tuple(name.replace('_', ' ') for name in source.classes)
    image_channels, templates = 3, data.DEFAULT_TEMPLATES
    list_name = entry.list_name
    if patching:  # NaFlex: each image at its aspect ratio, as patches
      source = data.naflex.PatchedSource(source, patching)
  else:
    source, own_names, image_channels = _open_tfds(entry, config, channels)
    templates = data.zeroshot_templates(_base(entry.name))
    list_name = entry.list_name or zeroshot_lists.for_dataset(entry.name) or ''
  _check_channels(entry, image_channels, channels)
  names = own_names
  if list_name:
    names, templates = zeroshot_lists.load(list_name)
    if len(names) != len(own_names) and own_names:
      raise ConfigError(f'{entry.what}: zero-shot list {list_name!r} has {len(names)} classes, '
                        f'the dataset {len(own_names)}')
  if not names:
    raise ConfigError(f'{entry.what}: its labels have no class names; name a list: '
                      f'{entry.spec}=LIST ({", ".join(zeroshot_lists.NAMES)})')
  return Opened(entry.key, source, tuple(names), tuple(templates))


def _check_channels(entry: Entry, image_channels: int, channels: int) -> None:
  errors.check(image_channels == channels, f'{entry.what}: its images have {image_channels} '
                                           f'channel(s), the model\'s {channels}')


def _open_tfds(entry: Entry, config, channels: int):
  """(source, label names, image channels) of a TFDS entry, its features
  checked before it is prepared (an embedded one, or with dataset.download)."""
  from jaxcl import data  # noqa: PLC0415  (TFDS: not on `jaxcl --help`)
  retrieval = entry.group == 'retrieval'
  cfg = ml_collections.ConfigDict(config.dataset.to_dict())
  cfg.update(name=entry.name, image_key='image', label_key='label', image_size=0,
             text_key=TEXT_KEYS.get(_base(entry.name), cfg.text_key))
  features = _tfds_builder(entry, cfg).info.features
  needs = ('image', cfg.text_key) if retrieval else ('image', 'label')
  if any(key.split('/')[0] not in features for key in needs):
    raise ConfigError(f'{entry.what}: {entry.group} reads the features '
                      f'{" and ".join(map(repr, needs))}; it has {", ".join(features.keys())}')
  shape = tuple(features['image'].shape)
  image_channels = shape[2] if len(shape) == 3 else 1
  if image_channels != channels:
    return None, (), image_channels  # the caller says so
  if None in shape[:2]:  # no fixed size: the model's resolution
    cfg.image_size = config.augment.image_size
  dataset = data.Dataset(cfg, config.model.vit.patch_size)
  split = entry.split or _default_split(entry, dataset.builder().info.splits)
  import jax  # noqa: PLC0415  (validation imports this module: no jax on `jaxcl --help`)
  from jax.experimental import multihost_utils  # noqa: PLC0415  (as jax)
  if jax.process_count() > 1:  # one process prepares an embedded or downloaded dataset
    if jax.process_index() == 0:
      dataset.split(split, with_text=retrieval)
    multihost_utils.sync_global_devices(f'jaxcl: {entry.key} prepared')
  source, info = dataset.split(split, with_text=retrieval)
  return source, info.class_names, image_channels


def _base(name: str) -> str:
  """A TFDS name without its /config and :version."""
  return name.split(':')[0].split('/')[0]


def _default_split(entry: Entry, splits) -> str:
  for split in (DEFAULT_SPLITS.get(_base(entry.name)), 'test', 'validation', 'val'):
    if split and split in splits:
      return split
  raise ConfigError(f'{entry.what} has neither a test nor a validation split (it has '
                    f'{", ".join(splits)}); name one: {entry.name}:SPLIT')
