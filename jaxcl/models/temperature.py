"""The contrastive temperature τ as a Flax NNX module.

Modes:
  learnable: τ = exp(log_tau), log_tau an ``nnx.Param`` initialized at
    log(init) and trained with the rest of the model, optionally held at init
    for ``warmup_steps`` and with its own learning-rate multiplier
    (jaxcl.trainer.optim). After every optimizer step ``project()`` clamps it to
    [log τ_min, log τ_max], the way open_clip clamps its logit scale (CLIP
    caps 1/τ at 100, i.e. τ_min = 0.01). It is a scalar, so the optimizer's
    "decay only kernels" rule leaves it alone.
  fixed: τ = init, a constant; no parameter, no gradient.
  cosine: a schedule between τ_max and τ_min with a period in steps (Kukleva
    et al., ICLR 2023); no parameter.
  free: no τ (it is 1): the loss's logits are 2 artanh of the cosine
    similarity (Kim & Kim 2025, `logit_transform`); no parameter.
  individual: one τ per training example (iSogCLR), kept with the train
    state's per-example rows (jaxcl.losses.estimators.Individual), not here; this
    module gives init, the τ evaluation and export use.
  predicted: τ(z) = min + (max - min) σ(w · z + b) of each anchor's
    embedding z ("temperature as uncertainty", Zhang et al. 2021), w and b
    trained with the model, starting at τ = init for every z; calling the
    module gives init, the τ evaluation uses.

Storing log τ keeps τ positive and makes the optimizer's steps relative: a
step of 0.01 in log τ changes τ by 1% whatever its size.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxcl import presets
from jaxcl.losses import tiled

MODES = presets.TEMPERATURE_MODES


def logit_transform(mode: str) -> str:
  """How the loss turns a similarity into a logit for this mode
  (jaxcl.losses.tiled.logits_of): 2 artanh for 'free', linear otherwise."""
  return tiled.ARCTANH if mode == 'free' else tiled.LINEAR


class Temperature(nnx.Module):
  """τ for the contrastive loss; call it with the step to get a float32 scalar.

  fixed: τ = init. learnable: τ = exp(log_tau), held at init for the first
  `warmup_steps` steps (no gradient reaches log τ then). cosine (Kukleva et
  al., ICLR 2023): τ(t) = τ_min + ½ (τ_max − τ_min)(1 + cos(2π t / period)),
  starting at τ_max.
  """

  # No defaults: the config's `temperature` group holds them (build_temperature).
  def __init__(self, *, mode: str, init: float, min: float, max: float,
               period: int = 0, warmup_steps: int = 0, embed_dim: int = 0,
               rngs: nnx.Rngs | None = None):
    if mode not in MODES:
      raise ValueError(f'temperature.mode must be one of {MODES}, got {mode!r}')
    if not 0 < min <= init <= max:
      raise ValueError(f'need 0 < temperature.min <= init <= max, got {min}, {init}, {max}')
    if mode == 'cosine' and period <= 0:
      raise ValueError(f'temperature.mode=cosine needs a period > 0, got {period}')
    self.mode = mode
    self.init = float(init)
    self.min, self.max = float(min), float(max)
    self.log_min = math.log(min)
    self.log_max = math.log(max)
    self.period, self.warmup_steps = int(period), int(warmup_steps)
    if mode == 'learnable':
      self.log_tau = nnx.Param(jnp.asarray(math.log(init), jnp.float32))
    if mode == 'predicted':
      if not min < init < max:
        raise ValueError(f'temperature.mode=predicted needs min < init < max, got {min}, '
                         f'{init}, {max}')
      share = (init - min) / (max - min)
      self.head = nnx.Linear(embed_dim, 1, kernel_init=nnx.initializers.zeros,
                             bias_init=nnx.initializers.constant(math.log(share / (1 - share))),
                             rngs=rngs or nnx.Rngs(0))

  @property
  def predicts(self) -> bool:
    """Whether τ is a function of each anchor's embedding (`of_embeddings`)."""
    return self.mode == 'predicted'

  def of_embeddings(self, z: jnp.ndarray) -> jnp.ndarray:
    """Each anchor's τ from its embedding, predicted mode: z [n, D] -> [n]."""
    logit = self.head(z.astype(jnp.float32))[:, 0]
    return self.min + (self.max - self.min) * jax.nn.sigmoid(logit)

  def __call__(self, step=None) -> jnp.ndarray:
    """τ at `step` (an int or int32 scalar; needed by cosine and the warm-up)."""
    if self.mode in ('fixed', 'individual', 'predicted'):
      return jnp.asarray(self.init, jnp.float32)
    if self.mode == 'free':
      return jnp.asarray(1.0, jnp.float32)
    if self.mode == 'cosine':
      phase = 2 * jnp.pi * jnp.asarray(step, jnp.float32) / self.period
      return jnp.asarray(self.min + 0.5 * (self.max - self.min) * (1 + jnp.cos(phase)),
                         jnp.float32)
    tau = jnp.exp(self.log_tau[...])
    if self.warmup_steps and step is not None:
      tau = jnp.where(jnp.asarray(step) < self.warmup_steps, jnp.float32(self.init), tau)
    return tau

  def project(self) -> None:
    """Clamps the learnable log τ back into [log τ_min, log τ_max] in place."""
    if self.mode == 'learnable':
      self.log_tau[...] = jnp.clip(self.log_tau[...], self.log_min, self.log_max)


QUANTILES = (0.1, 0.5, 0.9)


def distribution_metrics(tau) -> dict:
  """What a step logs of a τ per anchor (individual, predicted): the mean,
  its quantiles, and all of it as 'temperature_values' (the metric writer
  draws it as a TensorBoard histogram)."""
  out = {'temperature': jnp.mean(tau), 'inv_temperature': jnp.mean(1.0 / tau),
         'temperature_values': tau.reshape(-1)}
  for q, value in zip(QUANTILES, jnp.quantile(tau, jnp.array(QUANTILES))):
    out[f'temperature_p{round(100 * q)}'] = value
  return out


def project_all(model: nnx.Module) -> None:
  """Applies every Temperature's clamp inside `model` (after an update)."""
  for _, module in model.iter_modules():
    if isinstance(module, Temperature):
      module.project()
