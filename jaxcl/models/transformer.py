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

Blocks are pre-LayerNorm: x + attention(LN(x)), then x + MLP(LN(x)).
Either tower may recompute its blocks' activations in the backward pass
(`remat`) and run its blocks as one scanned block (`scan_layers`); neither
changes the parameters' layout, so checkpoints load whichever is on.
Attention projects q, k and v with one fused kernel whose columns are
[q | k | v], each head's columns contiguous (torch's `in_proj_weight`).
"""

from __future__ import annotations

import functools

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

  def __call__(self, x):
    probe = jnp.broadcast_to(self.probe[...].astype(x.dtype), (x.shape[0], 1, x.shape[2]))
    k, v = jnp.split(self.key_value(x), 2, axis=-1)
    y = self.out(_attend(self.query(probe), k, v, self.heads))
    return (y + _apply_mlp(self, self.norm(y)))[:, 0]


class ViT(nnx.Module):
  """images [b, H, W, C] float -> features [b, width] float32.

  Patches of p x p pixels are embedded by a strided convolution, a learned
  position embedding is added, and the final LayerNorm's output is pooled:
  the mean over patches ('gap'), a class token ('cls', CLIP's) or a
  multi-head attention probe ('map', SigLIP's).
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

  def __call__(self, x):
    x = self.patchify(x)
    b, h, w, width = x.shape
    x = x.reshape(b, h * w, width)
    if self.cls is not None:
      x = jnp.concatenate([jnp.broadcast_to(self.cls[...].astype(x.dtype), (b, 1, width)), x], 1)
    x = x + self.position[...].astype(x.dtype)
    if self.pre_norm is not None:
      x = self.pre_norm(x)
    x = self.norm(run_blocks(self.blocks, x, remat=self.remat, scan=self.scan_layers))
    if self.pool == 'map':
      pooled = self.map_head(x)
    else:
      pooled = x[:, 0] if self.pool == 'cls' else jnp.mean(x, axis=1)
    return pooled.astype(jnp.float32)


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
