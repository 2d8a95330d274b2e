"""Optimizers and learning-rate schedules from config.

LARS (SimCLR's choice) and AdamW, linear warm-up then cosine decay, optional
global-norm clipping. Weight decay (and LARS's trust ratio) apply only to
arrays of rank >= 2: convolution and dense kernels. Biases, batch-norm scales
and offsets and the scalar temperature are left alone, as in SimCLR and
open_clip.

Parameter groups by name (jaxcl.models.param_groups): `optimizer.frozen` parameters
are updated by nothing and hold no optimizer state (optax.multi_transform
with set_to_zero), and `optimizer.lr_multipliers` scale a group's updates,
which for these optimizers is scaling its learning rate.

`optimizer.mu_dtype='bfloat16'` keeps Adam's first moment (SGD's momentum)
in bfloat16, as big_vision does, halving it; the parameters, the second
moment and the update arithmetic stay float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxcl import name_patterns
from jaxcl.models import param_groups
from jaxcl.presets import OPTIMIZERS


def learning_rate_schedule(cfg, total_steps: int) -> optax.Schedule:
  """Linear warm-up to the peak, then cosine decay to 0 at total_steps.

  peak = cfg.learning_rate * batch_size / 256 when cfg.scale_lr_by_batch
  (SimCLR's "LR = 0.3 x BatchSize / 256"), else cfg.learning_rate.
  """
  o = cfg.optimizer
  peak = o.learning_rate * (cfg.batch_size / 256 if o.scale_lr_by_batch else 1.0)
  total = max(int(total_steps), 1)
  warmup = min(int(o.warmup_steps), total - 1)
  return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, total, end_value=0.0)


# ViT / text position embeddings, the class token; the temperature's own
# parameters (a predicted τ's head: decay or LARS's trust ratio would pin its
# zero-initialized kernel near zero).
_NO_DECAY = ('position', 'cls', 'temperature')


def decay_mask(params):
  """True where weight decay (and LARS's trust ratio) applies: kernels
  (rank >= 2), not position embeddings, class tokens (open_clip's and
  big_vision's choice) or the temperature's parameters."""
  def decays(path, p):
    names = {getattr(k, 'key', getattr(k, 'name', None)) for k in path}
    return p.ndim >= 2 and not names & set(_NO_DECAY)
  return jax.tree_util.tree_map_with_path(decays, params)


def build_optimizer(cfg, total_steps: int) -> optax.GradientTransformation:
  o = cfg.optimizer
  schedule = learning_rate_schedule(cfg, total_steps)
  if o.name == 'lars':
    opt = optax.lars(schedule, weight_decay=o.weight_decay, weight_decay_mask=decay_mask,
                     trust_coefficient=o.lars_trust_coefficient, momentum=o.momentum,
                     trust_ratio_mask=decay_mask)
  elif o.name == 'adamw':
    opt = optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay, mask=decay_mask,
                      mu_dtype=_mu_dtype(o))
  elif o.name == 'sgd':
    opt = optax.chain(optax.add_decayed_weights(o.weight_decay, mask=decay_mask),
                      optax.sgd(schedule, momentum=o.momentum, accumulator_dtype=_mu_dtype(o)))
  else:
    raise ValueError(f'unknown optimizer.name {o.name!r}; choose one of {OPTIMIZERS}')
  if o.grad_clip_norm:
    opt = optax.chain(optax.clip_by_global_norm(o.grad_clip_norm), opt)
  multiplier = cfg.temperature.lr_multiplier
  if multiplier != 1.0:  # log τ's own learning rate: its updates scaled after the optimizer
    opt = optax.chain(opt, optax.stateless(
        lambda updates, _: jax.tree_util.tree_map_with_path(
            lambda path, u: u * multiplier if _is_temperature(path) else u, updates)))
  groups = name_patterns.parse_multipliers(o.lr_multipliers, 'optimizer.lr_multipliers')
  if groups:
    opt = optax.chain(opt, optax.stateless(
        lambda updates, _: jax.tree.map(lambda u, f: u * f, updates,
                                        param_groups.multipliers(updates, groups))))
  frozen = name_patterns.as_patterns(o.frozen)
  if frozen:  # after everything else: the frozen parameters' updates are zero, their state none
    opt = optax.multi_transform(
        {'trained': opt, 'frozen': optax.set_to_zero()},
        lambda params: jax.tree.map(lambda f: 'frozen' if f else 'trained',
                                    param_groups.selected(params, frozen)))
  return opt


def _mu_dtype(o):
  """optimizer.mu_dtype as optax takes it: None keeps the parameters' float32."""
  dtype = o.mu_dtype
  return None if dtype == 'float32' else jnp.dtype(dtype)


def _is_temperature(path) -> bool:
  """log τ, or a parameter of the temperature module (a predicted τ's head)."""
  return any(getattr(k, 'key', None) in ('log_tau', 'temperature') for k in path)
