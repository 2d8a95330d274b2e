"""Fine-tune a jaxcl workdir: a published model `jaxcl import` made, or any run.

  jaxcl import clip-vit-base-patch32 --output workdirs/clip_b32
  jaxcl train --config configs/finetune.py:workdirs/clip_b32 --workdir workdirs/clip_b32_ft \
      --config.dataset.name=coco_captions --config.dataset.text_key=captions/text

The workdir's own config (architecture, tokenizer, image size and
normalization, τ) with every weight loaded from it (init.source), trained at
open_clip's fine-tuning scale: AdamW at 1e-5 with 500 warm-up steps, weight
decay 0.1, batch 256, 5,000 steps. LiT on top of it: add
--config.optimizer.frozen='image_encoder/.*' (the image tower locked).
Set the dataset to yours: the imported config names the embedded
captioned_shapes, which is a smoke test, not a fine-tuning set.

Result: not measured here (it needs a published checkpoint, which this
machine cannot download); tests/test_finetune.py checks that every weight
arrives.
"""

from jaxcl.config import recipes


def get_config(workdir: str):
  config = recipes.from_workdir(workdir)
  config.name = 'finetune'
  config.total_steps = 5_000
  config.batch_size = 256
  config.log_every_steps = 50
  config.eval_every_steps = 1_000
  config.checkpoint_every_steps = 1_000
  config.optimizer.update(name='adamw', learning_rate=1e-5, warmup_steps=500, weight_decay=0.1,
                          b1=0.9, b2=0.98, grad_clip_norm=1.0)
  return config
