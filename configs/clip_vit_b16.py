"""CLIP ViT-B/16 at pod scale: global batch 32,768, AdamW, warm-up + cosine, bf16.

The CLIP paper's ViT-B/16 recipe (Radford et al. 2021): image tower ViT-B/16
at 224 px with a class token, text tower a causal 12-layer Transformer of
width 512 over 77 tokens, both projected to 512 dimensions; τ learnable from
0.07, clamped so that 1/τ <= 100; AdamW (lr 5e-4, β2 0.98, weight decay 0.2
on matrices only), 2,000 warm-up steps, cosine decay. The global batch is
split over every device of the pod; the loss sees all 32,768 pairs.

Set the dataset first (a placeholder here): any TFDS image-text dataset
prepared as array_record, with its feature keys, e.g. coco_captions
(image 'image', captions 'captions/text'). Then, on every host of a TPU pod:

  gcloud compute tpus tpu-vm ssh $TPU --zone $ZONE --worker=all --command \
    "cd jaxcl && jaxcl train --config configs/clip_vit_b16.py --workdir gs://BUCKET/clip_b16 \
     --config.dataset.name=YOUR_DATASET --config.dataset.data_dir=gs://BUCKET/tfds \
     --config.text.tokenizer=sentencepiece --config.text.sentencepiece_model=gs://BUCKET/spm.model"

On a single GPU host: the same `jaxcl train` line (all GPUs form the data axis).
"""

from jaxcl.config import base_config


def get_config():
  config = base_config()
  config.name = 'clip_vit_b16'
  config.method = 'clip'
  config.total_steps = 390_000  # ~12.8B pairs seen, CLIP's 32 epochs of 400M
  config.batch_size = 32_768
  config.log_every_steps = 100
  config.eval_every_steps = 10_000
  config.checkpoint_every_steps = 2_000

  config.dataset.update(
      name='coco_captions',  # placeholder: set --config.dataset.name to your dataset
      image_key='image', text_key='captions/text', label_key='label',
      image_size=224, train_split='train', eval_test_split='val',
      mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711))
  config.augment.update(image_size=224, crop_scale_min=0.9, crop_scale_max=1.0, flip=False,
                        color_jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0)
  config.model.update(name='vit_b16', embed_dim=512, dtype='bfloat16')
  config.model.vit.update(pool='cls')
  config.text.update(tokenizer='bytes', max_length=77, width=512, depth=12, heads=8,
                     mlp_dim=2048, causal=True)
  config.temperature.update(mode='learnable', init=0.07, min=0.01, max=1.0)
  config.optimizer.update(name='adamw', learning_rate=5e-4, warmup_steps=2_000,
                          weight_decay=0.2, b1=0.9, b2=0.98, grad_clip_norm=0.0)
  config.eval.batch_size = 4_096
  return config
