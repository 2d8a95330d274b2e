"""CLIP on the embedded captioned shapes: the image-text default, no network needed.

  jaxcl train --config configs/clip_shapes.py --workdir workdirs/clip_shapes

recipes.captioned_shapes (a small ViT and a causal byte-level text
Transformer, 1,000 steps of batch 256 on 10,000 generated 32x32 images of
colored shapes with captions) trained with CLIP's symmetric InfoNCE over the
global batch, τ learnable from 0.07 and clamped so that 1/τ <= 100.
Result on the 2-core CPU, mean [min, max] over seeds 0-2 (docs/results.md):
zeroshot_top1 0.940 [0.927, 0.948] over 24 color-shape classes (chance
0.042), i2t_r1 0.486 [0.472, 0.496], t2i_r1 0.473 [0.467, 0.476], in 7-14
minutes.
"""

from jaxcl.config import recipes


def get_config():
  config = recipes.captioned_shapes('clip')
  config.name = 'clip_shapes'
  config.temperature.update(mode='learnable', init=0.07, min=0.01, max=1.0)
  return config
