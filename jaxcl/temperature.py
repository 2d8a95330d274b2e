"""The contrastive temperature τ as a Flax NNX module.

Modes:
  learnable: τ = exp(log_tau), log_tau an ``nnx.Param`` initialized at
    log(init) and trained with the rest of the model. After every optimizer
    step ``project()`` clamps it to [log τ_min, log τ_max], the way open_clip
    clamps its logit scale (CLIP caps 1/τ at 100, i.e. τ_min = 0.01). It is a
    scalar, so the optimizer's "decay only kernels" rule leaves it alone.
  fixed: τ = init, a constant; no parameter, no gradient.

Storing log τ keeps τ positive and makes the optimizer's steps relative: a
step of 0.01 in log τ changes τ by 1% whatever its size.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from flax import nnx

MODES = ('fixed', 'learnable')


class Temperature(nnx.Module):
  """τ for the contrastive loss; call it to get a float32 scalar."""

  def __init__(self, *, mode: str = 'learnable', init: float = 0.1, min: float = 0.01,  # noqa: A002
               max: float = 100.0):  # noqa: A002
    if mode not in MODES:
      raise ValueError(f'temperature.mode must be one of {MODES}, got {mode!r}')
    if not 0 < min <= init <= max:
      raise ValueError(f'need 0 < temperature.min <= init <= max, got {min}, {init}, {max}')
    self.mode = mode
    self.init = float(init)
    self.log_min = math.log(min)
    self.log_max = math.log(max)
    if mode == 'learnable':
      self.log_tau = nnx.Param(jnp.asarray(math.log(init), jnp.float32))

  def __call__(self) -> jnp.ndarray:
    if self.mode == 'fixed':
      return jnp.asarray(self.init, jnp.float32)
    return jnp.exp(self.log_tau[...])

  def project(self) -> None:
    """Clamps the learnable log τ back into [log τ_min, log τ_max] in place."""
    if self.mode == 'learnable':
      self.log_tau[...] = jnp.clip(self.log_tau[...], self.log_min, self.log_max)


def project_all(model: nnx.Module) -> None:
  """Applies every Temperature's clamp inside `model` (after an update)."""
  for _, module in model.iter_modules():
    if isinstance(module, Temperature):
      module.project()
