"""SigLIP 2's self-distillation in the step (config.self_distill): an EMA
teacher of the image tower teaches it through two terms (Tschannen et al.
2025, §2.3, which takes them from SILC and TIPS):

- local-to-global (SILC): the student's pooled features of `local_views`
  small crops, through its image head, matched to the teacher's of one
  global crop;
- masked prediction (TIPS): the student sees the same global crop with
  `mask_ratio` of its patch embeddings replaced by the mask token, and its
  patch tokens there, through its patch head, are matched to the
  teacher's unmasked ones.

Both use DINO's cross-entropy (jaxcl.losses.self_distill). The contrastive
loss and the decoder keep the run's own crop (SigLIP 2 follows SILC there).
The crops are the run's augmentation (config.augment) at SILC's areas and
sizes; a local crop runs through the ViT with its positions resized to its
smaller grid (the NaFlex path, jaxcl.models.transformer.ViT).

The teacher lives in TrainState.ema: its copy of the image tower and the
heads (`params`), and the two running centers (`center`). Before
`start_step` nothing of it is computed (`jax.lax.cond`) and it is not
updated; at `start_step` the teacher is the student as it is, and after
each step from then on ema <- m ema + (1 - m) student (fixed m, as SILC:
a momentum that reached 1 would stop the teacher following the
image-text loss). The whole state is in every checkpoint, so a resumed
run's teacher is the one it left.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from jaxcl.data import augment
from jaxcl.losses import self_distill
from jaxcl.methods.base import standardize
from jaxcl.models import transformer

# The model's parts the teacher holds an EMA copy of.
TAUGHT = ('image_encoder', 'self_distill')


def enabled(config) -> bool:
  s = config.self_distill
  return bool(s.weight or s.masked_weight)


def local_size(config) -> int:
  """The local crops' side in pixels: self_distill.local_size, or 0: 3/7 of
  the image size (DINO's 96 of 224) in whole patches, at least one."""
  patch = config.model.vit.patch_size
  size = config.self_distill.local_size
  return size or patch * max(1, round(config.augment.image_size * 3 / 7 / patch))


def new_state(params, config) -> dict:
  """TrainState.ema of a fresh run: {} without self-distillation, else the
  taught parts' copy and zero centers [prototypes] (DINO's init)."""
  if not enabled(config):
    return {}
  k = config.self_distill.prototypes
  return {'params': nnx.State({part: params[part] for part in TAUGHT}),
          'center': {'image': jnp.zeros((k,), jnp.float32),
                     'patch': jnp.zeros((k,), jnp.float32)}}


def _crop_config(augment_config, scale, size: int):
  crops = ml_collections.ConfigDict(augment_config.to_dict())
  crops.update(crop_scale_min=float(scale[0]), crop_scale_max=float(scale[1]), image_size=size)
  return crops


def views(row_keys, images_uint8, config):
  """(global crops float32 [n, S, S, C], local crops [n, V, s, s, C], patch
  masks bool [n, patches]) of a batch, all in [0, 1]; row i's from its key
  row_keys[i] alone. Each mask hides exactly round(mask_ratio x patches)
  patches."""
  s, a = config.self_distill, config.augment
  n = images_uint8.shape[0]
  # Each row's: its global crop, its mask, its local crops.
  keys = jax.vmap(lambda k: jax.random.split(k, 2 + s.local_views))(row_keys)
  images = images_uint8.astype(jnp.float32) / 255.0
  crop = lambda cfg: jax.vmap(lambda k, x: augment.simclr_view(k, x, cfg))
  global_crops = crop(_crop_config(a, s.global_scale, a.image_size))(keys[:, 0], images)
  local_cfg = _crop_config(a, s.local_scale, local_size(config))
  local_crops = jax.vmap(lambda k, x: jax.vmap(lambda kk: augment.simclr_view(kk, x, local_cfg))(
      k), in_axes=(0, 0))(keys[:, 2:], images)
  patches = (a.image_size // config.model.vit.patch_size) ** 2
  hidden = round(s.mask_ratio * patches)
  order = jax.vmap(lambda k: jnp.argsort(jax.random.uniform(k, (patches,))))(keys[:, 1])
  masks = jnp.zeros((n, patches), bool).at[jnp.arange(n)[:, None], order[:, :hidden]].set(True)
  return global_crops, local_crops, masks


def _patch_tokens(encoder, tokens):
  return tokens[:, 1:] if encoder.cls is not None else tokens


def terms(student, teacher, center, row_keys, images_uint8, config):
  """(the two terms' weighted sum, metrics, the new centers) of one batch:
  student and teacher are TwoTowerModels (the teacher's taught parts its EMA
  copy, no gradient), center {'image', 'patch': [prototypes]}."""
  s, d = config.self_distill, config.dataset
  global_crops, local_crops, masks = views(row_keys, images_uint8, config)
  global_input = standardize(global_crops, d)
  teacher_tokens, _ = teacher.image_encoder.tokens(global_input)
  value, metrics, new_center = jnp.float32(0), {}, dict(center)
  encoder = student.image_encoder
  if s.weight:
    teacher_image = jax.lax.stop_gradient(teacher.self_distill.image(
        teacher.image_encoder.pooled(teacher_tokens, None)))
    n, v, size = local_crops.shape[:3]
    patch = config.model.vit.patch_size
    flat = standardize(local_crops.reshape(n * v, size, size, -1), d)
    grid = jnp.full((n * v, 2), size // patch, jnp.int32)
    local_tokens, lengths = encoder.tokens(transformer.patchify(flat, patch), grid)
    local = student.self_distill.image(encoder.pooled(local_tokens, lengths)).reshape(n, v, -1)
    term = self_distill.prototype_cross_entropy(local, teacher_image, center['image'],
                                                s.student_temperature, s.teacher_temperature)
    value = value + s.weight * term.loss
    metrics.update(self_distill_loss=term.loss,
                   **{f'self_distill_{k}': x for k, x in term.metrics.items()})
    new_center['image'] = self_distill.updated_center(center['image'], teacher_image,
                                                       s.center_momentum)
  if s.masked_weight:
    teacher_patch = jax.lax.stop_gradient(teacher.self_distill.patch(
        _patch_tokens(teacher.image_encoder, teacher_tokens)))
    masked_tokens, _ = encoder.tokens(global_input, mask=masks,
                                      mask_token=student.self_distill.mask_token[...])
    predicted = student.self_distill.patch(_patch_tokens(encoder, masked_tokens))
    term = self_distill.prototype_cross_entropy(predicted, teacher_patch, center['patch'],
                                                s.student_temperature,
                                                s.patch_teacher_temperature, weights=masks)
    value = value + s.masked_weight * term.loss
    metrics.update(masked_loss=term.loss, **{f'masked_{k}': x for k, x in term.metrics.items()})
    new_center['patch'] = self_distill.updated_center(center['patch'], teacher_patch,
                                                      s.center_momentum)
  return value, metrics, new_center


def teacher_params(params, ema: dict, step, start_step: int):
  """The model's parameters with the taught parts the teacher's: at
  start_step (and before) the student's own, after it the EMA's."""
  taught = {part: jax.tree.map(lambda p, e: jnp.where(step <= start_step, p, e), params[part],
                               ema['params'][part]) for part in TAUGHT}
  return jax.lax.stop_gradient(nnx.State({**params, **taught}))


def updated(ema: dict, params, new_params, centers: dict, step, group) -> dict:
  """TrainState.ema after a step: unchanged before start_step; from it on
  m x the teacher the step used (`teacher_params` of the step's `params`)
  + (1 - m) x the updated `new_params`, and the step's new centers."""
  if not ema:
    return ema
  active = step >= group.start_step
  m = jnp.float32(group.momentum)
  teacher = teacher_params(params, ema, step, group.start_step)
  moved = {part: jax.tree.map(lambda t, p, old: jnp.where(active, m * t + (1 - m) * p, old),
                              teacher[part], new_params[part], ema['params'][part])
           for part in TAUGHT}
  return {'params': nnx.State(moved),
          'center': jax.tree.map(lambda new, old: jnp.where(active, new, old), centers,
                                 ema['center'])}
