"""SigLIP ViT-B/16 at pod scale: global batch 32,768, sigmoid loss, bf16.

The SigLIP paper's B/16 recipe (Zhai et al. 2023, big_vision): ViT-B/16 at
224 px (mean-pooled here, where big_vision uses a MAP head), a bidirectional
12-layer text Transformer of width 768 over 64 tokens, 768-d embeddings;
learnable τ from 0.1 and logit bias from -10; AdamW (lr 1e-3, weight decay
1e-4 on matrices), warm-up then cosine. The sigmoid loss covers all 32,768²
pairs of the global batch: each device scores its rows against the gathered
columns, whole (loss.impl auto picks dense up to 4096² logits per device: 512
rows x 32,768 on 64 chips or more) or one tile at a time on fewer (blockwise;
same values and gradients).

Set the dataset first (a placeholder here), as in clip_vit_b16.py; then on
every host of a TPU pod:

  gcloud compute tpus tpu-vm ssh $TPU --zone $ZONE --worker=all --command \
    "cd jaxcl && jaxcl train --config configs/siglip_vit_b16.py --workdir gs://BUCKET/siglip_b16 \
     --config.dataset.name=YOUR_DATASET --config.dataset.data_dir=gs://BUCKET/tfds \
     --config.text.tokenizer=sentencepiece --config.text.sentencepiece_model=gs://BUCKET/spm.model"

Result: not measured here (it needs a pod and a web-scale dataset); big_vision's
SigLIP 2 B/16 at 224 px reaches 78.2% ImageNet zero-shot (Tschannen et al. 2025).
"""

from jaxcl.config import recipes


def get_config():
  config = recipes.siglip_b16()
  config.name = 'siglip_vit_b16'
  return config
