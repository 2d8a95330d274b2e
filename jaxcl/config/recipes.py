"""Recipe pieces the config files share (big_vision keeps its own in
configs/.../common.py): importable from any config file as
`from jaxcl.config import recipes`, plain values on a ConfigDict, no jax."""

from __future__ import annotations

from jaxcl import config as config_lib, presets
from jaxcl.config import base_config


def simclr_augment(config, *, image_size: int, jitter_strength: float, blur_prob: float) -> None:
  """SimCLR's augmentation (Chen et al. 2020, appendix A): random resized
  crop from 8% of the image, flips, color jitter (p 0.8), grayscale (p 0.2)
  and, on ImageNet, Gaussian blur."""
  config.augment.update(image_size=image_size, crop_scale_min=0.08, crop_scale_max=1.0,
                        flip=True, color_jitter_prob=0.8, color_jitter_strength=jitter_strength,
                        grayscale_prob=0.2, blur_prob=blur_prob)


def simclr_lars(config, *, train_size: int, epochs: int) -> None:
  """SimCLR's optimizer: LARS at LR 0.3 x batch / 256, 10 warm-up epochs,
  weight decay 1e-6, for `epochs` epochs of `train_size` images."""
  config.total_steps = epochs * train_size // config.batch_size
  config.optimizer.update(name='lars', learning_rate=0.3, scale_lr_by_batch=True,
                          warmup_steps=10 * train_size // config.batch_size, weight_decay=1e-6,
                          momentum=0.9)


def image_text_augment(config, *, image_size: int, crop_scale_min: float) -> None:
  """The light augmentation of image-text training: a mild crop, no flips
  (captions say left and right), no color changes (captions name colors)."""
  config.augment.update(image_size=image_size, crop_scale_min=crop_scale_min, crop_scale_max=1.0,
                        flip=False, color_jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0)


def captioned_shapes(method: str):
  """The image-text default on the embedded captioned shapes: a small ViT
  (patch 8, 3 blocks of width 128) and a causal byte-level text Transformer
  (2 blocks of width 64), both projected to 64 dimensions; 1,000 steps of
  batch 256, AdamW. The loss is `method`'s (clip or siglip)."""
  config = base_config()
  config.method = method
  config.total_steps = 1000
  config.batch_size = 256
  config.log_every_steps = 50
  config.eval_every_steps = 250
  config.checkpoint_every_steps = 500
  config.dataset.update(name='captioned_shapes', mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
  image_text_augment(config, image_size=32, crop_scale_min=0.8)
  config.model.update(name='vit', embed_dim=64)
  config.model.vit.update(patch_size=8, width=128, depth=3, heads=4, mlp_dim=256, pool='gap')
  config.text.update(tokenizer='bytes', max_length=96, width=64, depth=2, heads=2, mlp_dim=128,
                     causal=True)
  config.optimizer.update(name='adamw', learning_rate=1e-3, warmup_steps=100, weight_decay=0.1,
                          b2=0.98)
  config.eval.batch_size = 512
  return config


def image_text_pod(method: str):
  """Image-text pretraining at pod scale: global batch 32,768, ViT-B/16 at
  224 px in bfloat16, evaluation every 10,000 steps. The dataset is a
  placeholder (coco_captions' keys): set --config.dataset.name to yours."""
  config = base_config()
  config.method = method
  config.batch_size = 32_768
  config.log_every_steps = 100
  config.eval_every_steps = 10_000
  config.checkpoint_every_steps = 2_000
  config.dataset.update(
      name='coco_captions',  # placeholder: set --config.dataset.name to your dataset
      image_key='image', text_key='captions/text', label_key='label',
      image_size=224, train_split='train', eval_test_split='val')
  image_text_augment(config, image_size=224, crop_scale_min=0.9)
  config.model.update(name='vit_b16', dtype='bfloat16')
  config.eval.batch_size = 4_096
  return config


def siglip_b16():
  """The SigLIP paper's B/16 recipe at pod scale (Zhai et al. 2023,
  big_vision; configs/siglip_vit_b16.py says what it is)."""
  config = image_text_pod('siglip')
  config.total_steps = 275_000  # ~9B pairs seen
  config.dataset.update(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
  config.model.update(embed_dim=768)
  config.model.vit.update(pool='gap')
  config.text.update(tokenizer='bytes', max_length=64, width=768, depth=12, heads=12,
                     mlp_dim=3072, causal=False)
  config.temperature.update(mode='learnable', init=0.1, min=0.01, max=1.0, bias_init=-10.0)
  config.optimizer.update(name='adamw', learning_rate=1e-3, warmup_steps=5_000,
                          weight_decay=1e-4, b1=0.9, b2=0.95, grad_clip_norm=1.0)
  return config


def siglip2_terms(config) -> None:
  """SigLIP 2's additions to the sigmoid loss (Tschannen et al. 2025, §2):
  the LocCa decoder from the start (weight 1: the paper's was not at hand),
  and from 80% of training SILC's and TIPS's terms weighted 1 and 0.25
  times the paper's factor for B models, 0.25 (docs/siglip2_recipe.md)."""
  config.decoder.update(weight=1.0, start_step=0)
  config.self_distill.update(weight=0.25, masked_weight=0.0625,
                             start_step=int(0.8 * config.total_steps))


def architecture(config, name: str) -> None:
  """Sets a published architecture on `config`: presets.ARCHITECTURES[name]
  (open_clip's model names: ViT-B-32, ViT-B-16-SigLIP, ...) gives the
  method, both towers, the image size and normalization, and the tokenizer
  kind; the tokenizer's file (text.vocab_file or text.sentencepiece_model)
  is the caller's to set."""
  if name not in presets.ARCHITECTURES:
    raise ValueError(f'unknown architecture {name!r}; known: {", ".join(presets.ARCHITECTURES)}')
  config.update_from_flattened_dict({k: list(v) if isinstance(v, tuple) else v
                                     for k, v in presets.ARCHITECTURES[name].items()})


def from_workdir(workdir):
  """The config of the run (or `jaxcl import`) in `workdir`, to train on
  from its weights: the same method, architecture, tokenizer, image size
  and normalization, τ from where it ended, init.source set to the workdir;
  the schedule, dataset and evaluation are the caller's to set."""
  config = config_lib.load_saved(workdir)
  config.init.update(source=str(workdir), load=())
  config.name = f'from {workdir}'
  return config
