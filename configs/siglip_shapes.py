"""SigLIP on the embedded captioned shapes: clip_shapes.py with the sigmoid loss.

  jaxcl train --config configs/siglip_shapes.py --workdir workdirs/siglip_shapes

The same data, towers and schedule as configs/clip_shapes.py; the loss is
SigLIP's pairwise sigmoid with a learnable τ (init 0.1) and logit bias
(init -10), as in the SigLIP paper.
Expected on a 2-core CPU: see the README's table (zeroshot_top1 >= 0.85).
"""

import importlib.util
import os


def get_config():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'clip_shapes.py')
  spec = importlib.util.spec_from_file_location('clip_shapes', path)
  clip_shapes = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(clip_shapes)
  config = clip_shapes.get_config()
  config.name = 'siglip_shapes'
  config.method = 'siglip'
  config.temperature.update(mode='learnable', init=0.1, min=0.01, max=1.0, bias_init=-10.0)
  return config
