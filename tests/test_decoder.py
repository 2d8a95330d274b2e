"""The LocCa decoder (jaxcl.models.decoder) and its loss
(jaxcl.losses.captioning): the loss against a float64 NumPy reference on one
and 8 devices; teacher forcing sees no later token, parallel prediction no
token at all; image padding changes nothing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import helpers
from helpers import assert_close
from jaxcl import config as config_lib, losses, parallel
from jaxcl.data import augment
from jaxcl.losses import captioning
from jaxcl.models import decoder
from jaxcl.trainer import experiment, train_step, validation
from test_losses import LAYOUTS, RTOL_GRAD, RTOL_VALUE, _mesh, finite_diff

N, L, V = 16, 5, 7


def ref_token_cross_entropy(logits, targets, weights):
  logits = logits - logits.max(-1, keepdims=True)
  log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  picked = np.take_along_axis(log_p, targets[..., None], -1)[..., 0]
  return -(weights * picked).sum() / weights.sum()


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  weights = (rng.random((N, L)) < 0.7).astype(np.float64)
  weights[0] = 0  # an example whose tokens do not count
  return rng.normal(size=(N, L, V)) * 2, rng.integers(0, V, (N, L)), weights


@pytest.mark.parametrize('layout', LAYOUTS)
def test_token_cross_entropy_matches_the_float64_reference(layout):
  logits, targets, weights = _inputs()

  def loss(logits, targets, weights, axis=None):
    result = captioning.token_cross_entropy(logits, targets, weights, losses.LossOptions(axis))
    return result.loss, result.metrics

  fn = loss
  if LAYOUTS[layout] is not None:
    shape, names, axis = LAYOUTS[layout]
    spec = jax.sharding.PartitionSpec(axis)
    fn = jax.shard_map(lambda *a: loss(*a, axis=axis), mesh=_mesh(shape, names),
                       in_specs=(spec,) * 3, out_specs=jax.sharding.PartitionSpec())
  (value, metrics), grad = jax.jit(jax.value_and_grad(fn, has_aux=True))(
      jnp.float32(logits), jnp.int32(targets), jnp.float32(weights))
  assert_close(value, ref_token_cross_entropy(logits, targets, weights), rtol=RTOL_VALUE,
               what='loss')
  small = (slice(0, 3), slice(None), slice(None))  # central differences on a few rows
  want = finite_diff(lambda x: ref_token_cross_entropy(
      np.concatenate([x, logits[3:]]), targets, weights), [logits[small]])[0]
  assert_close(grad[small], want, rtol=RTOL_GRAD, what='dlogits')
  counted = weights > 0
  assert float(metrics['decoder_tokens']) == counted.sum()
  assert_close(metrics['decoder_accuracy'],
               (logits.argmax(-1) == targets)[counted].mean(), rtol=1e-6, what='accuracy')


def _decoder():
  return decoder.CaptionDecoder(vocab_size=V, max_length=L, image_width=12, width=8, depth=2,
                                heads=2, mlp_dim=16, rngs=nnx.Rngs(0))


def test_teacher_forcing_sees_no_later_token_and_parallel_none():
  model = _decoder()
  # A non-zero output layer: the decoder starts at zero logits (big_vision's init).
  model.logits.kernel[...] = jax.random.normal(jax.random.key(1), model.logits.kernel.shape)
  rng = np.random.default_rng(0)
  image = jnp.float32(rng.normal(size=(4, 6, 12)))
  ids = jnp.int32(rng.integers(1, V, (4, L)))
  later = ids.at[:, 3].set((ids[:, 3] % (V - 1)) + 1)  # another token at position 3
  forcing, parallel = jnp.zeros(4, bool), jnp.ones(4, bool)
  a, b = model(image, ids, forcing), model(image, later, forcing)
  # Position t predicts ids[t] from ids[:t]: position 3's change reaches 4 only.
  np.testing.assert_array_equal(a[:, :4], b[:, :4])
  assert not np.allclose(a[:, 4], b[:, 4])
  np.testing.assert_array_equal(model(image, ids, parallel), model(image, later, parallel))
  assert not np.allclose(model(image, ids, parallel), a)
  mixed = model(image, ids, jnp.array([True, False, True, False]))
  assert_close(mixed[1::2], a[1::2], rtol=1e-6, what='teacher-forced rows of a mixed batch')


def test_image_padding_changes_nothing():
  model = _decoder()
  model.logits.kernel[...] = jax.random.normal(jax.random.key(1), model.logits.kernel.shape)
  rng = np.random.default_rng(1)
  image = jnp.float32(rng.normal(size=(2, 4, 12)))
  padded = jnp.concatenate([image, jnp.float32(rng.normal(size=(2, 3, 12)))], axis=1)
  ids, forcing = jnp.int32(rng.integers(1, V, (2, L))), jnp.zeros(2, bool)
  assert_close(model(padded, ids, forcing, jnp.int32([4, 4])), model(image, ids, forcing),
               rtol=1e-5, what='logits with padded image tokens')


def test_parallel_examples_take_their_share():
  chosen = decoder.parallel_examples(jax.random.split(jax.random.key(0), 10_000), 0.75)
  assert 0.73 < float(chosen.mean()) < 0.77


# ---------------------------------------------------------- in the step ---
def _student(devices=1, **extra):
  config = helpers.tiny_config(helpers.CLIP_CONFIG, helpers.TINY_TWO_TOWER, batch_size=16,
                               **extra)
  config.decoder.update(weight=0.5, start_step=1, parallel_fraction=0.5)
  validation.validate(config, check_data=False)
  return experiment.setup(config, devices=jax.devices()[:devices])


def _reference(exp, state, batch):
  """(contrastive loss, the decoder's loss) from the model's own forward pass
  on the step's crops and the decoder's rows, and the two loss functions."""
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  keys = augment.view_keys(key, 1, len(batch['text']))
  model = nnx.merge(exp.eval_graphdef, state.params, state.batch_stats)
  inputs = {k: batch[k] for k in ('image', 'text', 'decoder_ids')}
  a, b, logits = model(*exp.method.model_inputs(keys, inputs, exp.config))
  decoded = captioning.token_cross_entropy(logits, batch['decoder_ids'], batch['decoder_weights'])
  return losses.clip_loss(a, b, model.temperature(state.step)).loss, decoded.loss


@pytest.mark.slow  # the step and a reference compiled
def test_the_step_adds_the_decoders_term_from_its_start_step():
  exp = _student()
  host = helpers.two_tower_batch(exp, 16)
  assert host['decoder_weights'].sum() > 0 and host['decoder_ids'].shape == host['text'].shape
  batch = parallel.put_batch(exp.mesh, {k: host[k] for k in train_step.step_batch_keys(exp)})
  loss_and_grads = jax.jit(train_step.make_loss_and_grads(exp))
  reference = jax.jit(lambda state, batch: _reference(exp, state, batch))
  state = exp.init_state()
  results = []
  for step, weight in ((0, 0.0), (1, 0.5)):
    state = state.replace(step=jnp.int32(step))
    (value, (metrics, *_)), grads = loss_and_grads(state, batch)
    contrastive, decoded = reference(state, batch)
    assert_close(metrics['decoder_loss'], decoded, rtol=1e-5, what='decoder_loss')
    assert_close(value, contrastive + weight * decoded, rtol=1e-5, what=f'loss at {step}')
    results.append(jax.device_get((value, grads)))
  decoder_grads = jax.tree.leaves(results[1][1]['decoder'])
  assert all(not np.any(g) for g in jax.tree.leaves(results[0][1]['decoder']))
  assert any(np.any(g) for g in decoder_grads)  # trained from its start step on
  # On 8 devices with FSDP, and in microbatches, the decoder's step is checked with the
  # self-distillation terms (tests/test_self_distill.py), one compile for both.


@pytest.mark.parametrize('change, message', [
    (dict(method='simclr'), 'the decoder writes captions, simclr has none'),
    ({'model.name': 'resnet18'}, "reads a ViT's patch tokens"),
    ({'decoder.tasks': ('caption', 'describe')}, 'decoder.tasks must name some of'),
    ({'decoder.parallel_fraction': 1.5}, 'decoder.parallel_fraction must be in [0, 1]'),
    ({'decoder.heads': 3}, 'is not divisible by its 3 heads'),
])
def test_a_bad_decoder_group_is_one_line(change, message):
  config = helpers.tiny_config(helpers.CLIP_CONFIG, helpers.TINY_TWO_TOWER)
  config.decoder.weight = 1.0
  config.update_from_flattened_dict(change)
  with pytest.raises(config_lib.ConfigError) as raised:
    validation.validate(config, check_data=False)
  assert message in str(raised.value) and '\n' not in str(raised.value)
