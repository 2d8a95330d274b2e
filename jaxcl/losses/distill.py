"""Distillation from a teacher's image-text similarities, a pure function of
arrays (open_clip's DistillClipLoss, the form SigLIP 2 and open_clip's
`--distill-model` use to let a large model teach a smaller one).

Over the global batch, each image's softmax over the batch's texts under the
student, log q_i = log_softmax(a_i · Bᵀ / τ), is pulled toward the
teacher's, p_i = softmax(a'_i · B'ᵀ / τ') (the teacher's own embeddings and
τ), by the cross-entropy -Σ_j p_ij log q_ij; the same for each text over the
images; the loss is the mean of the two directions' means over anchors.
The cross-entropy is the KL divergence KL(p_i ‖ q_i) plus the teacher's
entropy, which has no gradient: its value is open_clip's `distill_loss`, and
the KL is reported beside it (0 when the student matches the teacher).

Sharded as jaxcl.losses.contrastive: inside ``jax.shard_map`` with
``options.axis_name`` set, each device scores its rows against the columns
gathered from every device (the student's and the teacher's), and the value
and gradients equal the single-device computation on the whole batch. The
logits of one device's rows are materialized (n x N, float32): distillation
runs beside a contrastive loss whose tiles it does not need, and n x N is
small where rows are sharded (128 rows x 32k columns: 16 MB).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxcl.losses import tiled
from jaxcl.losses.contrastive import (  # the sharding helpers every loss shares
  LossOptions,
  LossResult,
  _gather,
  _global_sum,
  _num_devices,
  _scaled_logits,
)


def distill_loss(a, b, teacher_a, teacher_b, temperature, teacher_temperature,
                 options: LossOptions = LossOptions()) -> LossResult:
  """The student's softmaxes over the global batch pulled toward the teacher's.

  a, b: the student's unit embeddings [n, D] (images, texts; this device's
    rows under shard_map);
  teacher_a, teacher_b: the teacher's unit embeddings of the same rows
    [n, D'] (no gradient flows into them);
  temperature, teacher_temperature: each model's τ, a scalar or per
    direction [2] (images' softmax over texts, texts' over images);
  options: the mesh axes and the student's logit transform.
  Returns LossResult(loss, {'distill_kl': the mean KL(teacher ‖ student)}).
  """
  axis = options.axis_name
  teacher_a, teacher_b = jax.lax.stop_gradient(teacher_a), jax.lax.stop_gradient(teacher_b)
  directions = ((a, b, teacher_a, teacher_b), (b, a, teacher_b, teacher_a))
  cross_entropy, kl = jnp.float32(0), jnp.float32(0)
  for index, (rows, cols, teacher_rows, teacher_cols) in enumerate(directions):
    student = jax.nn.log_softmax(_scaled_logits(
        rows, _gather(cols, axis), _direction(temperature, index), options.transform))
    teacher = jax.nn.log_softmax(_scaled_logits(
        teacher_rows, _gather(teacher_cols, axis), _direction(teacher_temperature, index),
        tiled.LINEAR))
    p = jnp.exp(teacher)
    cross_entropy += -jnp.sum(p * student)
    kl += jnp.sum(p * (teacher - jax.lax.stop_gradient(student)))
  anchors = 2 * a.shape[0] * _num_devices(axis)
  loss = _global_sum(cross_entropy, axis) / anchors
  return LossResult(loss, {'distill_kl': _global_sum(kl, axis) / anchors})


def _direction(temperature, index: int):
  """τ of one direction: the scalar, or its entry of a per-direction [2]."""
  temperature = jnp.asarray(temperature, jnp.float32)
  return temperature if temperature.ndim == 0 else temperature[index]
