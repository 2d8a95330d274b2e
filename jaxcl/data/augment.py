"""SimCLR's augmentations as jit-compiled, vmapped JAX code on the device.

Images come in as float32 in [0, 1], [H, W, C] with C = 1 or 3; each example
gets its own key. On a pod the host only decodes uint8 records; cropping,
resizing and color work run on the accelerators inside the train step.

The order is SimCLR's: random resized crop -> horizontal flip -> color jitter
(with probability p; brightness, contrast, saturation, hue, in that fixed
order) -> random grayscale -> Gaussian blur. Saturation, hue and grayscale
are identities on single-channel images.
"""

from __future__ import annotations

import math
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np

# Constants are NumPy arrays: a jnp array made at import would start jax's
# backend, which must wait for jax.distributed.initialize on a multi-host job.
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def _gray(image):
  if image.shape[-1] == 1:
    return image
  return jnp.sum(image * _LUMA, axis=-1, keepdims=True)


def random_resized_crop(key, image, out_size: Tuple[int, int], scale=(0.08, 1.0),
                        ratio=(3 / 4, 4 / 3)):
  """Crops a random area fraction in `scale` with aspect ratio in `ratio` and
  resizes it to `out_size` (bilinear, antialiased)."""
  h, w, c = image.shape
  k_area, k_ratio, k_y, k_x = jax.random.split(key, 4)
  area = jax.random.uniform(k_area, (), minval=scale[0], maxval=scale[1])
  log_r = jax.random.uniform(k_ratio, (), minval=math.log(ratio[0]), maxval=math.log(ratio[1]))
  aspect = jnp.exp(log_r)
  # Crop size as fractions of the image sides, clipped so it fits.
  crop_w = jnp.clip(jnp.sqrt(area * aspect), 0.0, 1.0)
  crop_h = jnp.clip(jnp.sqrt(area / aspect), 0.0, 1.0)
  y0 = jax.random.uniform(k_y, ()) * (1.0 - crop_h)
  x0 = jax.random.uniform(k_x, ()) * (1.0 - crop_w)
  out_h, out_w = out_size
  scale_yx = jnp.stack([out_h / (crop_h * h), out_w / (crop_w * w)])
  translate_yx = -jnp.stack([y0 * h, x0 * w]) * scale_yx
  return jax.image.scale_and_translate(image, (out_h, out_w, c), (0, 1), scale_yx, translate_yx,
                                       method='linear', antialias=True)


def resize(image, out_size: Tuple[int, int]):
  """The evaluation view: the whole image resized to `out_size`."""
  if image.shape[:2] == tuple(out_size):
    return image
  return jax.image.resize(image, (*out_size, image.shape[-1]), method='linear', antialias=True)


def color_jitter(key, image, strength: float):
  """SimCLR's jitter: brightness, contrast, saturation 0.8 s; hue 0.2 s."""
  kb, kc, ks, kh = jax.random.split(key, 4)
  b, s_, h = 0.8 * strength, 0.8 * strength, 0.2 * strength
  factor = lambda k, amount: jax.random.uniform(k, (), minval=1 - amount, maxval=1 + amount)
  image = image * factor(kb, b)
  mean = jnp.mean(_gray(image))
  image = jnp.clip((image - mean) * factor(kc, b) + mean, 0.0, 1.0)
  if image.shape[-1] == 3:
    gray = _gray(image)
    image = jnp.clip(gray + (image - gray) * factor(ks, s_), 0.0, 1.0)
    image = _rotate_hue(image, jax.random.uniform(kh, (), minval=-h, maxval=h))
  return jnp.clip(image, 0.0, 1.0)


# RGB <-> YIQ: a hue shift is a rotation of the (I, Q) chroma plane.
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114],
                        [0.596, -0.274, -0.322],
                        [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ).astype(np.float32)
_RGB_TO_YIQ = _RGB_TO_YIQ.astype(np.float32)


def _rotate_hue(image, delta):
  """Shifts hue by `delta` turns (delta in [-0.5, 0.5])."""
  angle = 2 * jnp.pi * delta
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  rotation = jnp.array([[1.0, 0.0, 0.0], [0.0, cos, -sin], [0.0, sin, cos]])
  transform = jnp.asarray(_YIQ_TO_RGB) @ rotation @ _RGB_TO_YIQ
  return image @ transform.T


def gaussian_blur(key, image, kernel_size: int, sigma_range=(0.1, 2.0)):
  """Separable Gaussian blur with sigma uniform in `sigma_range` (pixels)."""
  sigma = jax.random.uniform(key, (), minval=sigma_range[0], maxval=sigma_range[1])
  radius = kernel_size // 2
  x = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  weights = jnp.exp(-0.5 * (x / sigma) ** 2)
  weights = weights / jnp.sum(weights)
  padded = jnp.pad(image, ((radius, radius), (radius, radius), (0, 0)), mode='reflect')
  # Rows, then columns: a weighted sum of shifted copies.
  n_h, n_w = image.shape[:2]
  rows = sum(weights[i] * padded[i:i + n_h] for i in range(2 * radius + 1))
  return sum(weights[i] * rows[:, i:i + n_w] for i in range(2 * radius + 1))


def _maybe(key, p, fn, image):
  """fn(image) with probability p, else image."""
  if p <= 0:
    return image
  return jnp.where(jax.random.uniform(key, ()) < p, fn(image), image)


def simclr_view(key, image, cfg):
  """One augmented view of one image [H, W, C] in [0, 1]; `cfg` is config.augment."""
  keys = jax.random.split(key, 8)
  out_size = (cfg.image_size, cfg.image_size)
  image = random_resized_crop(keys[0], image, out_size, scale=(cfg.crop_scale_min,
                                                               cfg.crop_scale_max))
  if cfg.flip:
    image = _maybe(keys[1], 0.5, lambda x: x[:, ::-1], image)
  image = _maybe(keys[2], cfg.color_jitter_prob,
                 lambda x: color_jitter(keys[3], x, cfg.color_jitter_strength), image)
  if image.shape[-1] == 3:
    image = _maybe(keys[4], cfg.grayscale_prob, lambda x: jnp.broadcast_to(_gray(x), x.shape),
                   image)
  if cfg.blur_prob > 0:
    size = max(3, int(round(0.1 * cfg.image_size)) | 1)  # SimCLR: 10% of the side, odd
    image = _maybe(keys[5], cfg.blur_prob, lambda x: gaussian_blur(keys[6], x, size), image)
  return jnp.clip(image, 0.0, 1.0)


def view_keys(key, num_views: int, n: int):
  """Per-example keys for `num_views` views of n examples: [n, num_views].
  Made once for the whole batch: a microbatch (jaxcl.trainer.grad_cache)
  takes its rows' slice. The first column depends only on `key` and the
  row; the later ones on n too (jax.random.split numbers keys row-major)."""
  return jnp.swapaxes(jax.random.split(key, (num_views, n)), 0, 1)


def random_views(keys, images_uint8, cfg):
  """Augmented views of a batch, one per column of `keys` [b, V] (from
  `view_keys`): uint8 [b, H, W, C] -> list of V float32 [b, S, S, C] in [0, 1]."""
  images = images_uint8.astype(jnp.float32) / 255.0
  view = jax.vmap(lambda k, x: simclr_view(k, x, cfg))
  return [view(keys[:, i], images) for i in range(keys.shape[1])]


def eval_view(images_uint8, image_size: int):
  """uint8 [b, H, W, C] -> float32 [b, S, S, C] in [0, 1], no randomness."""
  images = images_uint8.astype(jnp.float32) / 255.0
  return jax.vmap(lambda x: resize(x, (image_size, image_size)))(images)


def standardize_patches(patches_uint8, mean, std):
  """NaFlex patches uint8 [..., p p C] (flattened by row, column, channel) ->
  float32 (x / 255 - mean) / std per channel."""
  channels = max(len(mean), len(std))
  x = patches_uint8.astype(jnp.float32) / 255.0
  x = x.reshape(*x.shape[:-1], -1, channels)
  return standardize(x, mean, std).reshape(patches_uint8.shape)


def standardize(images, mean, std):
  """(images - mean) / std per channel; the encoder's input normalization."""
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  return (images - mean) / std
