"""SigLIP 2's NaFlex input: the host's patches as transformers' Siglip2
processors make them; in the ViT, the position grid resized as SigLIP 2
resizes it, padding that changes nothing, and the square image's full grid
equal to the image path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import assert_close
from jaxcl.data import naflex
from jaxcl.models import transformer

# (rows, columns) of patch grids: equal to the learned 4 x 4 grid, smaller,
# larger, and far from square both ways.
GRIDS = [(4, 4), (3, 5), (2, 8), (1, 16), (7, 2), (6, 6), (9, 1)]


def _resized_by_weights(learned, rows, cols):
  """learned [g, g, D] resized to [rows, cols, D] by position_weights."""
  g = learned.shape[0]
  y, x = np.meshgrid(np.arange(rows), np.arange(cols), indexing='ij')
  wy = transformer.position_weights(jnp.asarray(y), jnp.full(y.shape, rows), g)
  wx = transformer.position_weights(jnp.asarray(x), jnp.full(x.shape, cols), g)
  return jnp.einsum('hwi,hwj,ijd->hwd', wy, wx, learned)


@pytest.mark.parametrize('rows, cols', GRIDS)
def test_position_weights_resize_as_the_references_do(rows, cols):
  """As big_vision's NaFlex ViT (jax.image's bilinear, antialiased resize:
  what SigLIP 2 trained with) and as transformers' Siglip2 (torch's
  F.interpolate) where torch agrees with it: torch's antialiased bilinear
  resize to a width of 1 copies the first row's result to every row (a
  1-column grid: an image at least 16 times taller than wide)."""
  torch = pytest.importorskip('torch')
  learned = np.random.default_rng(rows * 10 + cols).normal(size=(4, 4, 6)).astype(np.float32)
  got = _resized_by_weights(jnp.asarray(learned), rows, cols)
  # float32 sums of at most 16 products, differently ordered [measured 4.8e-7]
  np.testing.assert_allclose(got, jax.image.resize(learned, (rows, cols, 6), 'bilinear',
                                                   antialias=True), atol=1e-6, rtol=0)
  # transformers' Siglip2VisionEmbeddings.resize_positional_embeddings, on CPU
  want = torch.nn.functional.interpolate(
      torch.from_numpy(learned).permute(2, 0, 1)[None], size=(rows, cols), mode='bilinear',
      align_corners=False, antialias=True)[0].permute(1, 2, 0).numpy()
  if cols == 1 and rows > 1:
    assert np.allclose(want, want[:1]) and not np.allclose(got, got[:1])
  else:
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def _vit(pool):
  return transformer.ViT(image_size=16, in_channels=3, patch_size=4, width=16, depth=2, heads=2,
                         mlp_dim=32, pool=pool, rngs=nnx.Rngs(0))


@pytest.fixture(scope='module')
def vit():
  """SigLIP 2's tower: pooled by the attention probe."""
  return _vit('map')


@pytest.fixture(scope='module', params=['gap', 'map', 'cls'])
def any_vit(request):
  """Each pooling, whose masking differs: a masked mean, the probe's keys,
  the class token's attention."""
  return _vit(request.param)


@nnx.jit(static_argnames='grid_given')
def _embed(vit, x, grid, grid_given=True):
  return vit(x, grid if grid_given else None)


def _run(vit, x, grid=None):
  """vit(x, grid), compiled (op by op it takes seconds)."""
  return _embed(vit, x, jnp.zeros((x.shape[0], 2), jnp.int32) if grid is None else grid,
                grid_given=grid is not None)


def _images(n=2):
  return jax.random.normal(jax.random.key(1), (n, 16, 16, 3))


def test_a_full_grid_is_the_image_path(any_vit):
  vit = any_vit
  images = _images()
  patches = transformer.patchify(images, 4)
  padded = jnp.concatenate([patches, jnp.zeros((2, 3, 48))], axis=1)
  # a linear map of patches against a strided convolution, then the same tower
  assert_close(_run(vit, padded, jnp.array([[4, 4], [4, 4]])), _run(vit, images), rtol=2e-5,
               what='NaFlex full grid')


def test_padding_changes_nothing(any_vit):
  """Neither what the padding holds nor how much of it there is."""
  vit = any_vit
  patches = transformer.patchify(_images(), 4)[:, :12]  # a 3 x 4 grid of each image
  grid = jnp.array([[3, 4], [3, 4]])
  short = _run(vit, jnp.concatenate([patches, jnp.zeros((2, 4, 48))], axis=1), grid)
  noisy = _run(vit, jnp.concatenate([patches, 9 * jnp.ones((2, 20, 48))], axis=1), grid)
  assert_close(noisy, short, rtol=1e-5, what='padded to 16 vs 32 tokens')
  alone = _run(vit, patches[:1], grid[:1])  # no padding at all
  assert_close(alone, short[:1], rtol=1e-5, what='unpadded')


def test_each_image_has_its_own_grid(vit):
  """Two images of different shapes in one batch embed as they do alone."""
  wide = transformer.patchify(jax.random.normal(jax.random.key(2), (1, 8, 24, 3)), 4)  # 2 x 6
  tall = transformer.patchify(jax.random.normal(jax.random.key(3), (1, 20, 8, 3)), 4)  # 5 x 2
  pad = lambda x: jnp.concatenate([x, jnp.zeros((1, 12 - x.shape[1], 48))], axis=1)
  both = _run(vit, jnp.concatenate([pad(wide), pad(tall)]), jnp.array([[2, 6], [5, 2]]))
  assert_close(both[0], _run(vit, wide, jnp.array([[2, 6]]))[0], rtol=1e-5, what='wide')
  assert_close(both[1], _run(vit, tall, jnp.array([[5, 2]]))[0], rtol=1e-5, what='tall')
  assert not np.allclose(both[0], both[1])


# ------------------------------------------------------ the host's patches ---
@pytest.mark.parametrize('size, grid', [
    # (height, width) -> (rows, columns) at patch 16 and 256 patches, as
    # transformers' get_image_size_for_max_num_patches gives them
    ((480, 640), (14, 18)), ((224, 224), (16, 16)), ((1000, 300), (28, 9)),
    ((1080, 1920), (12, 21)), ((37, 2000), (2, 109)),
])
def test_grid_for_budget(size, grid):
  assert naflex.grid_for_budget(*size, 16, 256) == grid


# Shapes around the budget: wide, tall, square, tiny (upscaled), one row of patches,
# and the extremes, one pixel high and one pixel wide.
IMAGE_SIZES = [(30, 50), (17, 90), (64, 64), (100, 7), (5, 5), (3, 200), (1, 120), (90, 1)]


@pytest.mark.parametrize('processor', ['Siglip2ImageProcessorPil', 'Siglip2ImageProcessor'])
def test_patches_equal_the_reference_processor(processor):
  """transformers' processors (PIL, and torchvision's antialiased resize) on
  random images: the same grids, the same patches within one grey level."""
  siglip2 = pytest.importorskip('transformers.models.siglip2')
  reference = getattr(siglip2, processor)(patch_size=4, max_num_patches=64)
  rng = np.random.default_rng(0)
  for size in IMAGE_SIZES:
    image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    want = reference(images=[image], return_tensors='np', input_data_format='channels_last')
    patches, grid = naflex.to_patches(image, 4, 64)
    assert tuple(grid) == tuple(want['spatial_shapes'][0]), size
    n = int(want['pixel_attention_mask'][0].sum())
    assert n == grid[0] * grid[1] and not patches[n:].any()
    grey = np.round((want['pixel_values'][0][:n] * 0.5 + 0.5) * 255)  # mean = std = 0.5
    assert np.abs(grey - patches[:n]).max() <= 1, size
