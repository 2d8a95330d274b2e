"""SigLIP 2's recipe on the embedded captioned shapes: siglip_shapes.py plus
every term SigLIP 2 adds, sized for a 2-core CPU.

  jaxcl train --config configs/siglip2_shapes.py --workdir workdirs/siglip2_shapes

The sigmoid loss of siglip_shapes.py (the same data, towers and 1,000 steps),
and (docs/siglip2_recipe.md):
- the LocCa decoder on the image tower's patch tokens from the first step
  (captions, referring expressions, grounded captions; weight 1);
- from step 800 (SigLIP 2: the last 20% of training) an EMA teacher of the
  image tower, SILC's term (8 local crops of 16 px against the teacher's
  global crop) and TIPS's (half the student's patches masked), weighted as
  SigLIP 2 weights its B models: 1 and 0.25, times 0.25;
- DINO's heads scaled to this tower (256 hidden, 64 bottleneck, 1,024
  prototypes, where DINO has 2,048 / 256 / 65,536): a head costs about a
  quarter of a token's pass through the tower, as DINO's does beside a
  ViT-B.
`eval.json` adds the decoder's caption perplexity and referring accuracy and
the patch probe. What each term buys here, over three seeds:
docs/siglip2_recipe.md (`benchmarks/seeds.py --group siglip2`).
"""

from jaxcl.config import recipes


def get_config():
  config = recipes.captioned_shapes('siglip')
  config.name = 'siglip2_shapes'
  config.temperature.update(mode='learnable', init=0.1, min=0.01, max=1.0, bias_init=-10.0)
  recipes.siglip2_terms(config)  # the decoder; self-distillation from step 800
  config.self_distill.update(head_hidden=256, head_bottleneck=64, prototypes=1024)
  return config
