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

Result: not measured here (it needs a pod and a web-scale dataset).
"""

from jaxcl.config import recipes


def get_config():
  config = recipes.image_text_pod('clip')
  config.name = 'clip_vit_b16'
  config.total_steps = 390_000  # ~12.8B pairs seen, CLIP's 32 epochs of 400M
  config.dataset.update(mean=(0.48145466, 0.4578275, 0.40821073),
                        std=(0.26862954, 0.26130258, 0.27577711))
  config.model.update(embed_dim=512)
  config.model.vit.update(pool='cls')
  config.text.update(tokenizer='bytes', max_length=77, width=512, depth=12, heads=8,
                     mlp_dim=2048, causal=True)
  config.temperature.update(mode='learnable', init=0.07, min=0.01, max=1.0)
  config.optimizer.update(name='adamw', learning_rate=5e-4, warmup_steps=2_000,
                          weight_decay=0.2, b1=0.9, b2=0.98, grad_clip_norm=0.0)
  return config
