"""The embedded ``digits`` dataset: a TFDS builder for scikit-learn's 1,797
8x8 handwritten digits (train = the first 1,500, test = the remaining 297;
pixel = round(value * 255 / 16)), prepared locally with no network and no
TensorFlow. Defining `Digits` registers it with TFDS as 'digits'.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds


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
    from sklearn.datasets import load_digits
    digits = load_digits()
    images = np.round(digits.images * 255.0 / 16.0).astype(np.uint8)[..., None]
    stop = len(images) if stop is None else stop
    for i in range(start, stop):
      yield i, {'image': images[i], 'label': int(digits.target[i])}
