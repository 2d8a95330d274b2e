"""SigLIP (Zhai et al. 2023): image and caption towers, the pairwise sigmoid
loss over every pair of the global batch with a learned logit bias
(jaxcl.losses.siglip_loss)."""

from __future__ import annotations

from jaxcl import losses, models
from jaxcl.methods import two_tower


class SigLIP(two_tower.TwoTower):
  name = 'siglip'
  softmax_loss = False

  def make_bias(self, temperature_config):
    return models.LogitBias(temperature_config.bias_init)

  def bias(self, model):
    return model.bias()

  def loss(self, a, b, temperature, bias, options, state=None):
    if state is not None:
      raise ValueError('the sigmoid loss has no per-anchor estimator')
    return losses.siglip_loss(a, b, temperature, bias, options)


METHOD = SigLIP()
