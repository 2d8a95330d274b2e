"""Encoders and the two contrastive models (Flax NNX).

Image towers: ResNet-18/34/50 (He et al.) with an optional CIFAR-style stem
(3x3 stride-1 conv, no max-pool) for small images, and ViT (Dosovitskiy et
al.; jaxcl.models.transformer, with the text tower).

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

from jaxcl.models.temperature import Temperature
from jaxcl.models.transformer import TextTransformer, ViT
from jaxcl.presets import IMAGE_TOWERS, RESNETS, VIT_NAMES, vit_sizes

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
    self.shortcut = (nnx.Sequential(_conv(cin, cout, 1, stride, rngs, dtype),
                                    _bn(cout, rngs, dtype))
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
    self.shortcut = (nnx.Sequential(_conv(cin, cout, 1, stride, rngs, dtype),
                                    _bn(cout, rngs, dtype))
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


class LogitBias(nnx.Module):
  """SigLIP's learnable logit bias b (a scalar parameter, init -10)."""

  def __init__(self, init: float):
    self.value = nnx.Param(jnp.asarray(init, jnp.float32))

  def __call__(self):
    return self.value[...]


# TwoTowerModel's parts only training uses (config.decoder, config.self_distill):
# exports leave them behind.
TRAINING_ONLY = ('decoder', 'self_distill')


class TwoTowerModel(nnx.Module):
  """CLIP / SigLIP: image and text towers projected to one embedding space.

  `embed_image(images)` [b, H, W, C] (or NaFlex {'patches', 'grid'}) -> [b, D]
  and `embed_text(ids)` [b, L]
  -> [b, D] give L2-normalized embeddings; `embed` is `embed_image` (the
  image embedder that evaluation and export use). `bias` is None for CLIP.
  image_projection=False: the image tower's features are the embedding
  (SigLIP's MAP head ends in the shared space); text_projection_bias: the
  text projection has a bias (SigLIP's text head).
  """

  def __init__(self, *, image_encoder, text_encoder: TextTransformer, embed_dim: int,
               temperature: Temperature, bias: LogitBias | None, rngs: nnx.Rngs,
               image_projection: bool = True, text_projection_bias: bool = False,
               temperature_t2i: Temperature | None = None, decoder=None, self_distill=None):
    self.image_encoder, self.text_encoder = image_encoder, text_encoder
    if decoder is not None:  # config.decoder: SigLIP 2's (jaxcl.models.decoder), training only
      self.decoder = decoder
    if self_distill is not None:  # config.self_distill: its heads (jaxcl.models.self_distill)
      self.self_distill = self_distill
    proj_init = lambda width: nnx.initializers.normal(width ** -0.5)
    if not image_projection and image_encoder.num_features != embed_dim:
      raise ValueError(f'without an image projection the image features '
                       f'({image_encoder.num_features}) must have model.embed_dim ({embed_dim})')
    self.image_proj = (nnx.Linear(image_encoder.num_features, embed_dim, use_bias=False,
                                  kernel_init=proj_init(image_encoder.num_features), rngs=rngs)
                       if image_projection else None)
    self.text_proj = nnx.Linear(text_encoder.num_features, embed_dim,
                                use_bias=text_projection_bias,
                                kernel_init=proj_init(text_encoder.num_features), rngs=rngs)
    self.temperature, self.bias = temperature, bias
    if temperature_t2i is not None:  # temperature.per_direction: text-to-image's own τ
      self.temperature_t2i = temperature_t2i

  def embed_image(self, images):
    features = (self.image_encoder(images['patches'], images['grid'])
                if isinstance(images, dict) else self.image_encoder(images))
    return l2_normalize(features if self.image_proj is None else self.image_proj(features))

  def image_tokens(self, images):
    """A ViT's (tokens, lengths) of images or NaFlex patches."""
    if isinstance(images, dict):
      return self.image_encoder.tokens(images['patches'], images['grid'])
    return self.image_encoder.tokens(images)

  def _image_embedding(self, tokens, lengths):
    """embed_image's result from the ViT's tokens (its pooling, the projection)."""
    features = self.image_encoder.pooled(tokens, lengths)
    return l2_normalize(features if self.image_proj is None else self.image_proj(features))

  def embed_text(self, ids):
    return l2_normalize(self.text_proj(self.text_encoder(ids)))

  def embed(self, images):
    return self.embed_image(images)

  def __call__(self, images, ids, decoder_rows=None):
    """(image, text embeddings [b, D]); with decoder_rows (the decoder's ids
    [b, L], which rows it predicts in parallel [b]) also its logits [b, L, V]
    from the same image tokens."""
    if decoder_rows is None:
      return self.embed_image(images), self.embed_text(ids)
    tokens, lengths = self.image_tokens(images)
    logits = self.decoder(tokens, *decoder_rows, image_lengths=lengths)
    return self._image_embedding(tokens, lengths), self.embed_text(ids), logits


def build_image_encoder(m, in_channels: int, image_size: int, rngs: nnx.Rngs):
  """The image tower `model.name` names. m: the config's `model` group."""
  dtype = activation_dtype(m)
  if m.name in RESNETS:
    block, stages = RESNETS[m.name]
    if m.get('stage_sizes'):
      stages = tuple(m.stage_sizes)
    return ResNet(block=block, stage_sizes=stages, in_channels=in_channels, width=m.width,
                  small_images=m.small_images, rngs=rngs, dtype=dtype)
  if m.name in VIT_NAMES:
    v = m.vit
    return ViT(image_size=image_size, in_channels=in_channels, pool=v.pool, act=v.act,
               norm_eps=v.norm_eps, pre_norm=v.pre_norm, patch_bias=v.patch_bias,
               remat=m.remat, scan_layers=m.scan_layers, rngs=rngs, dtype=dtype,
               **vit_sizes(m))
  raise ValueError(f'unknown model.name {m.name!r}; choose one of {list(IMAGE_TOWERS)}')


def activation_dtype(m):
  """The dtype of the towers' activations (`model.dtype`); parameters stay float32."""
  return jnp.dtype(m.dtype)


def build_temperature(temperature_config, total_steps: int, embed_dim: int = 0,
                      rngs=None) -> Temperature:
  """The τ of the config's `temperature` group; a cosine period of 0 spans
  the run's total_steps; embed_dim: the embeddings a predicted τ reads."""
  t = temperature_config
  return Temperature(mode=t.mode, init=t.init, min=t.min, max=t.max,
                     period=t.period or total_steps, warmup_steps=t.warmup_steps,
                     embed_dim=embed_dim, rngs=rngs)
