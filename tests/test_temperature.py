"""The temperature module, its clamp, and the optimizer's treatment of it."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, PartitionSpec as P

from helpers import CLIP_CONFIG, TINY_TWO_TOWER, assert_close, tiny_config, two_tower_batch
from jaxcl import config as config_lib, losses, parallel
from jaxcl.data import augment
from jaxcl.models.temperature import Temperature, project_all
from jaxcl.trainer import experiment, optim, train_step, validation
from test_losses import finite_diff, ref_clip_rows, unit_rows


def test_learnable_is_log_parameterized_and_clamped():
  t = Temperature(mode='learnable', init=0.07, min=0.01, max=1.0)
  assert float(t()) == pytest.approx(0.07, rel=1e-6)
  assert float(t.log_tau[...]) == pytest.approx(math.log(0.07), rel=1e-6)
  t.log_tau[...] = jnp.float32(math.log(0.001))
  project_all(t)
  assert float(t()) == pytest.approx(0.01, rel=1e-5)  # 1/τ capped at 100
  t.log_tau[...] = jnp.float32(3.0)
  project_all(t)
  assert float(t()) == pytest.approx(1.0, rel=1e-5)


def test_fixed_has_no_parameter():
  t = Temperature(mode='fixed', init=0.5, min=0.01, max=1.0)
  assert float(t()) == 0.5
  assert not jax.tree.leaves(nnx.state(t, nnx.Param))


def test_gradient_reaches_log_tau():
  t = Temperature(mode='learnable', init=0.5, min=0.01, max=1.0)
  graphdef, params = nnx.split(t, nnx.Param)
  # d/d(log τ) of (c / τ) = -c / τ.
  grad = jax.grad(lambda p: 3.0 / nnx.merge(graphdef, p)())(params)
  assert float(grad['log_tau'][...]) == pytest.approx(-3.0 / 0.5, rel=1e-5)


@pytest.mark.parametrize('bad', [dict(init=0.0), dict(min=0.5, max=0.2, init=0.3),
                                 dict(init=2.0, max=1.0), dict(mode='cosine')])
def test_bad_settings_raise(bad):
  with pytest.raises(ValueError):
    Temperature(**{**dict(mode='learnable', init=0.1, min=0.01, max=1.0), **bad})


@pytest.mark.parametrize('name', optim.OPTIMIZERS)
def test_weight_decay_skips_temperature_biases_and_norms(name):
  cfg = config_lib.base_config()
  cfg.optimizer.update(name=name, learning_rate=0.0, scale_lr_by_batch=False, warmup_steps=0,
                       weight_decay=0.5, b1=0.9, b2=0.999, momentum=0.9,
                       lars_trust_coefficient=0.001, grad_clip_norm=0.0)
  # With learning rate 0 nothing moves; with a constant LR, zero gradients
  # move only what weight decay touches.
  cfg.optimizer.learning_rate = 0.1
  opt = optim.build_optimizer(cfg, total_steps=10)
  params = {'kernel': jnp.ones((3, 3)), 'bias': jnp.ones((3,)), 'log_tau': jnp.float32(-1.0),
            'temperature': {'head': {'kernel': jnp.ones((3, 1))}}}  # a predicted τ's head
  state = opt.init(params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  for _ in range(3):  # past step 0, where the warm-up/cosine schedule gives LR 0
    updates, state = opt.update(zeros, state, params)
    params_next = jax.tree.map(lambda p, u: p + u, params, updates)
  assert np.all(np.asarray(params_next['kernel']) < 1.0)
  np.testing.assert_array_equal(params_next['bias'], params['bias'])
  assert float(params_next['log_tau']) == -1.0
  np.testing.assert_array_equal(params_next['temperature']['head']['kernel'], 1.0)


def test_cosine_schedule_follows_its_formula():
  t = Temperature(mode='cosine', init=0.1, min=0.05, max=0.5, period=100)
  for step in (0, 10, 25, 50, 75, 99, 100, 130):
    want = 0.05 + 0.5 * (0.5 - 0.05) * (1 + np.cos(2 * np.pi * step / 100))
    # The float32 phase 2π·130/100 = 8.17 is held to 4.8e-7 (half an ulp),
    # which moves τ(130) by up to 5e-7 of itself (measured 4.9e-7).
    np.testing.assert_allclose(float(t(step)), want, rtol=4e-6)
  assert float(t(0)) == pytest.approx(0.5) and float(t(50)) == pytest.approx(0.05)
  assert not nnx.state(t, nnx.Param)  # a schedule, nothing to learn


def test_learnable_warmup_holds_init_without_gradient():
  t = Temperature(mode='learnable', init=0.2, min=0.01, max=1.0, warmup_steps=10)
  t.log_tau[...] = jnp.log(0.5)  # as if trained away from init
  assert float(t(0)) == pytest.approx(0.2) and float(t(9)) == pytest.approx(0.2)
  assert float(t(10)) == pytest.approx(0.5)
  grad = lambda step: nnx.grad(lambda m: m(step))(t).log_tau[...]
  assert float(grad(5)) == 0.0
  assert float(grad(10)) == pytest.approx(0.5)  # d exp(log τ) / d log τ = τ


def test_temperature_learning_rate_multiplier():
  cfg = config_lib.base_config()
  cfg.temperature.lr_multiplier = 10.0
  cfg.optimizer.update(name='sgd', learning_rate=0.1, scale_lr_by_batch=False, warmup_steps=0,
                       weight_decay=0.0, b1=0.9, b2=0.999, momentum=0.0,
                       lars_trust_coefficient=0.001, grad_clip_norm=0.0)
  opt = optim.build_optimizer(cfg, total_steps=1000)
  params = {'kernel': jnp.ones((2, 2)), 'temperature': {'log_tau': jnp.float32(0.0),
                                                        'head': {'kernel': jnp.ones((2, 1))}}}
  grads = {'kernel': jnp.ones((2, 2)), 'temperature': {'log_tau': jnp.float32(1.0),
                                                       'head': {'kernel': jnp.ones((2, 1))}}}
  state = opt.init(params)
  for _ in range(3):  # past the schedule's first step
    updates, state = opt.update(grads, state, params)
  lr_kernel = -float(updates['kernel'][0, 0])
  assert lr_kernel > 0
  assert -float(updates['temperature']['log_tau']) == pytest.approx(10 * lr_kernel, rel=1e-6)
  np.testing.assert_allclose(-np.asarray(updates['temperature']['head']['kernel']),
                             10 * lr_kernel, rtol=1e-6)  # a predicted τ's head too


# ------------------------------- temperature.mode=free and per-direction τ ---
def _first_step(config, batch_fn, edit_params=None):
  """(the step's loss, its metrics, the embeddings the step's towers give):
  one train step of `config` on one device and its towers run outside it."""
  exp = experiment.setup(config, devices=jax.devices()[:1])
  state = exp.init_state()
  if edit_params is not None:
    state = state.replace(params=edit_params(state.params))
  batch = parallel.put_batch(exp.mesh, batch_fn(exp))
  _, encode = train_step.make_towers(exp)
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  n = config.batch_size
  (a, b), _ = encode(state.params, state.batch_stats,
                     (batch, augment.view_keys(key, exp.method.num_views, n)))
  _, metrics = train_step.make_train_step(exp)(state, batch)
  return float(metrics['loss']), jax.device_get(metrics), (a, b), exp


@pytest.mark.slow  # too long for the quick loop (conftest.py: QUICK_TEST_S)
def test_free_mode_trains_on_arctanh_logits():
  t = Temperature(mode='free', init=0.2, min=0.01, max=1.0)
  assert float(t()) == 1.0 and not jax.tree.leaves(nnx.state(t, nnx.Param))
  images = np.random.default_rng(0).integers(0, 256, (32, 8, 8, 1), dtype=np.uint8)
  loss, metrics, (a, b), _ = _first_step(tiny_config(**{'temperature.mode': 'free'}),
                                         lambda exp: {'image': images})
  assert metrics['temperature'] == 1.0
  want = losses.nt_xent(a, b, 1.0, losses.LossOptions(transform='arctanh')).loss
  assert loss == pytest.approx(float(want), rel=1e-5)
  assert loss != pytest.approx(float(losses.nt_xent(a, b, 1.0).loss), rel=1e-3)


@pytest.mark.slow  # a two-tower step
def test_clip_per_direction_temperatures_in_the_step():
  config = tiny_config(CLIP_CONFIG, TINY_TWO_TOWER, **{'temperature.per_direction': True})

  def text_to_image_at_half(params):
    params['temperature_t2i']['log_tau'][...] = jnp.float32(math.log(0.5))
    return params

  loss, metrics, (a, b), exp = _first_step(config, lambda exp: two_tower_batch(exp, 32),
                                           text_to_image_at_half)
  init = config.temperature.init
  assert metrics['temperature'] == pytest.approx(init) and metrics['temperature_t2i'] == 0.5
  assert metrics['inv_temperature_t2i'] == pytest.approx(2.0)
  want = losses.clip_loss(a, b, jnp.float32([init, 0.5])).loss
  assert loss == pytest.approx(float(want), rel=1e-5)
  # the second τ is a parameter of its own, and the optimizer treats it as τ
  assert 'log_tau' in exp.abstract_state().params['temperature_t2i']


def test_per_direction_is_refused_for_one_direction():
  with pytest.raises(config_lib.ConfigError, match='per_direction'):
    validation.validate(tiny_config(**{'temperature.per_direction': True}))


# ------------------------------------ predicted τ ("temperature as uncertainty") ---
def test_predicted_temperature_starts_at_init_for_every_embedding():
  t = Temperature(mode='predicted', init=0.07, min=0.01, max=0.5, embed_dim=4,
                  rngs=nnx.Rngs(0))
  z = jax.random.normal(jax.random.key(0), (6, 4))
  np.testing.assert_allclose(np.asarray(t.of_embeddings(z)), 0.07, rtol=1e-6)
  assert float(t()) == pytest.approx(0.07)  # evaluation's one τ
  with pytest.raises(ValueError, match='min < init < max'):
    Temperature(mode='predicted', init=0.01, min=0.01, max=0.5, embed_dim=4)


PREDICTED = dict(init=0.2, min=0.05, max=0.9)


def _ref_predicted_clip(a, b, w, c):
  """CLIP's loss with τ_i = min + (max - min) σ(z_i · w + c) per anchor, float64."""
  tau = lambda z: PREDICTED['min'] + (PREDICTED['max'] - PREDICTED['min']) / (
      1 + np.exp(-(z @ w + c)))
  return ref_clip_rows(a, b, np.stack([tau(a), tau(b)], axis=1))


@pytest.mark.parametrize('impl', ['dense', 'blockwise'])
@pytest.mark.parametrize('devices', [1, 8])
def test_predicted_temperature_gradients_match_reference(devices, impl):
  """τ computed outside the loss's shard_map (as the step does) and passed
  split like the rows: the gradient reaches the head and, through τ, the
  embeddings."""
  rng = np.random.default_rng(1)
  a, b = unit_rows(rng, 16, 6), unit_rows(rng, 16, 6)
  w, c = rng.normal(size=6), -0.4
  graphdef, _ = nnx.split(Temperature(mode='predicted', embed_dim=6, **PREDICTED))
  axis = None if devices == 1 else 'data'
  options = losses.LossOptions(axis, impl, block_size=4)
  clip = lambda x, y, t: losses.clip_loss(x, y, t, options).loss
  if axis is not None:
    mesh = jax.make_mesh((devices,), ('data',), axis_types=(AxisType.Auto,))
    clip = jax.shard_map(clip, mesh=mesh, in_specs=(P(axis),) * 3, out_specs=P())

  def loss(x, y, kernel, bias):
    t = nnx.merge(graphdef, nnx.State({'head': {'kernel': nnx.Param(kernel[:, None]),
                                                'bias': nnx.Param(bias[None])}}))
    return clip(x, y, jnp.stack([t.of_embeddings(x), t.of_embeddings(y)], axis=1))

  args = [jnp.float32(v) for v in (a, b, w, c)]
  value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(*args)
  assert_close(value, _ref_predicted_clip(a, b, w, c), rtol=2e-6, what='loss')
  for got, want, what in zip(grads, finite_diff(_ref_predicted_clip, [a, b, w, c]),
                             ('a', 'b', 'head kernel', 'head bias')):
    assert_close(got, want, rtol=4e-6, what=what)
