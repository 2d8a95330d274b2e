"""SimCLR on CIFAR-10: ResNet-18 with the CIFAR stem, batch 512, τ 0.5.

The recipe of SimCLR's CIFAR-10 example (batch 512, τ 0.5, no blur, color
jitter strength 0.5, LARS with LR = 1.0 x batch / 256... here 0.3 x batch /
256 with warm-up), on any machine with CIFAR-10 prepared in array_record
format (needs TensorFlow once, to encode the images):

  pip install tensorflow
  python -c "import tensorflow_datasets as tfds; \
  tfds.builder('cifar10', file_format='array_record').download_and_prepare()"
  jaxcl train --config configs/simclr_cifar10.py --workdir workdirs/cifar10

Expected: about 85-90% kNN top-1 after 500-1000 epochs (SimCLR reports ~90%
linear top-1 for ResNet-50 at 1000 epochs); not measured here yet.
"""

from jaxcl.config import base_config, recipes


def get_config():
  config = base_config()
  config.name = 'simclr_cifar10'
  config.batch_size = 512
  recipes.simclr_lars(config, train_size=50_000, epochs=800)
  config.log_every_steps = 100
  config.eval_every_steps = 10_000
  config.checkpoint_every_steps = 2_000
  config.dataset.name = 'cifar10'
  config.dataset.mean = (0.4914, 0.4822, 0.4465)
  config.dataset.std = (0.2470, 0.2435, 0.2616)
  recipes.simclr_augment(config, image_size=32, jitter_strength=0.5, blur_prob=0.0)
  config.model.update(name='resnet18', stage_sizes=(), width=64, small_images=True,
                      head_hidden=2048, head_out=128, head_layers=2)
  config.temperature.update(mode='fixed', init=0.5, min=0.01, max=1.0)
  config.eval.update(batch_size=1024, knn_k=200, probe_steps=5000, probe_batch_size=4096)
  return config
