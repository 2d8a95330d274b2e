"""SimCLR on scikit-learn's digits: the embedded default, no network needed.

  jaxcl train --config configs/simclr_digits.py --workdir workdirs/digits

A small ResNet (one basic block per stage, widths 32-64-128, CIFAR stem) on
the 8x8 digits upsampled to 16x16, batch 256, AdamW, learnable τ from 0.2.
Expected on a 2-core CPU (see the README for the measured figures): about
3-4 minutes, knn_top1 and linear_top1 around 0.96-0.97 on the 297 test
digits, against 0.90 / 0.93 for the same encoder at total_steps=0.
"""

import ml_collections
from ml_collections import config_dict


def get_config():
  config = ml_collections.ConfigDict()
  config.name = "simclr_digits"
  config.seed = 0
  config.total_steps = 1500
  config.batch_size = 256
  config.log_every_steps = 50
  config.eval_every_steps = 500
  config.checkpoint_every_steps = 500
  config.keep_checkpoints = 3

  # -1: all devices. Axes are split over the batch; params are replicated.
  config.mesh = ml_collections.ConfigDict({'data': -1})

  config.dataset = ml_collections.ConfigDict(dict(
      name='digits',
      data_dir=config_dict.placeholder(str),  # TFDS default (~/tensorflow_datasets) when unset
      download=False,
      path='',  # for name='image_folder'
      train_split='train',  # pretraining split (labels unused)
      eval_train_split='train',  # labeled split the kNN bank and the probe train on
      eval_test_split='test',
      image_key='image',
      label_key='label',
      image_size=0,  # 0: the dataset's own fixed size
      mean=(0.5,),
      std=(0.5,),
  ))

  config.augment = ml_collections.ConfigDict(dict(
      image_size=16,  # the encoder's input resolution
      crop_scale_min=0.4,
      crop_scale_max=1.0,
      flip=False,  # digits are not mirror-symmetric
      color_jitter_prob=0.8,
      color_jitter_strength=0.5,
      grayscale_prob=0.0,
      blur_prob=0.0,
  ))

  config.model = ml_collections.ConfigDict(dict(
      name='resnet18',
      stage_sizes=(1, 1, 1),
      width=32,
      small_images=True,
      head_hidden=256,
      head_out=64,
      head_layers=2,
      dtype='float32',
  ))

  config.temperature = ml_collections.ConfigDict(dict(
      mode='learnable', init=0.2, min=0.01, max=1.0))

  config.optimizer = ml_collections.ConfigDict(dict(
      name='adamw',
      learning_rate=2e-3,
      scale_lr_by_batch=False,
      warmup_steps=100,
      weight_decay=1e-4,
      b1=0.9,
      b2=0.999,
      momentum=0.9,
      lars_trust_coefficient=0.001,
      grad_clip_norm=0.0,  # 0: off
  ))

  config.eval = ml_collections.ConfigDict(dict(
      batch_size=512,
      max_train_examples=0,  # 0: the whole labeled train split
      knn_k=20,
      knn_temperature=0.07,
      probe_steps=1000,
      probe_lr=1e-2,
      probe_l2=1e-4,
      probe_batch_size=4096,
  ))
  return config
