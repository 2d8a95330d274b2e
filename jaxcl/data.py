"""Input: TFDS array_record data sources and image folders, read with grain.

Every dataset becomes a random-access source of records
``{'image': uint8 [H, W, C], 'label': int}`` with one fixed H, W, C (the
"stored resolution"), plus ``'captions'`` (a list of str) for image-text
training. The host only reads, picks a caption, tokenizes and batches;
augmentation runs on the device (jaxcl.augment).

- TFDS by name (``dataset.name = 'cifar10'``, ``'imagenet2012'``,
  ``'coco_captions'``, ...): the builder's array_record files in
  ``dataset.data_dir`` (TFDS's default when unset); captions come from the
  ``dataset.text_key`` feature ('a/b' for nested ones). Preparing datasets
  with Image features needs TensorFlow and, for most, the network: done once
  by the user, or here when ``dataset.download=True``.
- Embedded, prepared locally on first use with no network and no TensorFlow:
  ``digits`` (scikit-learn's 1,797 8x8 handwritten digits; train = the first
  1,500, test = the remaining 297; pixel = round(value * 255 / 16)) and
  ``captioned_shapes`` (jaxcl.shapes: procedurally generated images of
  colored shapes with captions).
- ``image_text_pairs``: users' JSONL/CSV files of (image path, caption) rows,
  converted once into a TFDS dataset by jaxcl.pairs (bad rows reported and
  skipped) and read like any other.
- ``image_folder``: ``dataset.path/SPLIT/CLASS/*.png`` (or ``path/SPLIT/*.png``
  for unlabeled images, label -1), resized to ``dataset.image_size``. The
  train split is required; without the evaluation splits' folders
  (``test/``) the run trains and skips evaluation.

Training order is deterministic from the seed: grain shuffles the source,
reshuffles each epoch, and each of P processes reads its own block of every
global batch. Nothing of the iterator is checkpointed: its position follows
from the step (and the batch history), see `train_iterator`.
With several captions per image, one is drawn per image and epoch.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import io
from typing import Iterator

import grain
import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core import registered

from jaxcl import errors, presets

IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.webp')


DatasetError = errors.DatasetError


# ------------------------------------------------------ the digits builder ---
class Digits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's handwritten digits: 8x8 grayscale, 10 classes, 1,797 images."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'train = first 1,500 images, test = last 297.'}
  NUM_TRAIN = 1500

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description='sklearn.datasets.load_digits, pixels stored as round(v * 255 / 16).',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
            'label': tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=('image', 'label'),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # everything ships inside scikit-learn
    return {'train': self._generate_examples(0, self.NUM_TRAIN),
            'test': self._generate_examples(self.NUM_TRAIN, None)}

  def _generate_examples(self, start, stop):
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
    digits = load_digits()
    images = np.round(digits.images * 255.0 / 16.0).astype(np.uint8)[..., None]
    stop = len(images) if stop is None else stop
    for i in range(start, stop):
      yield i, {'image': images[i], 'label': int(digits.target[i])}


EMBEDDED, PAIRS = presets.EMBEDDED_DATASETS, presets.PAIRS


def _register_builders():
  """Imports the builders that live in other modules (registering them with
  TFDS); late, because they import this module."""
  from jaxcl import pairs, shapes  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import


# ---------------------------------------------------------------- sources ---
@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  image_shape: tuple[int, int, int]  # the stored resolution (H, W, C)
  num_classes: int  # 0 when unlabeled
  class_names: tuple[str, ...] = ()  # the label feature's names, when it has them


def tfds_builder(name: str, data_dir: str | None):
  """The TFDS builder for `name`, or DatasetError if TFDS has no such dataset."""
  _register_builders()
  try:
    registered.imported_builder_cls(name.split(':')[0].split('/')[0])
  except registered.DatasetNotFoundError:
    raise DatasetError(f'no TFDS dataset named {name!r}') from None
  try:
    return tfds.builder(name, data_dir=data_dir, file_format='array_record')
  except ImportError as e:
    # Many builders import TensorFlow, which only preparing needs: a prepared
    # dataset is read from its own files, without the builder's code.
    from tensorflow_datasets.core import read_only_builder  # pylint: disable=g-import-not-at-top
    try:
      return read_only_builder.builder_from_files(name, data_dir=data_dir)
    except Exception:  # pylint: disable=broad-except
      raise DatasetError(
          f'TFDS dataset {name!r} is not prepared in {data_dir or "the TFDS data dir"}, and its '
          f'builder needs a package to prepare it ({e}); prepare it in array_record format '
          f'where that package is installed') from None


def is_prepared(builder) -> bool:
  """Whether a TFDS builder's dataset is prepared in its data_dir."""
  return epath.Path(builder.data_dir).joinpath('dataset_info.json').exists()


class _TfdsSource:
  """A TFDS data source whose records come out as {'image', 'label'} numpy
  arrays, plus 'captions' (a list of str) when `text_key` is given."""

  def __init__(self, source, image_key, label_key, image_size, text_key=None):
    self._source, self._image_key, self._label_key = source, image_key, label_key
    self._image_size, self._text_key = image_size, text_key

  def __len__(self):
    return len(self._source)

  def __getitem__(self, index):
    record = self._source[index]
    image = np.asarray(record[self._image_key])
    if image.ndim == 2:
      image = image[..., None]
    if self._image_size and image.shape[:2] != (self._image_size,) * 2:
      image = center_crop_resize(image, self._image_size)
    label = record[self._label_key] if self._label_key in record else -1
    out = {'image': image.astype(np.uint8), 'label': np.int32(label)}
    if self._text_key:
      out['captions'] = as_strings(_nested(record, self._text_key))
    return out


def _nested(record, key: str):
  """record['a']['b'] for key 'a/b' (TFDS nests Sequence/FeaturesDict features)."""
  for part in key.split('/'):
    record = record[part]
  return record


def as_strings(value) -> list[str]:
  """A caption feature's value (str, bytes, or an array/list of them) -> list of str."""
  if isinstance(value, (str, bytes)):
    value = [value]
  return [v.decode('utf-8', errors='replace') if isinstance(v, bytes) else str(v)
          for v in np.asarray(value, dtype=object).reshape(-1)]


DEFAULT_TEMPLATES = ('a photo of a {}.',)


def zeroshot_templates(name: str) -> tuple[str, ...]:
  """The zero-shot prompt templates of dataset `name` ('{}' = class name):
  the embedded shapes' own list, else CLIP's basic 'a photo of a {}.'."""
  if name == 'captioned_shapes':
    from jaxcl import shapes  # pylint: disable=g-import-not-at-top
    return tuple(shapes.ZEROSHOT_TEMPLATES)
  return DEFAULT_TEMPLATES


def caption_sampler(tokenizer):
  """A grain random_map transform: record -> {'image', 'label', 'text'}, the
  text being one caption drawn at random (anew each epoch: the generator
  depends on the record's position in the repeated dataset), tokenized to
  int32 [max_length]."""

  def sample(record, rng: np.random.Generator):
    captions = record['captions']
    caption = captions[rng.integers(len(captions))] if captions else ''
    return {'image': record['image'], 'label': record['label'],
            'text': tokenizer.encode([caption])[0]}

  return sample


# An image whose shorter side is under image_size / MAX_UPSCALE would be
# mostly interpolation once resized: "wrongly sized", skipped like an
# unreadable one (a 1x1 tracking pixel, a thumbnail in a photo folder).
MAX_UPSCALE = 8


def image_problem(path, image_size: int) -> str | None:
  """Why the image file at `path` is unusable at `image_size` (it does not
  open, does not decode in full, or is too small), or None if it is fine."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with epath.Path(path).open('rb') as f:
      pil = Image.open(f)
      if min(pil.size) < max(1, image_size // MAX_UPSCALE):
        return (f'wrongly sized: {pil.size[0]}x{pil.size[1]} px, under 1/{MAX_UPSCALE} of '
                f'image_size {image_size}')
      pil.draft('RGB', (image_size, image_size))  # JPEG: decode at a reduced scale, faster
      pil.load()  # a truncated file fails here, not in the middle of training
  except Exception as e:  # noqa: BLE001  pylint: disable=broad-except  # PIL raises many kinds
    return f'unreadable: {type(e).__name__}: {errors.first_line(e, "")}'.rstrip(': ')
  return None


class ImageFolderSource:
  """Images under `root` (one sub-folder per class, or none), decoded with PIL.

  Every image is checked once, in parallel, when the source is opened:
  unreadable or wrongly sized ones (image_problem) are left out and listed
  in `skipped` as (path, reason). No usable image at all is a DatasetError.
  """

  def __init__(self, root: str, image_size: int, classes: list[str] | None = None):
    from PIL import Image  # pylint: disable=g-import-not-at-top
    self._image_lib = Image
    root = epath.Path(root)
    if not root.is_dir():
      raise DatasetError(f'image folder {root} does not exist')
    subdirs = sorted(p.name for p in root.iterdir() if p.is_dir())
    self.classes = classes if classes is not None else subdirs
    self.empty_classes = []  # class folders of this split with no image file
    entries = []
    if self.classes:
      for label, name in enumerate(self.classes):
        if (root / name).is_dir():  # a split may lack some of the train split's classes
          images = [(p, label) for p in sorted((root / name).iterdir()) if _is_image(p)]
          if not images:
            self.empty_classes.append(str(root / name))
          entries += images
    else:
      entries = [(p, -1) for p in sorted(root.iterdir()) if _is_image(p)]
    if not entries:
      raise DatasetError(f'no images ({", ".join(IMAGE_SUFFIXES)}) under {root}')
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
      problems = list(pool.map(lambda entry: image_problem(entry[0], image_size), entries))
    self.skipped = [(str(p), why) for (p, _), why in zip(entries, problems) if why]
    entries = [entry for entry, why in zip(entries, problems) if not why]
    if not entries:
      path, why = self.skipped[0]
      raise DatasetError(f'no usable image under {root}: all {len(self.skipped)} are unreadable '
                         f'or wrongly sized ({path}: {why})')
    self._entries, self._image_size = entries, image_size

  def __len__(self):
    return len(self._entries)

  def __getitem__(self, index):
    path, label = self._entries[index]
    try:
      with path.open('rb') as f:
        image = np.asarray(self._image_lib.open(f).convert('RGB'))
    except Exception as e:  # pylint: disable=broad-except  # changed since it was checked
      raise DatasetError(f'image {path} no longer reads: {type(e).__name__}: {e}') from None
    return {'image': center_crop_resize(image, self._image_size), 'label': np.int32(label)}


def _is_image(path) -> bool:
  return path.suffix.lower() in IMAGE_SUFFIXES


def center_crop_resize(image: np.ndarray, size: int) -> np.ndarray:
  """The central square of `image` resized to size x size (host side, PIL)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  h, w = image.shape[:2]
  side = min(h, w)
  top, left = (h - side) // 2, (w - side) // 2
  square = image[top:top + side, left:left + side]
  channels = square.shape[-1]
  pil = Image.fromarray(square[..., 0] if channels == 1 else square)
  out = np.asarray(pil.resize((size, size), Image.BILINEAR))
  return out.reshape(size, size, channels)


def split_missing(cfg, split: str) -> str | None:
  """For an image folder, the folder of `split` if it does not exist (an
  optional evaluation split); None otherwise."""
  if cfg.name != 'image_folder':
    return None
  folder = epath.Path(cfg.path) / split
  return None if folder.is_dir() else str(folder)


def load_source(cfg, split: str, with_text: bool = False):
  """(random-access source, DatasetInfo) for `split` of the dataset `cfg` names.

  cfg: the config's `dataset` group. with_text: records also carry
  'captions' (from the `cfg.text_key` feature). Raises DatasetError if the
  dataset, the split or a feature is missing.
  """
  if cfg.name == 'image_folder':
    train_root = epath.Path(cfg.path) / cfg.train_split
    classes = None
    if train_root.is_dir():
      classes = sorted(p.name for p in train_root.iterdir() if p.is_dir())
    source = ImageFolderSource(str(epath.Path(cfg.path) / split), cfg.image_size, classes)
    channels = 3
    return source, DatasetInfo((cfg.image_size, cfg.image_size, channels), len(source.classes),
                               tuple(source.classes))

  if cfg.name == PAIRS:
    _register_builders()
    from jaxcl import pairs  # pylint: disable=g-import-not-at-top
    try:
      builder = pairs.prepare_pairs(cfg.path, image_size=cfg.image_size, data_dir=cfg.data_dir,
                                    image_key=cfg.pairs.image_column,
                                    caption_key=cfg.pairs.caption_column,
                                    test_fraction=cfg.pairs.test_fraction)
    except ValueError as e:
      raise DatasetError(str(e)) from None
  else:
    builder = tfds_builder(cfg.name, cfg.data_dir)
    if not is_prepared(builder):
      if cfg.name in EMBEDDED or cfg.download:
        print(f'jaxcl: preparing TFDS dataset {cfg.name!r} in {builder.data_dir_root} (once)',
              flush=True)
        tfds.disable_progress_bar()
        with contextlib.redirect_stdout(io.StringIO()):  # TFDS prints its own banners
          builder.download_and_prepare()
      else:
        raise DatasetError(
            f'TFDS dataset {cfg.name!r} is not prepared in {builder.data_dir_root}; prepare it '
            f'(array_record format) or set --config.dataset.download=True')
  if split not in builder.info.splits:
    raise DatasetError(f'dataset {cfg.name!r} has no split {split!r} '
                       f'(it has {", ".join(builder.info.splits)})')
  features = builder.info.features
  for key, what in [(cfg.image_key, 'dataset.image_key')] + (
      [(cfg.text_key, 'dataset.text_key')] if with_text else []):
    if key.split('/')[0] not in features:
      raise DatasetError(f'dataset {cfg.name!r} has no feature {key!r} ({what}); '
                         f'it has {", ".join(features.keys())}')
  image_feature = features[cfg.image_key]
  shape = tuple(image_feature.shape)
  if len(shape) == 2:
    shape = (*shape, 1)
  if cfg.image_size:
    shape = (cfg.image_size, cfg.image_size, shape[-1])
  if None in shape:
    raise DatasetError(f'{cfg.name!r} images have no fixed size {shape}; set dataset.image_size')
  label = features[cfg.label_key] if cfg.label_key in features else None
  num_classes = getattr(label, 'num_classes', 0) or 0
  names = tuple(getattr(label, 'names', None) or ()) if num_classes else ()
  source = _TfdsSource(builder.as_data_source(split=split), cfg.image_key, cfg.label_key,
                       cfg.image_size, text_key=cfg.text_key if with_text else None)
  return source, DatasetInfo(shape, num_classes, names)


# --------------------------------------------------------------- pipelines ---
def train_iterator(source, *, batch_size: int, seed: int, process_index: int = 0,
                   process_count: int = 1, num_threads: int = 4, transform=None,
                   start_record: int = 0, start_batch: int = 0):
  """An endless iterator of this process's share of each global batch: dicts
  of numpy arrays with leading dim batch_size / processes.

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
  """
  local_batch = batch_size // process_count
  ds = grain.MapDataset.source(source).seed(seed).shuffle().repeat()
  if transform is not None:
    ds = ds.random_map(transform)
  if start_record:
    ds = ds[start_record:]
  # Process p reads the p-th block of every global batch, so the assembled
  # global batch is the same, row for row, whatever the number of processes.
  ds = ds.batch(local_batch, drop_remainder=True)[process_index::process_count]
  if start_batch:
    ds = ds[start_batch:]
  options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * num_threads)
  return iter(ds.to_iter_dataset(options))


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
    images = np.stack([r['image'] for r in records]) if records else None
    labels = np.array([r['label'] for r in records], np.int32)
    pad = local_batch - len(records)
    if images is None:
      images = np.zeros((local_batch, *source[0]['image'].shape), np.uint8)
    else:
      images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), np.uint8)])
    yield {'image': images,
           'label': np.concatenate([labels, np.full(pad, -1, np.int32)]),
           'mask': np.concatenate([np.ones(len(records), bool), np.zeros(pad, bool)])}
