"""CLIP on the embedded captioned shapes: the image-text default, no network needed.

  jaxcl train --config configs/clip_shapes.py --workdir workdirs/clip_shapes

Images of one or two colored shapes (32x32) with captions such as "a small
red circle in the top left"; 10,000 train and 1,000 test images, generated
on first use. A small ViT (patch 8, 3 blocks of width 128) and a causal
byte-level text Transformer (2 blocks of width 64), both projected to 64
dimensions, 1,000 steps of batch 256, trained with CLIP's symmetric InfoNCE over
the global batch, τ learnable from 0.07 and clamped so that 1/τ <= 100.
Zero-shot classification over the 24 color-shape classes (chance 1/24) uses
the dataset's prompt templates, averaged (prompt ensembling).
Expected on a 2-core CPU: see the README's table (zeroshot_top1 >= 0.90).
"""

from jaxcl.config import base_config


def get_config():
  config = base_config()
  config.name = 'clip_shapes'
  config.method = 'clip'
  config.total_steps = 1000
  config.batch_size = 256
  config.log_every_steps = 50
  config.eval_every_steps = 250
  config.checkpoint_every_steps = 500

  config.dataset.update(name='captioned_shapes', mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
  # Light augmentation: a mild crop, no flips (captions say left and right),
  # no color changes (captions name colors).
  config.augment.update(image_size=32, crop_scale_min=0.8, crop_scale_max=1.0, flip=False,
                        color_jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0)
  config.model.update(name='vit', embed_dim=64)
  config.model.vit.update(patch_size=8, width=128, depth=3, heads=4, mlp_dim=256, pool='gap')
  config.text.update(tokenizer='bytes', max_length=96, width=64, depth=2, heads=2, mlp_dim=128,
                     causal=True)
  config.temperature.update(mode='learnable', init=0.07, min=0.01, max=1.0)
  config.optimizer.update(name='adamw', learning_rate=1e-3, warmup_steps=100, weight_decay=0.1,
                          b2=0.98)
  config.eval.batch_size = 512
  return config
