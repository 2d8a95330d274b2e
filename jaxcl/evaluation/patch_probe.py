"""Dense features: which color and form covers each patch of the captioned
shapes, read by a linear map from a frozen ViT's patch tokens. SigLIP 2's
additions (a decoder, self-distillation, masked prediction) are meant for
dense and localization tasks; this is such a task on data that knows where
every shape is (jaxcl.data.shapes' segmentation).

A patch is a shape patch when one shape covers at least MIN_COVER of its
pixels; its label is that shape's class (color x form: 24). The probe is
jaxcl.evaluation.probes' linear probe (the config's eval.probe_* settings),
fitted on the shape patches of the first TRAIN_IMAGES images of the
labeled train split, scored on those of the test split: `patch_probe_top1`.
Chance is 1/24; a model that knows only the colors gets at most 1/4.
"""

from __future__ import annotations

import numpy as np

from jaxcl import errors, presets
from jaxcl.data import shapes
from jaxcl.evaluation import probes

MIN_COVER = 0.25
TRAIN_IMAGES = 2_000
NUM_CLASSES = len(shapes.CLASS_NAMES)


def patch_labels(segmentation: np.ndarray, patch_size: int) -> np.ndarray:
  """segmentation uint8 [n, H, W] (1 + class, 0 background) -> int32 [n, P]
  with P = (H / p) (W / p) patches row by row: the class of the shape that
  covers the most of each patch's pixels if it covers at least MIN_COVER of
  them, else -1."""
  n, height, width = segmentation.shape
  rows, cols, p = height // patch_size, width // patch_size, patch_size
  cells = segmentation[:, :rows * p, :cols * p].reshape(n, rows, p, cols, p)
  cells = cells.transpose(0, 1, 3, 2, 4).reshape(n, rows * cols, p * p)
  counts = np.stack([(cells == k + 1).sum(-1) for k in range(NUM_CLASSES)], axis=-1)
  best = counts.argmax(-1)
  covered = np.take_along_axis(counts, best[..., None], -1)[..., 0] >= MIN_COVER * p * p
  return np.where(covered, best, -1).astype(np.int32)


class PatchData:
  """Images and patch labels of both splits (uint8 [n, H, W, C], int32 [n, P])."""

  def __init__(self, train, test, patch_size: int):
    (self.train_images, train_seg), (self.test_images, test_seg) = train, test
    self.train_labels = patch_labels(train_seg, patch_size)
    self.test_labels = patch_labels(test_seg, patch_size)


def open_data(config, dataset) -> PatchData | None:
  """The patch probe's data for a run, or None when it does not apply: the
  dataset has no segmentation (TFDS feature 'segmentation'), the image tower
  is no ViT, or its input is not the stored image (NaFlex, another size)."""
  d, m = config.dataset, config.model
  if dataset is None or m.name not in presets.VIT_NAMES or d.resolution != 'square':
    return None
  try:
    builder = dataset.builder()
  except errors.DatasetError:  # shards, a mixture, an image folder: no TFDS features
    return None
  if 'segmentation' not in builder.info.features:
    return None
  size = builder.info.features['image'].shape[0]
  if size != config.augment.image_size or size % m.vit.patch_size:
    return None
  splits = [(d.eval_train_split, TRAIN_IMAGES), (d.eval_test_split, None)]
  read = [_read(builder.as_data_source(split), limit) for split, limit in splits]
  return PatchData(*read, patch_size=m.vit.patch_size)


def _read(source, limit):
  count = len(source) if limit is None else min(limit, len(source))
  records = [source[i] for i in range(count)]
  return (np.stack([r['image'] for r in records]),
          np.stack([r['segmentation'] for r in records]))


class _Images:
  """Images as an evaluation source of {'image', 'label'} records."""

  def __init__(self, images):
    self.images = images

  def __len__(self):
    return len(self.images)

  def __getitem__(self, index):
    return {'image': self.images[index], 'label': np.int32(index)}


def evaluate(tokens_fn, mesh, patch_data: PatchData, eval_config) -> dict:
  """{'patch_probe_top1'}: tokens_fn, uint8 images [b, H, W, C] -> their
  patch tokens flattened, float32 [b, P width]."""
  def shape_patches(images, labels):
    flat, order = probes.extract_features(tokens_fn, mesh, _Images(images),
                                          batch_size=eval_config.batch_size)
    tokens = flat[np.argsort(order)].reshape(len(images), labels.shape[1], -1)
    keep = labels >= 0
    return tokens[keep], labels[keep]

  train_x, train_y = shape_patches(patch_data.train_images, patch_data.train_labels)
  test_x, test_y = shape_patches(patch_data.test_images, patch_data.test_labels)
  top1 = probes.linear_probe_top1(train_x, train_y, test_x, test_y, NUM_CLASSES,
                                  steps=eval_config.probe_steps,
                                  learning_rate=eval_config.probe_lr, l2=eval_config.probe_l2,
                                  batch_size=eval_config.probe_batch_size)
  return {'patch_probe_top1': top1}
