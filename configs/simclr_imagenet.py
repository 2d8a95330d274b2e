"""SimCLR on ImageNet: the paper's recipe for TPU pods.

ResNet-50, global batch 4096, LARS (LR = 0.3 x batch / 256, 10 warm-up
epochs, weight decay 1e-6), τ = 0.1, 100 epochs, global batch norm (always:
the encoder runs on the whole sharded batch), full augmentations with blur.
ImageNet must be prepared in array_record format (manual download, see
TFDS's imagenet2012 page); images are stored at 256x256 (center crop) and
cropped to 224 on device.

  jaxcl train --config configs/simclr_imagenet.py --workdir gs://BUCKET/simclr_r50

Expected (SimCLR paper): ~64.5% linear top-1 at 100 epochs with batch 4096
(69.3% at 1000 epochs); the kNN and linear probes here use a 100k-image
subset of train. Not measured here.
"""

from jaxcl.config import base_config, recipes


def get_config():
  config = base_config()
  config.name = 'simclr_imagenet'
  config.batch_size = 4096
  recipes.simclr_lars(config, train_size=1_281_167, epochs=100)
  config.log_every_steps = 100
  config.eval_every_steps = 5_000
  config.checkpoint_every_steps = 1_000
  config.dataset.update(name='imagenet2012', eval_test_split='validation', image_size=256,
                        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
  recipes.simclr_augment(config, image_size=224, jitter_strength=1.0, blur_prob=0.5)
  config.model.update(name='resnet50', stage_sizes=(), width=64, small_images=False,
                      head_hidden=2048, head_out=128, head_layers=2, dtype='bfloat16')
  config.temperature.update(mode='fixed', init=0.1, min=0.01, max=1.0)
  config.eval.update(batch_size=1024, max_train_examples=100_000, knn_k=20, probe_steps=5000,
                     probe_batch_size=4096)
  return config
