"""The Transformer towers: a ViT image encoder and a text encoder (Flax NNX).

One implementation serves jaxcl's own small towers and the published
architectures whose checkpoints `jaxcl import` loads (jaxcl.hub); what
differs between them is a handful of switches, each named after what the
published model does:

- CLIP's ViT (Radford et al.): a class token, a LayerNorm before the
  blocks (`pre_norm`), a patch embedding without bias, QuickGELU (OpenAI's
  weights) or exact GELU, pooled at the class token.
- SigLIP's ViT (Zhai et al.): no class token, tanh-approximated GELU, pooled
  by a multi-head attention head with a learned probe ('map').
- CLIP's text tower: causal, pooled at the end-of-text token.
- SigLIP's text tower: bidirectional over the whole padded row, pooled at
  the last position.

The ViT also takes SigLIP 2's NaFlex input (Tschannen et al. 2025): each
image's patches at its native aspect ratio, flattened and padded to a fixed
count, with its patch grid; the learned position grid is resized to each
image's grid, and attention and pooling skip the padding. A square image's
full grid is the same computation as the image path.

Blocks are pre-LayerNorm: x + attention(LN(x)), then x + MLP(LN(x)).
Either tower may recompute its blocks' activations in the backward pass
(`remat`) and run its blocks as one scanned block (`scan_layers`); neither
changes the parameters' layout, so checkpoints load whichever is on.
Attention projects q, k and v with one fused kernel whose columns are
[q | k | v], each head's columns contiguous (torch's `in_proj_weight`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxcl import presets

_dense_init = nnx.initializers.xavier_uniform()

ACTIVATIONS = {
    'gelu_tanh': functools.partial(jax.nn.gelu, approximate=True),
    'gelu': functools.partial(jax.nn.gelu, approximate=False),
    'quick_gelu': lambda x: x * jax.nn.sigmoid(1.702 * x),  # OpenAI CLIP's
}
assert tuple(ACTIVATIONS) == presets.ACTIVATIONS


def _attend(q, k, v, heads: int, **mask):
  """q [b, tq, width], k, v [b, tk, width] -> [b, tq, width], split into heads."""
  b, tq, width = q.shape
  split = lambda x: x.reshape(*x.shape[:2], heads, width // heads)
  y = jax.nn.dot_product_attention(split(q), split(k), split(v), **mask)
  return y.reshape(b, tq, width)


class Attention(nnx.Module):
  """Multi-head self-attention: x [b, t, width] -> [b, t, width].

  Computed by `jax.nn.dot_product_attention` (its XLA implementation, which
  runs on every platform); key padding is given as per-row lengths, the form
  its fused kernels take too.
  """

  def __init__(self, width: int, heads: int, *, rngs: nnx.Rngs, dtype):
    if width % heads:
      raise ValueError(f'transformer width {width} is not divisible by {heads} heads')
    self.heads = heads
    self.qkv = nnx.Linear(width, 3 * width, kernel_init=_dense_init, dtype=dtype, rngs=rngs)
    self.out = nnx.Linear(width, width, kernel_init=_dense_init, dtype=dtype, rngs=rngs)

  def __call__(self, x, *, causal: bool = False, lengths=None):
    q, k, v = jnp.split(self.qkv(x), 3, axis=-1)
    return self.out(_attend(q, k, v, self.heads, is_causal=causal, key_value_seq_lengths=lengths))


def _mlp(owner, width: int, mlp_dim: int, act: str, rngs, dtype):
  """Gives `owner` the MLP's two layers, mlp_in and mlp_out, and its activation."""
  init = dict(kernel_init=_dense_init, bias_init=nnx.initializers.normal(1e-6), dtype=dtype,
              rngs=rngs)
  owner.mlp_in = nnx.Linear(width, mlp_dim, **init)
  owner.mlp_out = nnx.Linear(mlp_dim, width, **init)
  owner.act = act


def _apply_mlp(owner, x):
  return owner.mlp_out(ACTIVATIONS[owner.act](owner.mlp_in(x)))


class TransformerBlock(nnx.Module):
  """Pre-LayerNorm block: x + attention(LN(x)), then x + MLP(LN(x))."""

  def __init__(self, width: int, heads: int, mlp_dim: int, *, act: str = 'gelu_tanh',
               norm_eps: float = 1e-6, rngs: nnx.Rngs, dtype):
    self.norm1 = nnx.LayerNorm(width, epsilon=norm_eps, dtype=dtype, rngs=rngs)
    self.attention = Attention(width, heads, rngs=rngs, dtype=dtype)
    self.norm2 = nnx.LayerNorm(width, epsilon=norm_eps, dtype=dtype, rngs=rngs)
    _mlp(self, width, mlp_dim, act, rngs, dtype)

  def __call__(self, x, *, causal: bool = False, lengths=None):
    x = x + self.attention(self.norm1(x), causal=causal, lengths=lengths)
    return x + _apply_mlp(self, self.norm2(x))


_REMAT_POLICIES = {
    'full': None,  # nothing saved: the block's forward runs again in the backward pass
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
assert ('none', *_REMAT_POLICIES) == presets.REMAT_POLICIES


def run_blocks(blocks, x, *, remat: str = 'none', scan: bool = False, **kwargs):
  """x through each block in turn: block(x, **kwargs).

  scan: the blocks' parameters stacked and the block run under `lax.scan`,
  so the tower compiles one block whatever its depth. remat: what each block
  keeps for the backward pass (presets.REMAT_POLICIES; `jax.checkpoint`
  around the block), always scanned: in the scan's backward loop each block
  is recomputed right where its gradient needs it, while in an unrolled
  tower XLA may schedule the recomputations early and save nothing (its CPU
  buffer assignment did: benchmarks/RESULTS.md). The blocks stay separate
  modules either way (the stacking happens inside the step), so the
  parameters' layout, and with it every checkpoint and importer, is the
  plain tower's.
  """
  if remat == 'none' and not scan:
    for block in blocks:
      x = block(x, **kwargs)
    return x
  graphdef, _ = nnx.split(blocks[0])  # every block has the first's structure
  states = [nnx.split(block)[1] for block in blocks]

  def apply(state, x):
    return nnx.merge(graphdef, state)(x, **kwargs)

  if remat != 'none':  # inside a scan, which keeps XLA from merging it with the forward pass
    apply = jax.checkpoint(apply, policy=_REMAT_POLICIES[remat], prevent_cse=False)
  stacked = jax.tree.map(lambda *layers: jnp.stack(layers), *states)
  x, _ = jax.lax.scan(lambda x, state: (apply(state, x), None), x, stacked)
  return x


class MAPHead(nnx.Module):
  """Multi-head attention pooling (big_vision's MAPHead, SigLIP's image
  pooling): a learned probe attends over the tokens, then a residual MLP.
  x [b, t, width] -> [b, width]."""

  def __init__(self, width: int, heads: int, mlp_dim: int, *, act: str, norm_eps: float,
               rngs: nnx.Rngs, dtype):
    self.heads = heads
    self.probe = nnx.Param(_dense_init(rngs.params(), (1, 1, width)))
    self.query = nnx.Linear(width, width, kernel_init=_dense_init, dtype=dtype, rngs=rngs)
    self.key_value = nnx.Linear(width, 2 * width, kernel_init=_dense_init, dtype=dtype, rngs=rngs)
    self.out = nnx.Linear(width, width, kernel_init=_dense_init, dtype=dtype, rngs=rngs)
    self.norm = nnx.LayerNorm(width, epsilon=norm_eps, dtype=dtype, rngs=rngs)
    _mlp(self, width, mlp_dim, act, rngs, dtype)

  def __call__(self, x, lengths=None):
    """lengths [b]: each row's tokens before its padding (None: all)."""
    probe = jnp.broadcast_to(self.probe[...].astype(x.dtype), (x.shape[0], 1, x.shape[2]))
    k, v = jnp.split(self.key_value(x), 2, axis=-1)
    y = self.out(_attend(self.query(probe), k, v, self.heads, key_value_seq_lengths=lengths))
    return (y + _apply_mlp(self, self.norm(y)))[:, 0]


def position_weights(index, size, grid: int):
  """How output position `index` of a `size`-long axis mixes a learned axis
  of `grid` positions when it is resized to `size`: the row of
  jax.image.resize's bilinear, antialiased weight matrix (which matches
  torch's F.interpolate(mode='bilinear', antialias=True) that SigLIP 2
  uses), for traced index and size of any shape -> [..., grid] float32."""
  inv_scale = 1.0 / (size.astype(jnp.float32) / grid)
  kernel_scale = jnp.maximum(inv_scale, 1.0)[..., None]  # widened when shrinking
  sample = ((index.astype(jnp.float32) + 0.5) * inv_scale - 0.5)[..., None]
  weights = jnp.maximum(0.0, 1.0 - jnp.abs(sample - jnp.arange(grid)) / kernel_scale)
  return weights / jnp.sum(weights, axis=-1, keepdims=True)


def patchify(images, patch_size: int):
  """images [b, H, W, C] -> [b, (H/p)(W/p), p p C]: patches row by row, each
  flattened (row, column, channel), as SigLIP 2's processors lay them out."""
  b, h, w, c = images.shape
  p = patch_size
  x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


class ViT(nnx.Module):
  """images [b, H, W, C] float -> features [b, width] float32; or NaFlex
  patches [b, N, p p C] with their grids [b, 2] (rows, columns of patches;
  the first rows x columns patches are the image's, the rest padding).

  Patches of p x p pixels are embedded by a strided convolution (a linear
  map of flattened patches, the same kernel), a learned position embedding
  is added (resized to a NaFlex image's grid), and the final LayerNorm's
  output is pooled: the mean over patches ('gap'), a class token ('cls',
  CLIP's) or a multi-head attention probe ('map', SigLIP's).
  """

  def __init__(self, *, image_size: int, in_channels: int, patch_size: int, width: int,
               depth: int, heads: int, mlp_dim: int, pool: str = 'gap', act: str = 'gelu_tanh',
               norm_eps: float = 1e-6, pre_norm: bool = False, patch_bias: bool = True,
               remat: str = 'none', scan_layers: bool = False, rngs: nnx.Rngs,
               dtype=jnp.float32):
    if image_size % patch_size:
      raise ValueError(f'image size {image_size} is not divisible by the patch size {patch_size}')
    if pool not in presets.VIT_POOLS:
      raise ValueError(f'ViT pool must be one of {presets.VIT_POOLS}, got {pool!r}')
    self.pool, self.num_features = pool, width
    self.remat, self.scan_layers = remat, scan_layers
    self.patchify = nnx.Conv(in_channels, width, (patch_size, patch_size), strides=patch_size,
                             padding='VALID', use_bias=patch_bias, dtype=dtype, rngs=rngs)
    num_tokens = (image_size // patch_size) ** 2 + (pool == 'cls')
    self.position = nnx.Param(nnx.initializers.normal(width ** -0.5)(rngs.params(),
                                                                   (1, num_tokens, width)))
    self.cls = nnx.Param(jnp.zeros((1, 1, width))) if pool == 'cls' else None
    norm = lambda: nnx.LayerNorm(width, epsilon=norm_eps, dtype=dtype, rngs=rngs)
    self.pre_norm = norm() if pre_norm else None
    self.blocks = nnx.List([TransformerBlock(width, heads, mlp_dim, act=act, norm_eps=norm_eps,
                                             rngs=rngs, dtype=dtype) for _ in range(depth)])
    self.norm = norm()
    self.map_head = (MAPHead(width, heads, mlp_dim, act=act, norm_eps=norm_eps, rngs=rngs,
                             dtype=dtype) if pool == 'map' else None)

  def __call__(self, x, grid=None):
    return self.pooled(*self.tokens(x, grid))

  def tokens(self, x, grid=None, mask=None, mask_token=None):
    """(the final LayerNorm's tokens [b, T, width], each image's tokens
    before its padding [b] or None): the class token first for 'cls',
    then the patches row by row, unpooled (what dense probes and a
    decoder's cross-attention read). mask [b, patches] bool: those patches'
    embeddings replaced by mask_token [1, 1, width] before the positions
    are added (iBOT's and TIPS's masked image modeling)."""
    if grid is None:
      x = self.patchify(x)
      b, h, w, width = x.shape
      x, lengths = x.reshape(b, h * w, width), None
      position = self.position[...].astype(x.dtype)
    else:
      x, position, lengths = self._naflex_embed(x, grid)
    if mask is not None:
      x = jnp.where(mask[..., None], mask_token.astype(x.dtype), x)
    b, _, width = x.shape
    if self.cls is not None:
      x = jnp.concatenate([jnp.broadcast_to(self.cls[...].astype(x.dtype), (b, 1, width)), x], 1)
      lengths = None if lengths is None else lengths + 1
    x = x + position
    if self.pre_norm is not None:
      x = self.pre_norm(x)
    x = self.norm(run_blocks(self.blocks, x, remat=self.remat, scan=self.scan_layers,
                             lengths=lengths))
    return x, lengths

  def pooled(self, x, lengths):
    """tokens(...)'s output pooled as `pool` says: float32 [b, width]."""
    if self.pool == 'map':
      pooled = self.map_head(x, lengths)
    elif self.pool == 'cls':
      pooled = x[:, 0]
    elif lengths is None:
      pooled = jnp.mean(x, axis=1)
    else:  # the mean over each image's own patches
      valid = jnp.arange(x.shape[1])[None, :, None] < lengths[:, None, None]
      pooled = jnp.sum(jnp.where(valid, x, 0), axis=1) / lengths[:, None].astype(x.dtype)
    return pooled.astype(jnp.float32)

  def _naflex_embed(self, patches, grid):
    """(patch embeddings [b, N, width], their positions (the class token's
    first), tokens before the padding [b]) of NaFlex patches."""
    kernel = self.patchify.kernel[...]
    x = jnp.einsum('bnk,kd->bnd', patches.astype(self.patchify.dtype),
                   kernel.reshape(-1, kernel.shape[-1]).astype(self.patchify.dtype))
    if self.patchify.bias is not None:
      x = x + self.patchify.bias[...].astype(x.dtype)
    learned = self.position[...][0]  # [(1 +) g², width]
    cls_position, learned = (learned[:1], learned[1:]) if self.cls is not None else (None, learned)
    g = math.isqrt(learned.shape[0])
    rows, cols = grid[:, :1].astype(jnp.int32), grid[:, 1:].astype(jnp.int32)
    index = jnp.arange(patches.shape[1])[None, :]
    # Padding takes the first patch's place (as transformers' Siglip2 does).
    valid = index < rows * cols
    y = jnp.where(valid, index // jnp.maximum(cols, 1), 0)
    x_index = jnp.where(valid, index % jnp.maximum(cols, 1), 0)
    weights = (position_weights(y, rows, g)[..., :, None]
               * position_weights(x_index, cols, g)[..., None, :])  # [b, N, g, g]
    position = jnp.einsum('bnk,kd->bnd', weights.reshape(*weights.shape[:2], g * g),
                          learned.astype(jnp.float32)).astype(x.dtype)
    if cls_position is not None:
      position = jnp.concatenate(
          [jnp.broadcast_to(cls_position.astype(x.dtype), (x.shape[0], 1, x.shape[2])), position],
          axis=1)
    return x, position, (rows * cols)[:, 0]


def end_of_text(ids, eot_id: int):
  """The position of the first end-of-text token in each row of ids [b, L]
  (the last position if a row has none) -> int32 [b]."""
  is_eot = ids == eot_id
  return jnp.where(jnp.any(is_eot, axis=1), jnp.argmax(is_eot, axis=1),
                   ids.shape[1] - 1).astype(jnp.int32)


class TextTransformer(nnx.Module):
  """Token ids int32 [b, L] -> features [b, width] float32.

  pool='eot' (CLIP): pooled at the first end-of-text token, causal or
  bidirectional attention, keys after the end-of-text token masked either
  way, so padding never changes a caption's embedding. pool='last'
  (SigLIP): bidirectional over the whole row, pads included as the
  published model was trained, pooled at the last position.
  """

  def __init__(self, *, vocab_size: int, max_length: int, eot_id: int, width: int, depth: int,
               heads: int, mlp_dim: int, causal: bool, pool: str = 'eot',
               act: str = 'gelu_tanh', norm_eps: float = 1e-6, remat: str = 'none',
               scan_layers: bool = False, rngs: nnx.Rngs, dtype=jnp.float32):
    if pool not in presets.TEXT_POOLS:
      raise ValueError(f'text pool must be one of {presets.TEXT_POOLS}, got {pool!r}')
    self.eot_id, self.causal, self.pool, self.num_features = eot_id, causal, pool, width
    self.remat, self.scan_layers = remat, scan_layers
    self.embed = nnx.Embed(vocab_size, width, embedding_init=nnx.initializers.normal(0.02),
                           dtype=dtype, rngs=rngs)
    self.position = nnx.Param(nnx.initializers.normal(0.01)(rngs.params(), (1, max_length, width)))
    self.blocks = nnx.List([TransformerBlock(width, heads, mlp_dim, act=act, norm_eps=norm_eps,
                                             rngs=rngs, dtype=dtype) for _ in range(depth)])
    self.norm = nnx.LayerNorm(width, epsilon=norm_eps, dtype=dtype, rngs=rngs)

  def __call__(self, ids):
    if self.pool == 'last':
      pooled_at, lengths = jnp.full((ids.shape[0],), ids.shape[1] - 1, jnp.int32), None
    else:
      pooled_at = end_of_text(ids, self.eot_id)
      lengths = pooled_at + 1
    x = self.embed(ids)
    x = x + self.position[...][:, :ids.shape[1]].astype(x.dtype)
    x = self.norm(run_blocks(self.blocks, x, remat=self.remat, scan=self.scan_layers,
                             causal=self.causal, lengths=lengths))
    return jnp.take_along_axis(x, pooled_at[:, None, None], axis=1)[:, 0].astype(jnp.float32)
