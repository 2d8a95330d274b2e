"""The names and sizes jaxcl knows, as plain data: a leaf every layer may
import (config validation among them) without loading jax, flax or TFDS."""

from __future__ import annotations

import math

MODEL_DTYPES = ('float32', 'bfloat16', 'float16')
LOSS_IMPLS = ('auto', 'dense', 'blockwise', 'ring')  # jaxcl.losses / jaxcl.losses.tiled
LOSS_IMPL = 'auto'  # loss.impl's default, and the losses' own
LOSS_BLOCK_SIZE = 1024  # loss.block_size's default, and the tiled losses' own
LOSS_ESTIMATORS = ('batch', 'sogclr')  # jaxcl.losses.estimators
RESOLUTIONS = ('square', 'naflex')  # dataset.resolution: resized to a square, or NaFlex
DATASET_CROPS = ('center', 'random', 'squash')  # dataset.crop: the host's crop to image_size
OPTIMIZERS = ('lars', 'adamw', 'sgd')  # jaxcl.trainer.optim
STATE_DTYPES = ('float32', 'bfloat16')  # optimizer.mu_dtype: Adam's first moment, SGD's momentum
# What a Transformer block keeps for its backward pass (jaxcl.models.transformer.run_blocks):
# everything, nothing (recomputed), or its matmul outputs (all, or those without batch dims).
REMAT_POLICIES = ('none', 'full', 'dots', 'dots_no_batch')
# jaxcl.models.temperature
# LocCa's decoder tasks (jaxcl.data.locca).
DECODER_TASKS = ('caption', 'refer', 'ground')
TEMPERATURE_MODES = ('fixed', 'learnable', 'cosine', 'free', 'individual', 'predicted')
TOKENIZERS = ('bytes', 'sentencepiece', 'clip_bpe')  # jaxcl.text.tokenizers
# sentencepiece's text.normalize: none, SiglipTokenizer's, SigLIP 2's lower case (Siglip2Tokenizer),
# and open_clip's HFTokenizer cleanings (its SigLIP and SigLIP 2 models: 'canonicalize').
TEXT_NORMALIZERS = ('', 'siglip', 'lower', 'open_clip_canonicalize', 'open_clip_lower',
                    'open_clip_whitespace')

# name: (block kind, blocks per stage)
RESNETS = {
    'resnet18': ('basic', (2, 2, 2, 2)),
    'resnet34': ('basic', (3, 4, 6, 3)),
    'resnet50': ('bottleneck', (3, 4, 6, 3)),
}
# name: (patch size, width, depth, heads, MLP width), the ViT paper's presets
VITS = {
    'vit_ti16': (16, 192, 12, 3, 768),
    'vit_s16': (16, 384, 12, 6, 1536),
    'vit_b16': (16, 768, 12, 12, 3072),
    'vit_l16': (16, 1024, 24, 16, 4096),
}
VIT_NAMES = (*VITS, 'vit')  # 'vit': every size from model.vit.*
IMAGE_TOWERS = (*RESNETS, *VIT_NAMES)
VIT_SIZES = ('patch_size', 'width', 'depth', 'heads', 'mlp_dim')  # the order of VITS' tuples
VIT_POOLS = ('gap', 'cls', 'map')  # mean of patches, class token (CLIP), attention probe (SigLIP)
TEXT_POOLS = ('eot', 'last')  # end-of-text token (CLIP), last position (SigLIP)
ACTIVATIONS = ('gelu_tanh', 'gelu', 'quick_gelu')  # jaxcl.models.transformer.ACTIVATIONS
LOADABLE = ('image', 'text', 'temperature')  # the parts init.load may name (Method.towers)


def vit_sizes(model_cfg) -> dict:
  """{patch_size, width, depth, heads, mlp_dim} of config.model: the preset
  of model.name (none for 'vit'), each overridden by a non-zero model.vit.* value."""
  preset = VITS.get(model_cfg.name, (0,) * len(VIT_SIZES))
  return {key: model_cfg.vit[key] or value for key, value in zip(VIT_SIZES, preset)}

# Image normalization (mean, std) of the published families, for sources that
# do not say (open_clip's OPENAI_DATASET_MEAN/STD; SigLIP's inputs are in [-1, 1]).
CLIP_MEAN_STD = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
SIGLIP_MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def _clip(patch, width, depth, text_width, text_heads, text_depth, embed_dim, image_size=224,
          act='gelu', heads=0):
  """CLIP (OpenAI / open_clip): class token, ln_pre, 64-wide heads, MLP 4x,
  LayerNorm eps 1e-5, causal text of 77 BPE tokens pooled at end-of-text."""
  return {
      'method': 'clip', 'model.name': 'vit', 'model.embed_dim': embed_dim,
      'model.image_projection': True, 'augment.image_size': image_size,
      'model.vit.patch_size': patch, 'model.vit.width': width, 'model.vit.depth': depth,
      'model.vit.heads': heads or width // 64, 'model.vit.mlp_dim': 4 * width,
      'model.vit.pool': 'cls', 'model.vit.act': act, 'model.vit.norm_eps': 1e-5,
      'model.vit.pre_norm': True, 'model.vit.patch_bias': False,
      'text.tokenizer': 'clip_bpe', 'text.max_length': 77, 'text.width': text_width,
      'text.depth': text_depth, 'text.heads': text_heads, 'text.mlp_dim': 4 * text_width,
      'text.causal': True, 'text.pool': 'eot', 'text.act': act, 'text.norm_eps': 1e-5,
      'text.projection_bias': False, 'text.pad_id': -1, 'text.normalize': '',
      'dataset.mean': CLIP_MEAN_STD[0], 'dataset.std': CLIP_MEAN_STD[1],
  }


def _siglip(patch, width, depth, heads, mlp_dim, text_length, image_size=224, text_act='gelu'):
  """SigLIP (big_vision, timm/open_clip): no class token, MAP head, GELU
  (tanh), eps 1e-6, the image tower's output is the embedding; bidirectional
  text of SentencePiece tokens (32k) pooled at the last position, with a
  biased head. open_clip's SigLIP text tower uses exact GELU (its configs
  say so only for SigLIP 2): its checkpoints are read as their config says."""
  return {
      'method': 'siglip', 'model.name': 'vit', 'model.embed_dim': width,
      'model.image_projection': False, 'augment.image_size': image_size,
      'model.vit.patch_size': patch, 'model.vit.width': width, 'model.vit.depth': depth,
      'model.vit.heads': heads, 'model.vit.mlp_dim': mlp_dim, 'model.vit.pool': 'map',
      'model.vit.act': 'gelu_tanh', 'model.vit.norm_eps': 1e-6, 'model.vit.pre_norm': False,
      'model.vit.patch_bias': True,
      'text.tokenizer': 'sentencepiece', 'text.max_length': text_length, 'text.width': width,
      'text.depth': depth, 'text.heads': heads, 'text.mlp_dim': mlp_dim, 'text.causal': False,
      'text.pool': 'last', 'text.act': text_act, 'text.norm_eps': 1e-6,
      'text.projection_bias': True,
      # SiglipTokenizer's text: canonicalized, padded with the EOS of Google's c4_en model.
      'text.pad_id': 1, 'text.normalize': 'siglip',
      'dataset.mean': SIGLIP_MEAN_STD[0], 'dataset.std': SIGLIP_MEAN_STD[1],
  }


def _siglip2(patch, width, depth, heads, mlp_dim, image_size=224):
  """SigLIP 2: SigLIP's towers (both GELU with tanh), 64 tokens of Gemma's
  SentencePiece model of lower-cased text (transformers' Siglip2Tokenizer),
  padded with its pad id 0."""
  return {**_siglip(patch, width, depth, heads, mlp_dim, 64, image_size, text_act='gelu_tanh'),
          'text.pad_id': -1, 'text.normalize': 'lower'}


# open_clip's model names -> the config values of that architecture, from the
# published configs (open_clip's model_configs/*.json; for SigLIP's timm image
# towers, timm's vit_*_siglip_* definitions). recipes.architecture applies one.
ARCHITECTURES = {
    'ViT-B-32': _clip(32, 768, 12, 512, 8, 12, 512),
    'ViT-B-32-quickgelu': _clip(32, 768, 12, 512, 8, 12, 512, act='quick_gelu'),
    'ViT-B-16': _clip(16, 768, 12, 512, 8, 12, 512),
    'ViT-B-16-quickgelu': _clip(16, 768, 12, 512, 8, 12, 512, act='quick_gelu'),
    'ViT-L-14': _clip(14, 1024, 24, 768, 12, 12, 768),
    'ViT-L-14-quickgelu': _clip(14, 1024, 24, 768, 12, 12, 768, act='quick_gelu'),
    'ViT-L-14-336': _clip(14, 1024, 24, 768, 12, 12, 768, image_size=336),
    'ViT-L-14-336-quickgelu': _clip(14, 1024, 24, 768, 12, 12, 768, image_size=336,
                                    act='quick_gelu'),
    'ViT-H-14': _clip(14, 1280, 32, 1024, 16, 24, 1024, heads=16),
    'ViT-B-16-SigLIP': _siglip(16, 768, 12, 12, 3072, 64),
    'ViT-B-16-SigLIP-256': _siglip(16, 768, 12, 12, 3072, 64, image_size=256),
    'ViT-B-16-SigLIP-384': _siglip(16, 768, 12, 12, 3072, 64, image_size=384),
    'ViT-B-16-SigLIP-512': _siglip(16, 768, 12, 12, 3072, 64, image_size=512),
    'ViT-L-16-SigLIP-256': _siglip(16, 1024, 24, 16, 4096, 64, image_size=256),
    'ViT-L-16-SigLIP-384': _siglip(16, 1024, 24, 16, 4096, 64, image_size=384),
    'ViT-SO400M-14-SigLIP': _siglip(14, 1152, 27, 16, 4304, 16),
    'ViT-SO400M-14-SigLIP-384': _siglip(14, 1152, 27, 16, 4304, 64, image_size=384),
    # SigLIP 2 (the fixed-resolution towers; NaFlex ones are these at the learned grid's
    # size with dataset.resolution=naflex): Gemma's 256k tokens of lower-cased text.
    'ViT-B-16-SigLIP2': _siglip2(16, 768, 12, 12, 3072),
    'ViT-B-16-SigLIP2-256': _siglip2(16, 768, 12, 12, 3072, image_size=256),
    'ViT-B-16-SigLIP2-384': _siglip2(16, 768, 12, 12, 3072, image_size=384),
    'ViT-B-16-SigLIP2-512': _siglip2(16, 768, 12, 12, 3072, image_size=512),
    'ViT-B-32-SigLIP2-256': _siglip2(32, 768, 12, 12, 3072, image_size=256),
    'ViT-L-16-SigLIP2-256': _siglip2(16, 1024, 24, 16, 4096, image_size=256),
    'ViT-L-16-SigLIP2-384': _siglip2(16, 1024, 24, 16, 4096, image_size=384),
    'ViT-L-16-SigLIP2-512': _siglip2(16, 1024, 24, 16, 4096, image_size=512),
    'ViT-SO400M-14-SigLIP2': _siglip2(14, 1152, 27, 16, 4304),
    'ViT-SO400M-14-SigLIP2-378': _siglip2(14, 1152, 27, 16, 4304, image_size=378),
    'ViT-SO400M-16-SigLIP2-256': _siglip2(16, 1152, 27, 16, 4304, image_size=256),
    'ViT-SO400M-16-SigLIP2-384': _siglip2(16, 1152, 27, 16, 4304, image_size=384),
    'ViT-SO400M-16-SigLIP2-512': _siglip2(16, 1152, 27, 16, 4304, image_size=512),
}

# Prepared locally on first use, no network: digits and jaxcl.data.shapes'
# procedurally generated captioned shapes.
EMBEDDED_DATASETS = frozenset({'digits', 'captioned_shapes', 'captioned_shapes_flex'})
PAIRS = 'image_text_pairs'  # users' (image path, caption) files: jaxcl.data.pairs

MESH_AXES = ('data', 'fsdp')  # known axes, in mesh order
BATCH_AXES = ('data', 'fsdp')  # the axes the batch is split over


def mesh_shape(mesh_cfg, num_devices: int) -> dict[str, int]:
  """{axis: size} of config.mesh on `num_devices`: resolves -1 and checks the
  product; raises ValueError with a clear message."""
  sizes = dict(mesh_cfg.items()) if hasattr(mesh_cfg, 'items') else dict(mesh_cfg)
  unknown = set(sizes) - set(MESH_AXES)
  if unknown:
    raise ValueError(f'unknown mesh axes {sorted(unknown)}; known: {list(MESH_AXES)}')
  sizes = {name: int(sizes.get(name, 1)) for name in MESH_AXES}
  free = [n for n, s in sizes.items() if s == -1]
  if len(free) > 1:
    raise ValueError('at most one mesh axis may be -1')
  if any(s == 0 or s < -1 for s in sizes.values()):
    raise ValueError(f'mesh axis sizes must be positive or -1, got {sizes}')
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if free:
    if num_devices % fixed:
      raise ValueError(f'mesh {sizes} does not divide the {num_devices} devices')
    sizes[free[0]] = num_devices // fixed
  if math.prod(sizes.values()) != num_devices:
    raise ValueError(f'mesh {sizes} needs {math.prod(sizes.values())} devices, '
                     f'there are {num_devices}')
  return sizes
