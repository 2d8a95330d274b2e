"""LiT on the captioned shapes: a locked image tower pretrained by SimCLR,
the text tower trained from scratch to match it (Zhai et al. 2022).

  jaxcl train --config configs/simclr_shapes.py --workdir workdirs/simclr_shapes
  jaxcl train --config configs/lit_shapes.py --workdir workdirs/lit_shapes

clip_shapes' recipe with its image encoder loaded from the SimCLR run
(init.source, init.load=image) and frozen (optimizer.frozen): no optimizer
state and no backward pass for it; the image projection, the text tower and
τ train. Another SimCLR run: --config.init.source=DIR. Result (2-core CPU,
seed 0 only, so read it to about 1.5 points): zeroshot_top1 0.258
(clip_shapes: 0.940 over 3 seeds), bounded by the locked tower (its linear
probe: 0.269); 907 s against clip_shapes' 1,464 s in the same script.
"""

from jaxcl.config import recipes


def get_config():
  config = recipes.captioned_shapes('clip')
  config.name = 'lit_shapes'
  config.temperature.update(mode='learnable', init=0.07, min=0.01, max=1.0)
  config.init.update(source='workdirs/simclr_shapes', load=('image',))
  config.optimizer.frozen = ('image_encoder/.*',)
  return config
