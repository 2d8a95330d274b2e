"""SigLIP on the embedded captioned shapes: clip_shapes.py with the sigmoid loss.

  jaxcl train --config configs/siglip_shapes.py --workdir workdirs/siglip_shapes

recipes.captioned_shapes (the same data, towers and schedule as
clip_shapes.py) trained with SigLIP's pairwise sigmoid loss, τ learnable
from 0.1 and the logit bias from -10, as in the SigLIP paper.
Result on the 2-core CPU, mean [min, max] over seeds 0-2 (docs/results.md):
zeroshot_top1 0.844 [0.810, 0.882], i2t_r1 0.456 [0.446, 0.468], t2i_r1
0.440 [0.428, 0.461], in 7-15 minutes.
"""

from jaxcl.config import recipes


def get_config():
  config = recipes.captioned_shapes('siglip')
  config.name = 'siglip_shapes'
  config.temperature.update(mode='learnable', init=0.1, min=0.01, max=1.0, bias_init=-10.0)
  return config
