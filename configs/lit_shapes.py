"""LiT on the captioned shapes: a locked image tower pretrained by SimCLR,
the text tower trained from scratch to match it (Zhai et al. 2022).

  jaxcl train --config configs/simclr_shapes.py --workdir workdirs/simclr_shapes
  jaxcl train --config configs/lit_shapes.py --workdir workdirs/lit_shapes

clip_shapes' recipe with its image encoder loaded from the SimCLR run
(init.from, init.load=image) and frozen (optimizer.frozen): no optimizer
state and no backward pass for it; the image projection, the text tower and
τ train. Another SimCLR run: --config.init.from=DIR. Result (2-core CPU,
seed 0): README's "Start from a published model" table, beside clip_shapes.
"""

from jaxcl import recipes


def get_config():
  config = recipes.captioned_shapes('clip')
  config.name = 'lit_shapes'
  config.temperature.update(mode='learnable', init=0.07, min=0.01, max=1.0)
  config.init.update({'from': 'workdirs/simclr_shapes', 'load': ('image',)})
  config.optimizer.frozen = ('image_encoder/.*',)
  return config
