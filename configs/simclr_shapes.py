"""SimCLR on the captioned shapes' images: the image tower LiT locks.

  jaxcl train --config configs/simclr_shapes.py --workdir workdirs/simclr_shapes

The same small ViT as clip_shapes (patch 8, 3 blocks of width 128, mean
pooled), trained by SimCLR on the 10,000 shapes images without their
captions. The augmentation is crops only: color and left/right are what the
captions name (the classes are colors x shapes), so color jitter and flips
would train the tower to ignore them. Evaluated by kNN and a linear probe on
the one-shape images' 24 color-shape labels. Result (2-core CPU, seed 0
only): knn_top1 0.156, linear_top1 0.269 after 1,000 steps, 1,588 s on a
shared machine: crops alone teach this tower little about color and form
(configs/lit_shapes.py locks it; README's "Start from a published model").
"""

from jaxcl.config import recipes


def get_config():
  config = recipes.captioned_shapes('simclr')
  config.name = 'simclr_shapes'
  config.augment.update(crop_scale_min=0.3)
  config.model.update(head_hidden=256, head_out=64, head_layers=2)
  config.temperature.update(mode='learnable', init=0.2, min=0.01, max=1.0)
  return config
