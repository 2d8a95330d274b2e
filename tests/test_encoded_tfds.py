"""TFDS datasets with encoded image features (JPEG bytes in array_record, as
`tfds build` prepares imagenet2012 or coco_captions): read without
TensorFlow, decoded by jaxcl's own path (the one shards take), in grain
worker processes, with the same batches for any number of workers."""

import io

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from jaxcl import config as config_lib, data
from jaxcl.data import decode

NAMES = ['dark', 'mid', 'light']


def _jpeg(index: int) -> bytes:
  """A smooth 24x30 gradient (JPEG keeps it close), one brightness per class."""
  y, x = np.mgrid[0:24, 0:30]
  base = 60 + 70 * (index % 3)
  pixels = np.stack([base + x, base + y, base + (x + y) // 2], -1).astype(np.uint8)
  out = io.BytesIO()
  Image.fromarray(pixels).save(out, format='JPEG', quality=95)
  return out.getvalue()


class JaxclTestPhotos(tfds.core.GeneratorBasedBuilder):
  """Encoded JPEGs, a class label and captions: built here without TensorFlow
  (the Image feature stores bytes it is given as they are)."""

  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
        'label': tfds.features.ClassLabel(names=NAMES),
        'captions': tfds.features.Sequence(tfds.features.Text())}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples(range(40)),
            'test': self._generate_examples(range(40, 52))}

  def _generate_examples(self, indices):
    for i in indices:
      yield i, {'image': _jpeg(i), 'label': i % 3, 'captions': [f'a {NAMES[i % 3]} photo {i}']}


@pytest.fixture(scope='module')
def dataset_cfg(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp('tfds')
  JaxclTestPhotos(data_dir=str(data_dir), file_format='array_record').download_and_prepare()
  cfg = config_lib.base_config().dataset
  cfg.update(name='jaxcl_test_photos', data_dir=str(data_dir), image_size=16, workers=0)
  return cfg


def test_encoded_images_are_decoded_by_jaxcl(dataset_cfg):
  source, info = data.Dataset(dataset_cfg).split('train', with_text=True)
  assert info.image_shape == (16, 16, 3) and info.class_names == tuple(NAMES)
  for index in range(len(source)):
    record = source[index]
    caption = record['captions'][0]
    number = int(caption.split()[-1])
    assert record['label'] == number % 3 and caption.startswith(f'a {NAMES[number % 3]} photo')
    # Independent reference: PIL's full decode, central square, resized.
    full = np.asarray(Image.open(io.BytesIO(_jpeg(number))).convert('RGB'))
    square = Image.fromarray(full[:, 3:27]).resize((16, 16), Image.BILINEAR)
    difference = np.abs(record['image'].astype(int) - np.asarray(square).astype(int))
    assert record['image'].shape == (16, 16, 3) and difference.mean() < 3, difference.mean()


def test_worker_processes_decode_the_same_batches(dataset_cfg):
  dataset_cfg = dataset_cfg.copy_and_resolve_references()
  batches = {}
  for workers in (0, 2):
    dataset_cfg.workers = workers
    source, _ = data.Dataset(dataset_cfg).training(with_text=False)
    assert source.workers == workers
    it = data.train_batches(source, batch_size=8, seed=0, process_index=0, process_count=1)
    try:
      batches[workers] = [next(it) for _ in range(7)]  # past one epoch of 40
    finally:
      it.close()
  for a, b in zip(batches[0], batches[2]):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])


def test_grayscale_decoding_keeps_one_channel():
  gray = io.BytesIO()
  Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(gray, format='PNG')
  image, problem = decode.decode_image(gray.getvalue(), decode.SampleFormat(0, channels=1))
  assert problem is None and image.shape == (8, 8, 1)
  np.testing.assert_array_equal(image[..., 0], np.arange(64).reshape(8, 8))
