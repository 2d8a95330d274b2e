"""Self-distillation from an EMA teacher, pure functions of arrays: the
loss form SigLIP 2 takes from SILC (local-to-global) and TIPS (masked
patches), both DINO's cross-entropy between prototype softmaxes.

For a student output s and the teacher output t it is matched to (logits
over K prototypes), with the teacher's running center c:

  p_t = softmax((t - c) / τ_t)   (centered and sharpened; no gradient)
  H   = -Σ_k p_t,k log softmax(s / τ_s)_k

(facebookresearch/dino DINOLoss; iBOT's patch term is the same at masked
patches, github.com/bytedance/ibot iBOTLoss). Each row's H is averaged over
its counted outputs (its local views, or its masked patches), then over
rows. The center follows the teacher's mean output, c <- m c + (1 - m)
mean(t), which with sharpening keeps the teacher from collapsing to one
prototype or to the uniform softmax.

With ``options.axis_name`` set both run inside ``jax.shard_map`` on one
device's rows and return the global batch's value (the same on every
device); outside it (GSPMD) they see the whole batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxcl.losses.contrastive import LossOptions, LossResult, _global_sum, _num_devices


def prototype_cross_entropy(student, teacher, center, student_temperature: float,
                            teacher_temperature: float, weights=None,
                            options: LossOptions = LossOptions()) -> LossResult:
  """DINO's cross-entropy, each row's mean over its counted outputs, then
  the mean over rows.

  student: float [n, V, K], V outputs per row (local views, or patches);
  teacher: float [n, K] (one output each row's V outputs match: the global
    view) or [n, V, K] (one per output: the patches); no gradient flows in;
  center: float32 [K], the teacher's running center;
  weights: [n, V], 1 where an output counts (masked patches), or None (all);
  Returns LossResult(loss, {'teacher_entropy': the mean entropy of p_t,
  'student_entropy': of the student's softmax}) (log K: uniform, 0: one-hot).
  """
  axis = options.axis_name
  teacher = jax.lax.stop_gradient(teacher.astype(jnp.float32))
  if teacher.ndim == 2:
    teacher = teacher[:, None, :]
  log_p_teacher = jax.nn.log_softmax((teacher - jax.lax.stop_gradient(center))
                                     / teacher_temperature)
  log_p_student = jax.nn.log_softmax(student.astype(jnp.float32) / student_temperature)
  p_teacher = jnp.exp(log_p_teacher)
  per_output = -jnp.sum(p_teacher * log_p_student, axis=-1)  # [n, V]
  if weights is None:
    weights = jnp.ones(per_output.shape, jnp.float32)
  weights = jnp.broadcast_to(weights.astype(jnp.float32), per_output.shape)
  counted = jnp.sum(weights, axis=1)
  share = weights / jnp.maximum(counted, 1.0)[:, None]  # each row's mean over its outputs
  rows = per_output.shape[0] * _num_devices(axis)
  loss = _global_sum(jnp.sum(share * per_output), axis) / rows
  entropy = lambda log_p: _global_sum(jnp.sum(
      share * -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)), axis) / rows
  return LossResult(loss, {
      'teacher_entropy': entropy(log_p_teacher),
      'student_entropy': jax.lax.stop_gradient(entropy(log_p_student))})


def updated_center(center, teacher, momentum: float, options: LossOptions = LossOptions()):
  """The teacher's running center after a step: m c + (1 - m) times its
  outputs' mean over the global batch. center float32 [K]; teacher
  [n, K] or [n, V, K] (all V outputs count, as iBOT's patch center)."""
  axis = options.axis_name
  teacher = jax.lax.stop_gradient(teacher.astype(jnp.float32)).reshape(-1, center.shape[-1])
  count = teacher.shape[0] * _num_devices(axis)
  mean = _global_sum(jnp.sum(teacher, axis=0), axis) / count
  return momentum * center + (1.0 - momentum) * mean
