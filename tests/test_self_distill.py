"""SigLIP 2's self-distillation (jaxcl.losses.self_distill,
jaxcl.trainer.ema_teacher): DINO's cross-entropy and its center against a
float64 NumPy reference on one and 8 devices; the crops and masks; in the
step, the terms from their start step on with the student as the first
teacher, microbatches equal to the whole batch, the EMA update to the last
bit, and 8 devices equal to one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import helpers
from helpers import assert_close
from jaxcl import config as config_lib, losses, parallel
from jaxcl.data import augment
from jaxcl.losses import self_distill
from jaxcl.models import transformer
from jaxcl.trainer import ema_teacher, experiment, recipe_terms, train_step, validation
from test_losses import LAYOUTS, RTOL_GRAD, RTOL_VALUE, _mesh, finite_diff

N, V, K = 16, 3, 6
TAU_S, TAU_T = 0.1, 0.04


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def ref_prototype_cross_entropy(student, teacher, center, tau_s, tau_t, weights=None):
  """DINO's H(p_t, p_s), each row's mean over its counted outputs, the mean over rows."""
  if teacher.ndim == 2:
    teacher = np.broadcast_to(teacher[:, None], student.shape)
  p_teacher = np.exp(_log_softmax((teacher - center) / tau_t))
  per_output = -(p_teacher * _log_softmax(student / tau_s)).sum(-1)
  weights = np.ones(per_output.shape) if weights is None else weights
  return ((weights * per_output).sum(1) / np.maximum(weights.sum(1), 1)).mean()


def _inputs(per_output_teacher: bool, seed=0):
  rng = np.random.default_rng(seed)
  student = rng.uniform(-1, 1, (N, V, K))  # cosines to the prototypes
  teacher = rng.uniform(-1, 1, (N, V, K) if per_output_teacher else (N, K))
  weights = (rng.random((N, V)) < 0.6).astype(np.float64)
  weights[0] = 0  # a row with no masked patch counts for nothing
  return student, teacher, rng.uniform(-0.3, 0.3, K), weights


def _on_layout(fn, layout, num_args):
  if LAYOUTS[layout] is None:
    return lambda *args: fn(*args, None)
  shape, names, axis = LAYOUTS[layout]
  spec = jax.sharding.PartitionSpec(axis)
  replicated = jax.sharding.PartitionSpec()
  specs = (spec, spec, replicated, spec)[:num_args]
  return jax.shard_map(lambda *args: fn(*args, axis), mesh=_mesh(shape, names), in_specs=specs,
                       out_specs=replicated)


@pytest.mark.parametrize('layout', LAYOUTS)
@pytest.mark.parametrize('patches', [False, True], ids=['local-views', 'masked-patches'])
def test_prototype_cross_entropy_matches_the_float64_reference(layout, patches):
  """Local views share their row's one teacher output; masked patches each
  have their own and count only where masked."""
  student, teacher, center, weights = _inputs(per_output_teacher=patches)
  weights = weights if patches else None

  def loss(student, teacher, center, *rest):
    *weight, axis = rest
    result = self_distill.prototype_cross_entropy(
        student, teacher, center, TAU_S, TAU_T, weight[0] if weight else None,
        losses.LossOptions(axis))
    return result.loss, result.metrics

  args = (student, teacher, center) + ((weights,) if patches else ())
  fn = _on_layout(loss, layout, len(args))
  (value, metrics), grad = jax.jit(jax.value_and_grad(fn, has_aux=True))(
      *(jnp.float32(x) for x in args))
  ref = lambda s: ref_prototype_cross_entropy(s, teacher, center, TAU_S, TAU_T, weights)
  assert_close(value, ref(student), rtol=RTOL_VALUE, what='loss')
  rows = slice(0, 3)  # central differences on a few rows
  want = finite_diff(lambda x: ref(np.concatenate([x, student[3:]])), [student[rows]])[0]
  assert_close(grad[rows], want, rtol=RTOL_GRAD, what='dstudent')
  # No gradient reaches the teacher or the center.
  grads = jax.jit(jax.grad(lambda *a: fn(*a)[0], argnums=(1, 2)))(
      *(jnp.float32(x) for x in args))
  assert all(not np.any(g) for g in grads)
  tree = teacher if patches else np.broadcast_to(teacher[:, None], student.shape)
  p = np.exp(_log_softmax((tree - center) / TAU_T))
  entropy = -(p * np.log(p)).sum(-1)
  share = np.ones(entropy.shape) if weights is None else weights
  want_entropy = ((share * entropy).sum(1) / np.maximum(share.sum(1), 1)).mean()
  assert_close(metrics['teacher_entropy'], want_entropy, rtol=RTOL_VALUE, what='entropy')


@pytest.mark.parametrize('layout', LAYOUTS)
def test_the_center_follows_the_teachers_global_mean(layout):
  _, teacher, center, _ = _inputs(per_output_teacher=True)
  fn = lambda t, c: self_distill.updated_center(c, t, 0.9)
  if LAYOUTS[layout] is not None:  # the outputs split by rows, the center replicated
    shape, names, axis = LAYOUTS[layout]
    spec, replicated = jax.sharding.PartitionSpec(axis), jax.sharding.PartitionSpec()
    fn = jax.shard_map(lambda t, c: self_distill.updated_center(
        c, t, 0.9, losses.LossOptions(axis)), mesh=_mesh(shape, names),
                       in_specs=(spec, replicated), out_specs=replicated)
  got = jax.jit(fn)(jnp.float32(teacher), jnp.float32(center))
  want = 0.9 * center + 0.1 * teacher.reshape(-1, K).mean(0)
  assert_close(got, want, rtol=RTOL_VALUE, what='center')


# ----------------------------------------------------------- the views ---
def _config(**self_distill):
  config = helpers.tiny_config(helpers.CLIP_CONFIG, helpers.TINY_TWO_TOWER, batch_size=16)
  config.self_distill.update(weight=1.0, masked_weight=0.25, start_step=1, local_views=2,
                             head_hidden=16, head_bottleneck=8, prototypes=32)
  config.self_distill.update(self_distill)
  validation.validate(config, check_data=False)
  return config


def test_each_row_has_its_crops_and_exactly_its_share_of_masked_patches():
  config = _config(mask_ratio=0.3)
  images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3)), jnp.uint8)
  keys = jax.random.split(jax.random.key(3), 8)
  views = jax.jit(lambda k, x: ema_teacher.views(k, x, config))  # compiled: quicker than eager
  global_crops, local_crops, masks = views(keys, images)
  assert global_crops.shape == (8, 32, 32, 3) and local_crops.shape == (8, 2, 16, 16, 3)
  np.testing.assert_array_equal(masks.sum(1), round(0.3 * 16))
  assert len({tuple(m) for m in np.asarray(masks)}) > 1  # each row draws its own
  # Row i's crops and mask depend on its key alone (a microbatch's rows see the same).
  for whole, part in zip((global_crops, local_crops, masks),
                         views(keys[:4], images[:4])):
    np.testing.assert_array_equal(whole[:4], part)


def test_local_size_is_three_sevenths_in_whole_patches():
  config = _config()
  assert ema_teacher.local_size(config) == 16  # 32 px, patch 8: 13.7 -> 2 patches
  config.augment.image_size, config.model.vit.patch_size = 224, 16
  assert ema_teacher.local_size(config) == 96  # DINO's 96 of 224
  config.self_distill.local_size = 64
  assert ema_teacher.local_size(config) == 64


def test_a_masked_patch_is_the_mask_token_at_its_position():
  """The masked patch embeddings are replaced before the positions are added."""
  vit = transformer.ViT(image_size=16, in_channels=3, patch_size=8, width=8, depth=1, heads=2,
                        mlp_dim=16, rngs=nnx.Rngs(0))
  images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  token = jax.random.normal(jax.random.key(1), (1, 1, 8))
  mask = jnp.array([[True, False, False, True], [False] * 4])
  masked, _ = vit.tokens(images, mask=mask, mask_token=token)
  plain, _ = vit.tokens(images)
  np.testing.assert_array_equal(masked[1], plain[1])
  other = images.at[0, :8, :8].set(7.0)  # the masked patch's pixels do not matter
  np.testing.assert_array_equal(vit.tokens(other, mask=mask, mask_token=token)[0], masked)


# ---------------------------------------------------------- in the step ---
def _setup(devices=1, **extra):
  config = _config()
  config.update_from_flattened_dict(extra)
  return experiment.setup(config, devices=jax.devices()[:devices])


def _forward(exp, state, batch):
  """The outputs the step's terms compare at their start step (the teacher
  is the student), from the model's own forward passes on the step's crops
  and masks."""
  config = exp.config
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  key = jax.random.fold_in(key, recipe_terms.SELF_DISTILL_STREAM)
  row_keys = augment.view_keys(key, 1, len(batch['image']))[:, 0]
  global_crops, local_crops, masks = ema_teacher.views(row_keys, batch['image'], config)
  model = nnx.merge(exp.eval_graphdef, state.params, state.batch_stats)
  encoder, heads = model.image_encoder, model.self_distill
  norm = lambda x: augment.standardize(x, config.dataset.mean, config.dataset.std)
  tokens, _ = encoder.tokens(norm(global_crops))
  teacher_image, teacher_patch = heads.image(encoder.pooled(tokens, None)), heads.patch(tokens)
  n, v, size = local_crops.shape[:3]
  local_tokens, lengths = encoder.tokens(
      transformer.patchify(norm(local_crops.reshape(n * v, size, size, 3)), 8),
      jnp.full((n * v, 2), size // 8))
  local = heads.image(encoder.pooled(local_tokens, lengths)).reshape(n, v, -1)
  masked, _ = encoder.tokens(norm(global_crops), mask=masks, mask_token=heads.mask_token[...])
  return local, teacher_image, heads.patch(masked), teacher_patch, masks


def _reference(exp, state, batch):
  """The terms of `_forward`'s outputs by the float64 reference: (SILC, TIPS)."""
  s = exp.config.self_distill
  local, teacher_image, predicted, teacher_patch, masks = jax.jit(
      lambda st, b: _forward(exp, st, b))(state, batch)
  f64 = lambda x: np.asarray(x, np.float64)
  zero = np.zeros(s.prototypes)
  silc = ref_prototype_cross_entropy(f64(local), f64(teacher_image), zero,
                                     s.student_temperature, s.teacher_temperature)
  tips = ref_prototype_cross_entropy(f64(predicted), f64(teacher_patch), zero,
                                     s.student_temperature, s.patch_teacher_temperature,
                                     f64(masks))
  return silc, tips


@pytest.mark.slow  # the step compiled on 1 and on 8 devices, and in microbatches
def test_the_terms_start_at_their_step_and_the_ema_follows_exactly():
  """With the decoder on too: before the start step nothing; at it the
  reference's terms, and microbatches of 8 (GradCache, each chunk its
  share) give the whole batch's loss, gradients, metrics and centers; the
  EMA exact; 8 devices with FSDP equal to one."""
  exp = _setup(**{'decoder.weight': 0.5})
  s = exp.config.self_distill
  host = helpers.two_tower_batch(exp, 16)
  batch = parallel.put_batch(exp.mesh, {k: host[k] for k in train_step.step_batch_keys(exp)})
  step = train_step.make_train_step(exp)
  loss_and_grads = jax.jit(train_step.make_loss_and_grads(exp))
  state = exp.init_state()
  initial = jax.device_get(state.ema)

  # Before start_step: no term, no gradient into the heads, the teacher untouched.
  (_, aux), grads = loss_and_grads(state, batch)
  assert float(aux.metrics['self_distill_loss']) == 0.0
  assert all(not np.any(g) for g in jax.tree.leaves(grads['self_distill']))
  state, _ = step(state, batch)
  for a, b in zip(jax.tree.leaves(initial), jax.tree.leaves(jax.device_get(state.ema))):
    np.testing.assert_array_equal(a, b)

  # At start_step the teacher is the student: the terms equal the reference's.
  (value, aux), grads = loss_and_grads(state, batch)
  silc, tips = _reference(exp, state, batch)
  assert_close(aux.metrics['self_distill_loss'], silc, rtol=1e-5, what='SILC term')
  assert_close(aux.metrics['masked_loss'], tips, rtol=1e-5, what='TIPS term')
  assert any(np.any(g) for g in jax.tree.leaves(grads['self_distill']))
  chunked = _setup(**{'decoder.weight': 0.5, 'microbatch_size': 8})
  (value_c, aux_c), grads_c = jax.jit(train_step.make_loss_and_grads(chunked))(state, batch)
  assert_close(value_c, value, rtol=1e-5, what='loss in microbatches')
  assert_close(jax.device_get(grads_c), jax.device_get(grads), rtol=3e-5,
               what='grads in microbatches')
  keys = [k for k in aux.metrics if k.startswith(('decoder_', 'self_distill_', 'masked_'))]
  assert aux.metrics['decoder_loss'] > 0 and len(keys) > 6
  assert_close({k: aux_c.metrics[k] for k in keys}, {k: aux.metrics[k] for k in keys},
               rtol=1e-5, what='metrics in microbatches')
  assert_close(aux_c.centers, aux.centers, rtol=1e-5, what='centers in microbatches')
  before = jax.device_get(state.params)
  state, _ = step(state, batch)
  after = jax.device_get(state.params)
  m = np.float32(s.momentum)
  for part in ema_teacher.TAUGHT:
    want = jax.tree.map(lambda t, p: m * t + (np.float32(1) - m) * p, before[part], after[part])
    for got, w in zip(jax.tree.leaves(jax.device_get(state.ema['params'][part])),
                      jax.tree.leaves(want)):
      np.testing.assert_array_equal(got, w)
  assert np.any(jax.device_get(state.ema['center']['image']))

  # After it the teacher is the EMA: one more step moves it from itself.
  ema = jax.device_get(state.ema['params'])
  state, metrics = step(state, batch)
  after = jax.device_get(state.params)
  want = jax.tree.map(lambda t, p: m * t + (np.float32(1) - m) * p, ema['image_encoder'],
                      after['image_encoder'])
  for got, w in zip(jax.tree.leaves(jax.device_get(state.ema['params']['image_encoder'])),
                    jax.tree.leaves(want)):
    np.testing.assert_array_equal(got, w)
  assert np.isfinite(float(metrics['loss']))

  # 8 devices (data 4 x fsdp 2) give one device's loss and gradients.
  sharded = _setup(devices=8, **{'mesh.fsdp': 2, 'decoder.weight': 0.5})
  state_1, state_8 = (e.init_state().replace(step=jnp.int32(2)) for e in (exp, sharded))
  (value_1, _), grads_1 = loss_and_grads(state_1, batch)
  batch_8 = parallel.put_batch(sharded.mesh,
                               {k: host[k] for k in train_step.step_batch_keys(sharded)})
  (value_8, _), grads_8 = jax.jit(train_step.make_loss_and_grads(sharded))(state_8, batch_8)
  assert_close(value_8, value_1, rtol=1e-5, what='loss on 8 devices')
  assert_close(jax.device_get(grads_8), jax.device_get(grads_1), rtol=3e-5,
               what='grads on 8 devices')


@pytest.mark.parametrize('change, message', [
    (dict(method='simclr'), 'trains an image-text model (clip, siglip), not simclr'),
    ({'model.name': 'resnet18'}, "read a ViT's patch tokens"),
    ({'dataset.resolution': 'naflex'}, 'a NaFlex run has no square crops'),
    ({'self_distill.momentum': 1.0}, 'self_distill.momentum must be in [0, 1)'),
    ({'self_distill.mask_ratio': 0.01}, 'masks none or all'),
    ({'self_distill.local_size': 12}, 'must be whole patches of 8 px'),
    ({'self_distill.local_scale': (0.5, 0.1)}, 'self_distill.local_scale must be (min, max)'),
    ({'self_distill.teacher_temperature': 0.0}, 'self_distill.teacher_temperature must be > 0'),
])
def test_a_bad_self_distill_group_is_one_line(change, message):
  config = helpers.tiny_config(helpers.CLIP_CONFIG, helpers.TINY_TWO_TOWER)
  config.self_distill.update(weight=1.0, masked_weight=0.25)
  config.update_from_flattened_dict(change)
  with pytest.raises(config_lib.ConfigError) as raised:
    validation.validate(config, check_data=False)
  assert message in str(raised.value) and '\n' not in str(raised.value)
