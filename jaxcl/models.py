"""Encoders and the two contrastive models (Flax NNX).

Image towers: ResNet-18/34/50 (He et al.) with an optional CIFAR-style stem
(3x3 stride-1 conv, no max-pool) for small images, and ViT (Dosovitskiy et
al.) with the S/16 and B/16 presets. Text tower: a Transformer encoder over
token ids, causal (CLIP) or bidirectional, pooled at the end-of-text token.

The methods (jaxcl.methods) assemble them:
- SimCLRModel: image encoder + SimCLR's MLP head + temperature.
- TwoTowerModel (CLIP, SigLIP): image and text encoders, each with a linear
  projection to a shared embedding size, the temperature and, for SigLIP, the
  logit bias. Everything trained lives in one module, so it is checkpointed
  together.

Batch-norm statistics are global: the model runs under `jax.jit` on the whole
sharded batch, so a batch mean is a mean over every device (SimCLR's global BN).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxcl.temperature import Temperature

from jaxcl.presets import IMAGE_TOWERS, RESNETS, VITS, vit_sizes  # noqa: E402,F401  (re-exported)

_BN_MOMENTUM = 0.9  # the value of SimCLR's and torchvision's BN


def _conv(cin, cout, k, stride, rngs, dtype):
  return nnx.Conv(cin, cout, (k, k), strides=stride, padding='SAME', use_bias=False,
                  kernel_init=nnx.initializers.variance_scaling(2.0, 'fan_out', 'normal'),
                  dtype=dtype, rngs=rngs)


def _bn(c, rngs, dtype, zero_init=False):
  return nnx.BatchNorm(c, momentum=_BN_MOMENTUM, epsilon=1e-5, dtype=dtype,
                       scale_init=nnx.initializers.zeros if zero_init else nnx.initializers.ones,
                       rngs=rngs)


class BasicBlock(nnx.Module):
  expansion = 1

  def __init__(self, cin, width, stride, *, rngs, dtype):
    cout = width * self.expansion
    self.conv1, self.bn1 = _conv(cin, width, 3, stride, rngs, dtype), _bn(width, rngs, dtype)
    self.conv2 = _conv(width, cout, 3, 1, rngs, dtype)
    self.bn2 = _bn(cout, rngs, dtype, zero_init=True)  # each block starts as identity
    needs_projection = stride != 1 or cin != cout
    self.shortcut = (nnx.Sequential(_conv(cin, cout, 1, stride, rngs, dtype), _bn(cout, rngs, dtype))
                     if needs_projection else None)

  def __call__(self, x):
    y = jax.nn.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return jax.nn.relu(y + (x if self.shortcut is None else self.shortcut(x)))


class Bottleneck(nnx.Module):
  expansion = 4

  def __init__(self, cin, width, stride, *, rngs, dtype):
    cout = width * self.expansion
    self.conv1, self.bn1 = _conv(cin, width, 1, 1, rngs, dtype), _bn(width, rngs, dtype)
    self.conv2, self.bn2 = _conv(width, width, 3, stride, rngs, dtype), _bn(width, rngs, dtype)
    self.conv3 = _conv(width, cout, 1, 1, rngs, dtype)
    self.bn3 = _bn(cout, rngs, dtype, zero_init=True)
    needs_projection = stride != 1 or cin != cout
    self.shortcut = (nnx.Sequential(_conv(cin, cout, 1, stride, rngs, dtype), _bn(cout, rngs, dtype))
                     if needs_projection else None)

  def __call__(self, x):
    y = jax.nn.relu(self.bn1(self.conv1(x)))
    y = jax.nn.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return jax.nn.relu(y + (x if self.shortcut is None else self.shortcut(x)))


class ResNet(nnx.Module):
  """images [b, H, W, C] float -> features [b, width * 2^(stages-1) * expansion]."""

  def __init__(self, *, block: str, stage_sizes: Sequence[int], in_channels: int, width: int = 64,
               small_images: bool = False, rngs: nnx.Rngs, dtype=jnp.float32):
    block_cls = {'basic': BasicBlock, 'bottleneck': Bottleneck}[block]
    self.small_images = small_images
    if small_images:  # CIFAR stem: keep the resolution of 32x32 (or smaller) inputs
      self.stem = _conv(in_channels, width, 3, 1, rngs, dtype)
    else:
      self.stem = _conv(in_channels, width, 7, 2, rngs, dtype)
    self.stem_bn = _bn(width, rngs, dtype)
    blocks, cin = [], width
    for stage, num_blocks in enumerate(stage_sizes):
      for i in range(num_blocks):
        stride = 2 if stage > 0 and i == 0 else 1
        blocks.append(block_cls(cin, width * 2**stage, stride, rngs=rngs, dtype=dtype))
        cin = width * 2**stage * block_cls.expansion
    self.blocks = nnx.List(blocks)
    self.num_features = cin

  def __call__(self, x):
    x = jax.nn.relu(self.stem_bn(self.stem(x)))
    if not self.small_images:
      x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding='SAME')
    for block in self.blocks:
      x = block(x)
    return jnp.mean(x, axis=(1, 2)).astype(jnp.float32)


class ProjectionHead(nnx.Module):
  """SimCLR's MLP head: (Linear, BN, ReLU) x (layers - 1), then Linear."""

  def __init__(self, cin: int, hidden: int, out: int, layers: int, *, rngs: nnx.Rngs):
    hidden_layers = []
    for _ in range(layers - 1):
      hidden_layers += [nnx.Linear(cin, hidden, use_bias=False, rngs=rngs),
                        nnx.BatchNorm(hidden, momentum=_BN_MOMENTUM, rngs=rngs), jax.nn.relu]
      cin = hidden
    self.hidden = nnx.Sequential(*hidden_layers) if hidden_layers else None
    self.out = nnx.Linear(cin, out, rngs=rngs)

  def __call__(self, x):
    return self.out(x if self.hidden is None else self.hidden(x))


def l2_normalize(x, eps=1e-12):
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps))


class SimCLRModel(nnx.Module):
  """Encoder + projection head + temperature.

  `embed(images)` gives the encoder features used for evaluation and export;
  `__call__(images)` the L2-normalized projections the loss sees.
  """

  def __init__(self, *, encoder: ResNet, head: ProjectionHead, temperature: Temperature):
    self.encoder, self.head, self.temperature = encoder, head, temperature

  def embed(self, images):
    return self.encoder(images)

  def __call__(self, images):
    return l2_normalize(self.head(self.encoder(images)))


# ========================================================== transformers ====

_dense_init = nnx.initializers.xavier_uniform()


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
    b, t, width = x.shape
    q, k, v = jnp.split(self.qkv(x).reshape(b, t, 3 * self.heads, width // self.heads), 3, axis=2)
    y = jax.nn.dot_product_attention(q, k, v, is_causal=causal, key_value_seq_lengths=lengths)
    return self.out(y.reshape(b, t, width))


class TransformerBlock(nnx.Module):
  """Pre-LayerNorm block: x + attention(LN(x)), then x + MLP(LN(x))."""

  def __init__(self, width: int, heads: int, mlp_dim: int, *, rngs: nnx.Rngs, dtype):
    self.norm1 = nnx.LayerNorm(width, dtype=dtype, rngs=rngs)
    self.attention = Attention(width, heads, rngs=rngs, dtype=dtype)
    self.norm2 = nnx.LayerNorm(width, dtype=dtype, rngs=rngs)
    self.mlp_in = nnx.Linear(width, mlp_dim, kernel_init=_dense_init,
                             bias_init=nnx.initializers.normal(1e-6), dtype=dtype, rngs=rngs)
    self.mlp_out = nnx.Linear(mlp_dim, width, kernel_init=_dense_init,
                              bias_init=nnx.initializers.normal(1e-6), dtype=dtype, rngs=rngs)

  def __call__(self, x, *, causal: bool = False, lengths=None):
    x = x + self.attention(self.norm1(x), causal=causal, lengths=lengths)
    return x + self.mlp_out(jax.nn.gelu(self.mlp_in(self.norm2(x))))


class ViT(nnx.Module):
  """images [b, H, W, C] float -> features [b, width] float32.

  Patches of p x p pixels are embedded by a strided convolution, a learned
  position embedding is added, and the final LayerNorm's output is pooled:
  the mean over patches ('gap', big_vision's SigLIP default without a MAP
  head) or a class token ('cls', CLIP's).
  """

  def __init__(self, *, image_size: int, in_channels: int, patch_size: int, width: int,
               depth: int, heads: int, mlp_dim: int, pool: str = 'gap', rngs: nnx.Rngs,
               dtype=jnp.float32):
    if image_size % patch_size:
      raise ValueError(f'image size {image_size} is not divisible by the patch size {patch_size}')
    if pool not in ('gap', 'cls'):
      raise ValueError(f"ViT pool must be 'gap' or 'cls', got {pool!r}")
    self.pool, self.num_features = pool, width
    self.patchify = nnx.Conv(in_channels, width, (patch_size, patch_size), strides=patch_size,
                             padding='VALID', dtype=dtype, rngs=rngs)
    num_tokens = (image_size // patch_size) ** 2 + (pool == 'cls')
    self.position = nnx.Param(nnx.initializers.normal(width ** -0.5)(rngs.params(),
                                                                   (1, num_tokens, width)))
    self.cls = nnx.Param(jnp.zeros((1, 1, width))) if pool == 'cls' else None
    self.blocks = nnx.List([TransformerBlock(width, heads, mlp_dim, rngs=rngs, dtype=dtype)
                            for _ in range(depth)])
    self.norm = nnx.LayerNorm(width, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    x = self.patchify(x)
    b, h, w, width = x.shape
    x = x.reshape(b, h * w, width)
    if self.cls is not None:
      x = jnp.concatenate([jnp.broadcast_to(self.cls[...].astype(x.dtype), (b, 1, width)), x], 1)
    x = x + self.position[...].astype(x.dtype)
    for block in self.blocks:
      x = block(x)
    x = self.norm(x)
    pooled = x[:, 0] if self.pool == 'cls' else jnp.mean(x, axis=1)
    return pooled.astype(jnp.float32)


def end_of_text(ids, eot_id: int):
  """The position of the first end-of-text token in each row of ids [b, L]
  (the last position if a row has none) -> int32 [b]."""
  is_eot = ids == eot_id
  return jnp.where(jnp.any(is_eot, axis=1), jnp.argmax(is_eot, axis=1),
                   ids.shape[1] - 1).astype(jnp.int32)


class TextTransformer(nnx.Module):
  """Token ids int32 [b, L] -> features [b, width] float32, pooled at the
  end-of-text token.

  Causal (CLIP) or bidirectional attention; keys after the end-of-text token
  are masked either way, so padding never changes a caption's embedding.
  """

  def __init__(self, *, vocab_size: int, max_length: int, eot_id: int, width: int, depth: int,
               heads: int, mlp_dim: int, causal: bool, rngs: nnx.Rngs, dtype=jnp.float32):
    self.eot_id, self.causal, self.num_features = eot_id, causal, width
    self.embed = nnx.Embed(vocab_size, width, embedding_init=nnx.initializers.normal(0.02),
                           dtype=dtype, rngs=rngs)
    self.position = nnx.Param(nnx.initializers.normal(0.01)(rngs.params(), (1, max_length, width)))
    self.blocks = nnx.List([TransformerBlock(width, heads, mlp_dim, rngs=rngs, dtype=dtype)
                            for _ in range(depth)])
    self.norm = nnx.LayerNorm(width, dtype=dtype, rngs=rngs)

  def __call__(self, ids):
    eot = end_of_text(ids, self.eot_id)
    x = self.embed(ids)
    x = x + self.position[...][:, :ids.shape[1]].astype(x.dtype)
    for block in self.blocks:
      x = block(x, causal=self.causal, lengths=eot + 1)
    x = self.norm(x)
    return jnp.take_along_axis(x, eot[:, None, None], axis=1)[:, 0].astype(jnp.float32)


class LogitBias(nnx.Module):
  """SigLIP's learnable logit bias b (a scalar parameter, init -10)."""

  def __init__(self, init: float):
    self.value = nnx.Param(jnp.asarray(init, jnp.float32))

  def __call__(self):
    return self.value[...]


class TwoTowerModel(nnx.Module):
  """CLIP / SigLIP: image and text towers projected to one embedding space.

  `embed_image(images)` [b, H, W, C] -> [b, D] and `embed_text(ids)` [b, L]
  -> [b, D] give L2-normalized embeddings; `embed` is `embed_image` (the
  image embedder that evaluation and export use). `bias` is None for CLIP.
  """

  def __init__(self, *, image_encoder, text_encoder: TextTransformer, embed_dim: int,
               temperature: Temperature, bias: LogitBias | None, rngs: nnx.Rngs):
    self.image_encoder, self.text_encoder = image_encoder, text_encoder
    proj_init = lambda width: nnx.initializers.normal(width ** -0.5)
    self.image_proj = nnx.Linear(image_encoder.num_features, embed_dim, use_bias=False,
                                 kernel_init=proj_init(image_encoder.num_features), rngs=rngs)
    self.text_proj = nnx.Linear(text_encoder.num_features, embed_dim, use_bias=False,
                                kernel_init=proj_init(text_encoder.num_features), rngs=rngs)
    self.temperature, self.bias = temperature, bias

  def embed_image(self, images):
    return l2_normalize(self.image_proj(self.image_encoder(images)))

  def embed_text(self, ids):
    return l2_normalize(self.text_proj(self.text_encoder(ids)))

  def embed(self, images):
    return self.embed_image(images)

  def __call__(self, images, ids):
    return self.embed_image(images), self.embed_text(ids)


def build_image_encoder(m, in_channels: int, image_size: int, rngs: nnx.Rngs):
  """The image tower `model.name` names. m: the config's `model` group."""
  dtype = activation_dtype(m)
  if m.name in RESNETS:
    block, stages = RESNETS[m.name]
    if m.get('stage_sizes'):
      stages = tuple(m.stage_sizes)
    return ResNet(block=block, stage_sizes=stages, in_channels=in_channels, width=m.width,
                  small_images=m.small_images, rngs=rngs, dtype=dtype)
  if m.name in VITS or m.name == 'vit':
    return ViT(image_size=image_size, in_channels=in_channels, pool=m.vit.pool, rngs=rngs,
               dtype=dtype, **vit_sizes(m))
  raise ValueError(f'unknown model.name {m.name!r}; choose one of {list(IMAGE_TOWERS)}')


def activation_dtype(m):
  """The dtype of the towers' activations (`model.dtype`); parameters stay float32."""
  return jnp.dtype(m.get('dtype', 'float32'))


def build_temperature(config) -> Temperature:
  """The config's τ (`temperature` group); a cosine period of 0 spans the run."""
  t = config.temperature
  return Temperature(mode=t.mode, init=t.init, min=t.min, max=t.max,
                     period=t.period or config.total_steps, warmup_steps=t.warmup_steps)
