"""SigLIP on captioned shapes of several aspect ratios: NaFlex against a square resize.

  jaxcl train --config configs/siglip_flex_shapes.py:naflex --workdir workdirs/flex_naflex
  jaxcl train --config configs/siglip_flex_shapes.py:square --workdir workdirs/flex_square

siglip_shapes.py on captioned_shapes_flex (the shapes on 32x32, 24x48,
48x24, 20x60 and 60x20 canvases). `naflex` (the default) keeps each image's
aspect ratio as SigLIP 2's NaFlex does: at most 16 patches of 8x8 pixels
(a 20x60 canvas becomes 2 x 7 patches), the 4 x 4 learned position grid
resized to each image's. `square` resizes the whole canvas to 32x32 (4 x 4
patches, SigLIP's resize), the same compute per image. Neither crops. Evaluation at 9, 16
and 25 patches from the final checkpoint: `jaxcl eval --workdir DIR
--max_patches 9,16,25` (naflex).

Results over 3 seeds: docs/naflex.md (python benchmarks/seeds.py --group naflex).
"""

from jaxcl.config import recipes


def get_config(resolution: str = 'naflex'):
  if resolution not in ('naflex', 'square'):
    raise ValueError(f"configs/siglip_flex_shapes.py takes 'naflex' or 'square', "
                     f'got {resolution!r}')
  config = recipes.captioned_shapes('siglip')
  config.name = f'siglip_flex_shapes_{resolution}'
  config.temperature.update(mode='learnable', init=0.1, min=0.01, max=1.0, bias_init=-10.0)
  config.dataset.update(name='captioned_shapes_flex', resolution=resolution, max_patches=(16,),
                        crop='squash', image_size=32)
  config.augment.crop_scale_min = 1.0  # no crop: the two differ by the resize alone
  return config
