"""Input: TFDS array_record data sources, image folders, pairs files,
webdataset shards and mixtures of them, read with grain.

Every dataset but shards becomes a random-access source of records
``{'image': uint8 [H, W, C], 'label': int}`` with one fixed H, W, C (the
"stored resolution"), plus ``'captions'`` (a list of str) for image-text
training. The host only reads, picks a caption, tokenizes and batches;
augmentation runs on the device (jaxcl.data.augment).

- TFDS by name (``dataset.name = 'cifar10'``, ``'imagenet2012'``,
  ``'coco_captions'``, ...): the builder's array_record files in
  ``dataset.data_dir`` (TFDS's default when unset); captions come from the
  ``dataset.text_key`` feature ('a/b' for nested ones). Preparing datasets
  with Image features needs TensorFlow and, for most, the network: done once
  by the user, or here when ``dataset.download=True``. Reading them does
  not: their encoded images are decoded by jaxcl.data.decode, in grain
  worker processes when training.
- Embedded, prepared locally on first use with no network and no TensorFlow:
  ``digits`` (jaxcl.data.digits: scikit-learn's 1,797 8x8 handwritten
  digits; train = the first 1,500, test = the remaining 297; pixel =
  round(value * 255 / 16)), ``captioned_shapes`` (jaxcl.data.shapes:
  procedurally generated images of colored shapes with captions) and
  ``captioned_shapes_flex`` (the same on wide, tall and square canvases,
  PNG-encoded: SigLIP 2's NaFlex data).
- ``dataset.resolution='naflex'``: each image keeps its aspect ratio and
  becomes patches within a budget (jaxcl.data.naflex), for ViT towers.
- ``image_text_pairs``: users' JSONL/CSV files of (image path, caption) rows,
  converted once into a TFDS dataset by jaxcl.data.pairs (bad rows reported
  and skipped) and read like any other.
- ``image_folder``: ``dataset.path/SPLIT/CLASS/*.png`` (or ``path/SPLIT/*.png``
  for unlabeled images, label -1), resized to ``dataset.image_size``. The
  train split is required; without the evaluation splits' folders
  (``test/``) the run trains and skips evaluation.
- ``webdataset``: tar shards (``dataset.urls``), streamed rather than read
  at random (jaxcl.data.stream), with held-out shards (``dataset.eval_urls``)
  read into memory; ``mixture``: several sources by weight, streamed alike.
  Their positions are saved with the checkpoints.

Training order is deterministic from the seed: grain shuffles the source,
reshuffles each epoch, and each of P processes reads its own block of every
global batch. For random-access data nothing of the iterator is
checkpointed: its position follows from the step (and the batch history),
see `train_iterator`.
With several captions per image, one is drawn per image and epoch.

The modules, each importing only those above it:

- images: image files checked and resized with PIL; `ImageFolderSource`.
- naflex: SigLIP 2's NaFlex patches of an image at its aspect ratio.
- catalog: TFDS bookkeeping: `is_prepared`, `prepare`, `quiet_tfds`, `quiet_absl`.
- digits, shapes: the embedded datasets' TFDS builders.
- pair_rows: the rows of (image path, caption) files, read and checked.
- pairs: those files converted into a TFDS dataset.
- shards: the webdataset tar format; decode: encoded samples -> records.
- tfds_records: a prepared TFDS split as records; `tfds_builder`.
- locca: LocCa's decoder tasks (caption, referring expression, grounded
  caption) as token sequences.
- pipeline: `train_iterator`, `eval_batches`, `caption_sampler`, `in_workers`.
- stream: streams of shard and record components, mixtures, `StreamBatches`.
- shard_sources: the webdataset and mixture training splits, held-out shards.
- sources: datasets by name: `Dataset` (opened once per run), `load_source`,
  `train_batches`.
- shard_writer: `jaxcl shard`.

This package re-exports their public names: ``data.load_source`` etc.
"""

from jaxcl.data import pairs, shapes  # noqa: F401  (TFDS builders, registered on import)
from jaxcl.data.catalog import is_prepared
from jaxcl.data.digits import Digits
from jaxcl.data.images import (
  IMAGE_SUFFIXES,
  MAX_UPSCALE,
  ImageFolderSource,
  center_crop_resize,
  image_problem,
)
from jaxcl.data.naflex import Patching, patching
from jaxcl.data.pipeline import caption_sampler, eval_batches, train_iterator
from jaxcl.data.shard_sources import MIXTURE, NAME as WEBDATASET
from jaxcl.data.sources import (
  DEFAULT_TEMPLATES,
  EMBEDDED,
  PAIRS,
  Dataset,
  DatasetError,
  DatasetInfo,
  component_configs,
  describe_size,
  known_size,
  load_source,
  train_batches,
  zeroshot_templates,
)
from jaxcl.data.stream import MIN_SAMPLES_FOR_BAD_FRACTION, StreamBatches
from jaxcl.data.tfds_records import as_strings, tfds_builder

__all__ = [
    'DEFAULT_TEMPLATES', 'EMBEDDED', 'IMAGE_SUFFIXES', 'MAX_UPSCALE',
    'MIN_SAMPLES_FOR_BAD_FRACTION', 'MIXTURE', 'PAIRS',
    'WEBDATASET', 'Dataset', 'DatasetError', 'DatasetInfo', 'Digits', 'ImageFolderSource',
    'Patching', 'patching',
    'StreamBatches', 'as_strings', 'caption_sampler', 'center_crop_resize', 'component_configs',
    'describe_size', 'eval_batches', 'image_problem', 'is_prepared', 'known_size', 'load_source',
    'tfds_builder', 'train_batches', 'train_iterator', 'zeroshot_templates',
]
