"""The models (Flax NNX): towers, the temperature, and parameters by name.

The modules, each importing only those above it:

- param_groups: parameters by '/'-joined path, matched by pattern (plain
  Python; used by the optimizer, freezing, import and export).
- transformer: the ViT image encoder and the text encoder.
- decoder: a text decoder on the image tokens (SigLIP 2's LocCa decoder).
- self_distill: the prototype heads and mask token of SigLIP 2's
  self-distillation (SILC, TIPS).
- temperature: the contrastive temperature τ as a module, in every mode.
- towers: ResNets, projection heads, `SimCLRModel` and `TwoTowerModel`.

This package re-exports towers' public names: ``models.TwoTowerModel`` etc.
"""

from jaxcl.models import (  # noqa: F401  (import order)
  decoder,
  param_groups,
  self_distill,
  temperature,
  transformer,
)
from jaxcl.models.towers import (
  TRAINING_ONLY,
  BasicBlock,
  Bottleneck,
  LogitBias,
  ProjectionHead,
  ResNet,
  SimCLRModel,
  TwoTowerModel,
  activation_dtype,
  build_image_encoder,
  build_temperature,
  l2_normalize,
)

__all__ = [
    'BasicBlock', 'Bottleneck', 'LogitBias', 'ProjectionHead', 'ResNet', 'SimCLRModel',
    'TRAINING_ONLY',
    'TwoTowerModel', 'activation_dtype', 'build_image_encoder', 'build_temperature',
    'l2_normalize',
]
