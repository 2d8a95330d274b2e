"""The decoder's loss (SigLIP 2's LocCa term), a pure function of arrays:
token cross-entropy, the mean over the target tokens that count.

With ``options.axis_name`` set it runs inside ``jax.shard_map`` on one
device's rows and returns the mean over the global batch's counted tokens,
the same on every device; each example's term needs no other device's rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxcl.losses.contrastive import LossOptions, LossResult, _global_sum


def token_cross_entropy(logits, targets, weights,
                        options: LossOptions = LossOptions()) -> LossResult:
  """logits float [n, L, V]; targets int32 [n, L]; weights [n, L] (1 where a
  token counts: the answer of the example's task, not its prompt or
  padding). Returns LossResult(loss, {'decoder_accuracy': the share of the
  counted tokens the logits rank first, 'decoder_tokens': how many count})."""
  axis = options.axis_name
  logits = logits.astype(jnp.float32)
  weights = weights.astype(jnp.float32)
  log_p = jax.nn.log_softmax(logits)
  picked = jnp.take_along_axis(log_p, targets[..., None], axis=-1)[..., 0]
  total = _global_sum(jnp.sum(weights), axis)
  loss = -_global_sum(jnp.sum(weights * picked), axis) / jnp.maximum(total, 1.0)
  right = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  accuracy = _global_sum(jnp.sum(weights * right), axis) / jnp.maximum(total, 1.0)
  return LossResult(loss, {'decoder_accuracy': jax.lax.stop_gradient(accuracy),
                           'decoder_tokens': total})
