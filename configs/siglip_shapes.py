"""SigLIP on the embedded captioned shapes: clip_shapes.py with the sigmoid loss.

  jaxcl train --config configs/siglip_shapes.py --workdir workdirs/siglip_shapes

recipes.captioned_shapes (the same data, towers and schedule as
clip_shapes.py) trained with SigLIP's pairwise sigmoid loss, τ learnable
from 0.1 and the logit bias from -10, as in the SigLIP paper.
Result on the 2-core CPU (seed 0, README's table): zeroshot_top1 0.882,
i2t_r1 0.468, t2i_r1 0.461, in about 7 minutes.
"""

from jaxcl.config import recipes


def get_config():
  config = recipes.captioned_shapes('siglip')
  config.name = 'siglip_shapes'
  config.temperature.update(mode='learnable', init=0.1, min=0.01, max=1.0, bias_init=-10.0)
  return config
