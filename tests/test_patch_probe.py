"""The patch probe (jaxcl.evaluation.patch_probe): patch labels against a
loop written from the definition, and the probe reading labels that the
features hold exactly, or not at all."""

import jax
import numpy as np
import pytest

from jaxcl import parallel
from jaxcl.evaluation import patch_probe


def _reference_labels(segmentation, p):
  """One patch at a time: the class covering the most pixels, if it covers
  at least a quarter of the patch; -1 otherwise."""
  n, h, w = segmentation.shape
  out = np.full((n, (h // p) * (w // p)), -1)
  for i in range(n):
    for r in range(h // p):
      for c in range(w // p):
        cell = segmentation[i, r * p:(r + 1) * p, c * p:(c + 1) * p].ravel()
        counts = np.bincount(cell, minlength=patch_probe.NUM_CLASSES + 1)[1:]
        if counts.max() >= patch_probe.MIN_COVER * p * p:
          out[i, r * (w // p) + c] = counts.argmax()
  return out


def test_patch_labels_follow_their_definition():
  rng = np.random.default_rng(0)
  segmentation = np.zeros((20, 12, 16), np.uint8)
  for image in segmentation:  # a few rectangles of random classes
    for _ in range(3):
      top, left = rng.integers(0, 10), rng.integers(0, 14)
      image[top:top + rng.integers(1, 6), left:left + rng.integers(1, 6)] = rng.integers(1, 25)
  np.testing.assert_array_equal(patch_probe.patch_labels(segmentation, 4),
                                _reference_labels(segmentation, 4))
  one = np.zeros((1, 4, 4), np.uint8)
  one[0, 0, :3] = 6  # 3 of 16 pixels: under a quarter
  assert patch_probe.patch_labels(one, 4).tolist() == [[-1]]
  one[0, 1, 0] = 6  # 4 of 16
  assert patch_probe.patch_labels(one, 4).tolist() == [[5]]


def _data(seed, n=64, p=4):
  """Images of 2 x 2 patches whose red channel holds 1 + the patch's class
  (0: background), and their segmentation."""
  rng = np.random.default_rng(seed)
  classes = rng.integers(0, patch_probe.NUM_CLASSES + 1, (n, 2, 2))
  segmentation = np.kron(classes, np.ones((p, p), np.int64)).astype(np.uint8)
  images = np.zeros((n, 2 * p, 2 * p, 3), np.uint8)
  images[..., 0] = segmentation
  return images, segmentation


@pytest.mark.parametrize('informative', [True, False])
def test_the_probe_reads_what_the_tokens_hold(informative):
  data = patch_probe.PatchData(_data(0), _data(1), patch_size=4)
  mesh = parallel.make_mesh({'data': -1, 'fsdp': 1}, jax.devices()[:1])

  @jax.jit
  def tokens(images):  # a one-hot code of each patch's red value, or noise
    red = images[..., 0].reshape(-1, 2, 4, 2, 4)[:, :, 0, :, 0].reshape(-1, 4)
    if informative:
      return jax.nn.one_hot(red, patch_probe.NUM_CLASSES + 1).reshape(len(images), -1)
    return jax.random.normal(jax.random.key(0), (len(images), 4 * 8))

  config = type('Eval', (), dict(batch_size=32, probe_steps=300, probe_lr=0.05, probe_l2=0.0,
                                 probe_batch_size=256))
  top1 = patch_probe.evaluate(tokens, mesh, data, config)['patch_probe_top1']
  assert top1 == 1.0 if informative else top1 < 0.2
