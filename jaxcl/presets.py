"""The names and sizes jaxcl knows, as plain data: a leaf every layer may
import (config validation among them) without loading jax, flax or TFDS."""

from __future__ import annotations

import math

MODEL_DTYPES = ('float32', 'bfloat16', 'float16')
LOSS_IMPLS = ('dense', 'blockwise', 'ring')  # jaxcl.losses / jaxcl.blockwise
OPTIMIZERS = ('lars', 'adamw', 'sgd')  # jaxcl.optim
TEMPERATURE_MODES = ('fixed', 'learnable', 'cosine')  # jaxcl.temperature
TOKENIZERS = ('bytes', 'sentencepiece')  # jaxcl.tokenizers

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
IMAGE_TOWERS = (*RESNETS, *VITS, 'vit')  # 'vit': every size from model.vit.*
VIT_SIZES = ('patch_size', 'width', 'depth', 'heads', 'mlp_dim')  # the order of VITS' tuples


def vit_sizes(model_cfg) -> dict:
  """{patch_size, width, depth, heads, mlp_dim} of config.model: the preset
  of model.name (none for 'vit'), each overridden by a non-zero model.vit.* value."""
  preset = VITS.get(model_cfg.name, (0,) * len(VIT_SIZES))
  return {key: model_cfg.vit[key] or value for key, value in zip(VIT_SIZES, preset)}

# Prepared locally on first use, no network: digits and jaxcl.data.shapes'
# procedurally generated captioned shapes.
EMBEDDED_DATASETS = frozenset({'digits', 'captioned_shapes'})
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
