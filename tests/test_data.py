"""The digits TFDS builder, the grain pipelines, image folders, augmentations."""

import io

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from jaxcl import data
from jaxcl.data import augment, decode, images, pairs

DIGITS = ml_collections.ConfigDict(dict(
    name='digits', data_dir=None, download=False, image_key='image', label_key='label',
    image_size=0, path='', train_split='train'))


@pytest.fixture(scope='module')
def digits():
  train, info = data.load_source(DIGITS, 'train')
  test, _ = data.load_source(DIGITS, 'test')
  return train, test, info


def _records(source):
  return sorted((source[i]['image'].tobytes(), int(source[i]['label'])) for i in range(len(source)))


def test_digits_splits_match_sklearn(digits):
  from sklearn.datasets import load_digits
  train, test, info = digits
  assert info.image_shape == (8, 8, 1) and info.num_classes == 10
  raw = load_digits()
  pixels = np.round(raw.images * 255 / 16).astype(np.uint8)[..., None]
  expected = lambda lo, hi: sorted((pixels[i].tobytes(), int(raw.target[i])) for i in range(lo, hi))
  assert len(train) == 1500 and len(test) == 297
  assert _records(train) == expected(0, 1500)
  assert _records(test) == expected(1500, 1797)
  assert train[0]['image'].dtype == np.uint8


def test_train_iterator_is_deterministic_and_epochs_reshuffle(digits):
  train, _, _ = digits
  take = lambda it, n: [next(it)['label'] for _ in range(n)]
  a = data.train_iterator(train, batch_size=500, seed=3)
  b = data.train_iterator(train, batch_size=500, seed=3)
  first, second = take(a, 3), take(a, 3)  # epochs 1 and 2
  np.testing.assert_array_equal(np.concatenate(first), np.concatenate(take(b, 3)))
  assert not np.array_equal(np.concatenate(first), np.concatenate(second))
  assert sorted(np.concatenate(first)) == sorted(np.concatenate(second))
  other = data.train_iterator(train, batch_size=500, seed=4)
  assert not np.array_equal(np.concatenate(first), np.concatenate(take(other, 3)))


def test_processes_read_blocks_of_the_same_global_batch(digits):
  train, _, _ = digits
  whole = data.train_iterator(train, batch_size=64, seed=0)
  parts = [data.train_iterator(train, batch_size=64, seed=0, process_index=p, process_count=4)
           for p in range(4)]
  for _ in range(30):  # crosses an epoch boundary
    glob = next(whole)
    local = [next(it) for it in parts]
    assert all(len(x['label']) == 16 for x in local)
    np.testing.assert_array_equal(np.concatenate([x['image'] for x in local]), glob['image'])


def test_iterator_resumes_at_a_batch_or_a_record(digits):
  """The stream read on from a step, by batch (resume) or by record (after a
  global batch change), is the uninterrupted stream, across epoch ends."""
  train, _, _ = digits  # 1500 records: 32-row batches cross an epoch end at batch 46
  stream = data.train_iterator(train, batch_size=32, seed=0)
  batches = [next(stream) for _ in range(50)]
  labels = np.concatenate([b['label'] for b in batches])
  resumed = data.train_iterator(train, batch_size=32, seed=0, start_batch=44)
  for want in batches[44:50]:
    np.testing.assert_array_equal(next(resumed)['image'], want['image'])
  # 40 batches of 32 (1280 records), then batches of 48 from record 1280.
  wider = data.train_iterator(train, batch_size=48, seed=0, start_record=1280, start_batch=1)
  np.testing.assert_array_equal(next(wider)['label'], labels[1328:1376])
  for p in range(2):  # and each of two processes reads its half of it
    half = data.train_iterator(train, batch_size=48, seed=0, start_record=1280,
                               process_index=p, process_count=2)
    np.testing.assert_array_equal(next(half)['label'], labels[1280 + 24 * p:1304 + 24 * p])


def test_eval_batches_cover_the_split_once(digits):
  _, test, _ = digits
  labels = []
  for p in range(2):
    for batch in data.eval_batches(test, batch_size=128, process_index=p, process_count=2):
      assert batch['image'].shape == (64, 8, 8, 1)
      labels.append(batch['label'][batch['mask']])
  assert sum(len(batch_labels) for batch_labels in labels) == 297
  assert sorted(np.concatenate(labels)) == sorted(test[i]['label'] for i in range(297))


def test_image_folder(tmp_path):
  rng = np.random.default_rng(0)
  for split, n in (('train', 3), ('test', 2)):
    for cls in ('cat', 'dog'):
      (tmp_path / split / cls).mkdir(parents=True)
      for i in range(n):
        Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(
            tmp_path / split / cls / f'{i}.png')
  cfg = ml_collections.ConfigDict(dict(name='image_folder', path=str(tmp_path), image_size=16,
                                       train_split='train'))
  source, info = data.load_source(cfg, 'test')
  assert info.image_shape == (16, 16, 3) and info.num_classes == 2 and len(source) == 4
  assert source[3]['image'].shape == (16, 16, 3) and int(source[3]['label']) == 1
  batch = next(data.train_iterator(source, batch_size=4, seed=0))
  assert batch['image'].dtype == np.uint8 and sorted(batch['label']) == [0, 0, 1, 1]
  with pytest.raises(data.DatasetError):
    data.load_source(cfg, 'validation')


def make_bad_images(folder):
  """Three image files that cannot be used at image_size 16; their names."""
  folder.mkdir(parents=True, exist_ok=True)
  (folder / 'text.png').write_bytes(b'not an image')
  buffer = io.BytesIO()
  Image.fromarray(np.zeros((40, 40, 3), np.uint8) + 90).save(buffer, format='PNG')
  (folder / 'truncated.png').write_bytes(buffer.getvalue()[:len(buffer.getvalue()) // 2])
  Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(folder / 'pixel.png')
  return ['pixel.png', 'text.png', 'truncated.png']


def test_image_folder_skips_unreadable_and_wrongly_sized_images(tmp_path):
  rng = np.random.default_rng(0)
  (tmp_path / 'train' / 'a').mkdir(parents=True)
  for i in range(2):
    Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(
        tmp_path / 'train' / 'a' / f'{i}.png')
  bad = make_bad_images(tmp_path / 'train' / 'b')
  source = data.ImageFolderSource(str(tmp_path / 'train'), image_size=16)
  assert len(source) == 2 and source.classes == ['a', 'b']
  assert [p.rsplit('/', 1)[1] for p, _ in source.skipped] == bad
  reasons = dict((p.rsplit('/', 1)[1], why) for p, why in source.skipped)
  assert reasons['pixel.png'].startswith('wrongly sized: 1x1 px')
  assert reasons['text.png'].startswith('unreadable: UnidentifiedImageError')
  assert reasons['truncated.png'].startswith('unreadable:')
  with pytest.raises(data.DatasetError, match='no usable image .* all 3 are unreadable'):
    data.ImageFolderSource(str(tmp_path / 'train' / 'b'), image_size=16)


def test_pil_errors_read_alike_in_every_reader(tmp_path):
  """A file that is no image, met by the image folder check, the pairs
  converter and the shard decoder: PIL's error in the same words, naming no
  Python object (PIL's own quotes the file object, `<_io.BytesIO object at
  0x...>`, which would reach skipped_samples.json and the log)."""
  words = 'UnidentifiedImageError: not an image format PIL knows'
  (tmp_path / 'text.png').write_bytes(b'not an image')
  assert images.image_problem(tmp_path / 'text.png', 16) == f'unreadable: {words}'
  assert decode.decode_image(b'not an image', decode.SampleFormat(image_size=16)) == (
      None, f'undecodable image: {words}')
  (tmp_path / 'pairs.jsonl').write_text('{"image": "text.png", "caption": "x"}\n')
  with pytest.raises(ValueError) as raised:
    pairs.prepare_pairs(tmp_path / 'pairs.jsonl', image_size=16, data_dir=str(tmp_path / 'tfds'))
  assert str(raised.value).endswith(
      f'line 1: unreadable image: {tmp_path / "text.png"} ({words})')


AUG = ml_collections.ConfigDict(dict(
    image_size=12, crop_scale_min=0.3, crop_scale_max=1.0, flip=True, color_jitter_prob=0.8,
    color_jitter_strength=1.0, grayscale_prob=0.2, blur_prob=0.5))


@pytest.mark.parametrize('channels', [1, 3])
def test_two_views_shapes_ranges_and_keys(channels):
  images = np.random.default_rng(1).integers(0, 256, (6, 10, 10, channels), dtype=np.uint8)
  fn = jax.jit(lambda k, x: augment.random_views(augment.view_keys(k, 2, x.shape[0]), x, AUG))
  v1, v2 = fn(jax.random.key(0), images)
  assert v1.shape == (6, 12, 12, channels) and v1.dtype == jnp.float32
  assert 0 <= float(v1.min()) and float(v1.max()) <= 1
  assert not np.allclose(v1, v2)  # independent views
  w1, _ = fn(jax.random.key(0), images)
  np.testing.assert_array_equal(v1, w1)  # deterministic from the key


def test_full_crop_is_a_plain_resize():
  image = jnp.asarray(np.random.default_rng(2).uniform(size=(8, 8, 3)), jnp.float32)
  same = augment.random_resized_crop(jax.random.key(0), image, (8, 8), scale=(1, 1), ratio=(1, 1))
  np.testing.assert_allclose(same, image, atol=1e-6)


def test_color_ops_against_numpy():
  rng = np.random.default_rng(3)
  image = rng.uniform(size=(5, 5, 3)).astype(np.float32)
  # Hue rotation by a full turn is the identity; by 0 too.
  np.testing.assert_allclose(augment._rotate_hue(jnp.asarray(image), 1.0), image, atol=1e-5)
  gray = image @ np.array([0.299, 0.587, 0.114], np.float32)
  np.testing.assert_allclose(augment._gray(jnp.asarray(image))[..., 0], gray, atol=1e-6)
  # A blur of a constant image is the same constant.
  const = jnp.full((9, 9, 1), 0.3)
  np.testing.assert_allclose(augment.gaussian_blur(jax.random.key(0), const, 5), const, atol=1e-6)
