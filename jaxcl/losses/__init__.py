"""Contrastive losses over the global batch, as pure functions of arrays.

The modules, each importing only those above it:

- estimators: per-anchor estimates of the softmax's negative term that
  outlive the batch (SogCLR's moving average, the per-example τ tables).
- tiled: the logits in tiles, never whole ('blockwise' and 'ring').
- contrastive: InfoNCE, CLIP's and SimCLR's losses and SigLIP's sigmoid
  loss, dense or tiled, with or without an estimator, behind one signature
  (embeddings, τ, LossOptions[, state]) -> LossResult; and the embedding
  diagnostics.
- distill: a student's softmaxes over the batch pulled toward a teacher's
  (open_clip's distillation loss), under the same signature.
- captioning: the decoder's token cross-entropy (SigLIP 2's LocCa term).
- self_distill: DINO's cross-entropy against an EMA teacher's prototypes and
  its running center (SigLIP 2's SILC and TIPS terms).

This package re-exports their public names: ``losses.clip_loss`` etc.
"""

from jaxcl.losses import (  # noqa: F401  (submodules, in import order)
  captioning,
  estimators,
  self_distill,
  tiled,
)
from jaxcl.losses.contrastive import (
  AUTO_DENSE_MAX_LOGITS,
  IMPLS,
  UNIFORMITY_ROWS,
  LossOptions,
  LossResult,
  alignment_uniformity,
  clip_loss,
  info_nce,
  nt_xent,
  siglip_loss,
)
from jaxcl.losses.distill import distill_loss

__all__ = [
    'AUTO_DENSE_MAX_LOGITS', 'IMPLS', 'UNIFORMITY_ROWS', 'LossOptions', 'LossResult',
    'alignment_uniformity', 'clip_loss', 'distill_loss', 'info_nce', 'nt_xent', 'siglip_loss',
]
