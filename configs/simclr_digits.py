"""SimCLR on scikit-learn's digits: the embedded default, no network needed.

  jaxcl train --config configs/simclr_digits.py --workdir workdirs/digits

A small ResNet (one basic block per stage, widths 32-64-128, CIFAR stem) on
the 8x8 digits, batch 256, AdamW, learnable τ from 0.2, 600 steps.
Result on a 2-core CPU, mean [min, max] over seeds 0-2 (docs/results.md):
knn_top1 0.945 [0.936, 0.953] and linear_top1 0.946 [0.939, 0.953] on the
297 test digits, against 0.754 / 0.799 for the same encoder at
--config.total_steps=0; 2-5 minutes.
"""

from jaxcl.config import base_config


def get_config():
  config = base_config()
  config.name = 'simclr_digits'
  config.total_steps = 600
  config.batch_size = 256
  config.eval_every_steps = 300
  config.checkpoint_every_steps = 300

  config.dataset.update(name='digits', mean=(0.5,), std=(0.5,))
  config.augment.update(image_size=8, crop_scale_min=0.4,
                        flip=False,  # digits aren't mirror-symmetric
                        color_jitter_prob=0.8, color_jitter_strength=0.5, grayscale_prob=0.0,
                        blur_prob=0.0)
  config.model.update(name='resnet18', stage_sizes=(1, 1, 1), width=32, small_images=True,
                      head_hidden=256, head_out=64, head_layers=2)
  config.temperature.update(mode='learnable', init=0.2, min=0.01, max=1.0)
  config.optimizer.update(name='adamw', learning_rate=2e-3, warmup_steps=100, weight_decay=1e-4)
  return config
