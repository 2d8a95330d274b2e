"""CLIP (Radford et al. 2021): image and caption towers, the symmetric
softmax InfoNCE over the global batch (jaxcl.losses.clip_loss). With
temperature.per_direction, image-to-text and text-to-image each learn a τ."""

from __future__ import annotations

import jax.numpy as jnp

from jaxcl import losses
from jaxcl.methods import two_tower


class CLIP(two_tower.TwoTower):
  name = 'clip'
  directions = 2

  def temperature(self, model, step, embeddings=None):
    if not hasattr(model, 'temperature_t2i'):
      return super().temperature(model, step, embeddings)
    return jnp.stack([model.temperature(step), model.temperature_t2i(step)])

  def temperature_metrics(self, tau):
    if tau.ndim != 1:  # one τ, or one per anchor
      return super().temperature_metrics(tau)
    return {'temperature': tau[0], 'inv_temperature': 1.0 / tau[0],
            'temperature_t2i': tau[1], 'inv_temperature_t2i': 1.0 / tau[1]}

  def loss(self, a, b, temperature, bias, options, state=None):
    del bias
    return losses.clip_loss(a, b, temperature, options, state=state)


METHOD = CLIP()
