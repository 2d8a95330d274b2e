"""Checks on a config's dataset group (validation's part that reads the
data's settings, and with check_data the data itself). Like validation, it
loads no TFDS at import.
"""

from __future__ import annotations

from etils import epath

from jaxcl import errors, presets
from jaxcl.errors import ConfigError, check


def check_dataset_group(config, text_tower: bool, process_count: int, check_data: bool) -> None:
  """ConfigError for the first invalid value of config.dataset; with
  check_data, also for data that is missing or unreadable."""
  d = config.dataset
  check(d.crop in presets.DATASET_CROPS,
        f'dataset.crop must be one of {presets.DATASET_CROPS}, got {d.crop!r}')
  check(isinstance(d.crop_scale, (tuple, list)) and len(d.crop_scale) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in d.crop_scale)
        and 0 < d.crop_scale[0] <= d.crop_scale[1] <= 1,
        f'dataset.crop_scale must be (min, max) with 0 < min <= max <= 1, got {d.crop_scale!r}')
  if d.streams:
    check(config.batch_size % d.streams == 0 and d.streams % process_count == 0,
          f'dataset.streams={d.streams} must divide batch_size {config.batch_size} and be a '
          f'multiple of the {process_count} process(es)')
  problem = resolution_problem(d, config.model.name in presets.VIT_NAMES, text_tower,
                               config.eval.max_patches)
  check(not problem, problem)
  if check_data:
    _check_dataset(d, process_count)


def resolution_problem(d, vit: bool, text_tower: bool, eval_budgets=()) -> str:
  """What is wrong with a dataset group's resolution and max_patches for a
  model (a ViT or not, with a text tower or not), and with eval.max_patches
  (`eval_budgets`), or ''."""
  if d.resolution not in presets.RESOLUTIONS:
    return (f'dataset.resolution must be one of {presets.RESOLUTIONS}, got '
            f'{d.resolution!r}')
  sizes = d.max_patches if isinstance(d.max_patches, (tuple, list)) else (d.max_patches,)
  if not sizes or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0
                          for n in sizes):
    return (f'dataset.max_patches must be a positive integer or a list of them, got '
            f'{d.max_patches!r}')
  if not (isinstance(eval_budgets, (tuple, list)) and all(
      isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in eval_budgets)):
    return f'eval.max_patches must be a list of positive integers, got {eval_budgets!r}'
  if eval_budgets and d.resolution != 'naflex':
    return 'eval.max_patches is for dataset.resolution=naflex'
  if d.resolution == 'naflex' and not (vit and text_tower):
    return ('dataset.resolution=naflex needs a ViT image tower (model.name vit-*) and an '
            'image-text method (clip, siglip): its images are patches, not crops')
  return ''


def _check_dataset(d, process_count: int):
  from jaxcl import data  # noqa: PLC0415  (TFDS: not on `jaxcl --help`)
  if d.name == data.PAIRS:
    check(bool(d.path), f'dataset.path must name a JSONL or CSV file when dataset.name is '
                         f'{data.PAIRS}')
    check(epath.Path(d.path).is_file(), f'dataset.path {d.path} is not a file')
    check(d.image_size > 0 or d.resolution == 'naflex',
          f'dataset.image_size must be > 0 for {data.PAIRS}')
    check(0 <= d.pairs.test_fraction < 1,
           f'dataset.pairs.test_fraction must be in [0, 1), got {d.pairs.test_fraction}')
    return
  if d.name == data.WEBDATASET:
    _check_webdataset(d, process_count)
    return
  if d.name == data.MIXTURE:
    check(bool(d.mixture), "dataset.mixture must list 'SOURCE=WEIGHT' entries when dataset.name "
                           "is mixture (shards:URLS, pairs:FILE, folder:PATH or a TFDS name)")
    check(d.image_size > 0 or d.resolution == 'naflex',
          'dataset.image_size must be > 0 for a mixture (every source is read at that size)')
    for index, (sub, _, _) in enumerate(data.component_configs(d)):
      try:
        _check_dataset(sub, process_count)
      except ConfigError as e:
        raise ConfigError(f'dataset.mixture[{index}]: {e}') from None
    return
  if d.name == 'image_folder':
    check(bool(d.path), 'dataset.path must name a folder when dataset.name is image_folder')
    check(epath.Path(d.path).is_dir(), f'dataset.path {d.path} is not a folder')
    check((epath.Path(d.path) / d.train_split).is_dir(),
           f'dataset.path {d.path} has no {d.train_split}/ folder (dataset.train_split): an '
           f'image folder holds train/CLASS/*.png, and test/CLASS/*.png for evaluation')
    check(d.image_size > 0, 'dataset.image_size must be > 0 for an image folder')
    return
  try:
    builder = data.tfds_builder(d.name, d.data_dir)
  except data.DatasetError as e:
    raise ConfigError(f'dataset.name: {e}') from None
  if d.name not in data.EMBEDDED and not d.download:
    check(data.is_prepared(builder),
           f'dataset {d.name!r} is not prepared under {builder.data_dir_root}; prepare it or '
           f'set --config.dataset.download=True')


def _check_webdataset(d, process_count: int):
  """The shards exist and their first samples read (all of them, before
  anything is compiled or written), and the streams can share them."""
  from jaxcl.data import shard_sources, shards  # noqa: PLC0415  (TFDS: not on `jaxcl --help`)
  check(bool(d.urls), "dataset.urls must name the training shards when dataset.name is "
                      "webdataset ('DIR/shard-{000000..000099}.tar')")
  check(d.image_size > 0 or d.resolution == 'naflex',
        'dataset.image_size must be > 0 for webdataset shards (images are cropped to it as '
        'they are decoded)')
  for key, what in (('urls', 'dataset.urls'), ('eval_urls', 'dataset.eval_urls')):
    if d[key]:
      found = shards.expand_urls(d[key])
      try:
        shards.check_shards(found, what)
        # On every process of a job, with no collective (it would compile
        # before the refusal): all refuse alike a shard that cannot be read,
        # and a read that fails once is retried so that one process alone
        # does not.
        shards.check_readable(found, what)
      except errors.DatasetError as e:
        raise ConfigError(str(e)) from None
      if key == 'urls':
        shard_sources.check_streams(d.streams, len(found), process_count)


