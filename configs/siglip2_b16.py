"""SigLIP 2's recipe for ViT-B/16 at pod scale: siglip_vit_b16.py plus the
LocCa decoder, and for the last 20% of training SILC's and TIPS's terms
from an EMA teacher (Tschannen et al. 2025, §2; docs/siglip2_recipe.md).

Set the dataset (captions; boxes and region descriptions train LocCa's
referring and grounding tasks where the records have them) and a tokenizer,
as in siglip_vit_b16.py; then on every host of a TPU pod:

  jaxcl train --config configs/siglip2_b16.py --workdir gs://BUCKET/siglip2_b16 \
    --config.dataset.name=YOUR_DATASET --config.dataset.data_dir=gs://BUCKET/tfds

- Self-distillation from 80% of training: one global teacher crop, 8 local
  student crops (96 px), half the patches masked; weights 1 and 0.25 times
  SigLIP 2's factor for B models, 0.25; DINO's heads (2,048 hidden, 256
  bottleneck, 65,536 prototypes), temperatures and center, a fixed EMA
  momentum (SILC; SigLIP 2 gives no value: 0.996, DINO's first).
- The decoder at its default size (the text tower's width, half its depth),
  weight 1 (the paper's weight was not at hand: not claimed as its).
- Not in this config: the Gemma tokenizer (set text.vocab_file to
  Gemma's SentencePiece model, text.normalize=lower), the 256 patches of a
  NaFlex run (SigLIP 2 trains NaFlex without self-distillation), ACID
  data curation for small models, multilingual WebLI.

Result: not measured here (it needs a pod and a web-scale dataset). The
compiled step's memory per device is in docs/siglip2_recipe.md.
"""

from jaxcl.config import recipes


def get_config():
  config = recipes.siglip_b16()
  config.name = 'siglip2_b16'
  recipes.siglip2_terms(config)
  return config
