"""The per-example terms SigLIP 2's recipe adds to the step: the decoder's
(config.decoder, jaxcl.losses.captioning) and the self-distillation terms
of an EMA teacher (config.self_distill, jaxcl.trainer.ema_teacher).

Unlike the contrastive loss, an example's term needs no other example, so
the terms are computed on any rows: the whole batch, or each microbatch
of it (jaxcl.trainer.grad_cache), where a chunk's value, metrics and
centers are scaled to its share of the global batch (the decoder's by its
share of the counted tokens) so that the chunks' sums are the whole
batch's. The decoder reads the logits of the embedding's own forward pass;
the self-distillation terms run their own crops, and nothing of them
before their start step (`jax.lax.cond`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxcl.data import augment
from jaxcl.losses import captioning
from jaxcl.trainer import ema_teacher

# The step's key folded with this gives the self-distillation crops and masks.
SELF_DISTILL_STREAM = 0x5D15


def term_weight(group, step):
  """A recipe term's weight at `step` (its config group's `weight` from its
  `start_step` on, 0 before): float32 scalar."""
  return jnp.where(step >= group.start_step, jnp.float32(group.weight), jnp.float32(0))


class Terms:
  """The terms of one step. `extras` are the per-row arrays they read
  beside the model's inputs (chunked with them); calling it on some rows
  gives (value, (metrics, centers)), each that rows' share."""

  def __init__(self, config, state, batch, key, merge):
    self.config, self.state, self.merge = config, state, merge
    n = jax.tree.leaves(batch)[0].shape[0]
    self.extras = {}
    if 'decoder_weights' in batch:
      self.extras['decoder_weights'] = batch['decoder_weights']
      # The global batch's counted tokens: the decoder's term is their mean.
      self.decoder_tokens = jnp.maximum(jnp.sum(batch['decoder_weights']), 1.0)
    if state.ema:
      self.extras['self_distill_keys'] = augment.view_keys(
          jax.random.fold_in(key, SELF_DISTILL_STREAM), 1, n)[:, 0]
    self.rows = n

  def __bool__(self) -> bool:
    return bool(self.extras)

  def __call__(self, params, batch, extras, decoded):
    """On rows of the batch (`batch`: their model inputs, `extras`: theirs
    of self.extras; `decoded`: () or the decoder's logits of them)."""
    state, config = self.state, self.config
    value, metrics, centers = jnp.float32(0), {}, {}
    if decoded:  # the decoder's term (config.decoder): its own tokens, no other row's
      term = captioning.token_cross_entropy(decoded[0], batch['decoder_ids'],
                                            extras['decoder_weights'])
      share = jnp.sum(extras['decoder_weights']) / self.decoder_tokens
      value = value + term_weight(config.decoder, state.step) * term.loss * share
      metrics.update(decoder_loss=term.loss * share,
                     decoder_accuracy=term.metrics['decoder_accuracy'] * share,
                     decoder_tokens=term.metrics['decoder_tokens'])
    if state.ema:  # SigLIP 2's self-distillation (config.self_distill)
      share = batch['image'].shape[0] / self.rows
      term, term_metrics, new_centers = self._self_distilled(params, batch['image'],
                                                             extras['self_distill_keys'])
      value = value + term * share
      metrics.update({k: v * share for k, v in term_metrics.items()})
      centers = jax.tree.map(lambda c: c * share, new_centers)
    return value, (metrics, centers)

  def _self_distilled(self, params, images, row_keys):
    """(value, metrics, centers) of the self-distillation terms on some
    rows at this step: nothing computed before their start step."""
    state, config = self.state, self.config
    group = config.self_distill

    def active(params):
      student = self.merge(params, state.batch_stats)
      teacher = self.merge(ema_teacher.teacher_params(params, state.ema, state.step,
                                                      group.start_step), state.batch_stats)
      return ema_teacher.terms(student, teacher, state.ema['center'], row_keys, images, config)

    def inactive(params):
      value, metrics, _ = jax.eval_shape(active, params)
      zeros = lambda tree: jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), tree)
      return zeros(value), zeros(metrics), state.ema['center']

    return jax.lax.cond(state.step >= group.start_step, active, inactive, params)
