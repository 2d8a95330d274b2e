"""CLIP on the embedded captioned shapes: the image-text default, no network needed.

  jaxcl train --config configs/clip_shapes.py --workdir workdirs/clip_shapes

recipes.captioned_shapes (a small ViT and a causal byte-level text
Transformer, 1,000 steps of batch 256 on 10,000 generated 32x32 images of
colored shapes with captions) trained with CLIP's symmetric InfoNCE over the
global batch, τ learnable from 0.07 and clamped so that 1/τ <= 100.
Result on the 2-core CPU (seed 0, README's table): zeroshot_top1 0.947 over
24 color-shape classes (chance 0.042), i2t_r1 0.478, t2i_r1 0.475, in about
7 minutes.
"""

from jaxcl.config import recipes


def get_config():
  config = recipes.captioned_shapes('clip')
  config.name = 'clip_shapes'
  config.temperature.update(mode='learnable', init=0.07, min=0.01, max=1.0)
  return config
