"""CLIP (Radford et al. 2021): image and caption towers, the symmetric
softmax InfoNCE over the global batch (jaxcl.losses.clip_loss)."""

from __future__ import annotations

from jaxcl import losses
from jaxcl.methods import two_tower


class CLIP(two_tower.TwoTower):
  name = 'clip'

  def loss(self, a, b, temperature, bias, **kwargs):
    del bias
    return losses.clip_loss(a, b, temperature=temperature, **kwargs)


METHOD = CLIP()
