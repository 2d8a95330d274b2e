"""Microbatches (jaxcl.trainer.grad_cache): with LayerNorm towers the chunked step is
the whole-batch step, on 1 and 8 devices and with every loss; with SimCLR's
batch norm it is the exact gradient of the loss of embeddings computed chunk
by chunk, as documented; bad chunk sizes are config errors."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import (
  CLIP_CONFIG,
  SIGLIP_CONFIG,
  TINY_TWO_TOWER,
  assert_close,
  tiny_config,
  two_tower_batch,
  without_key_bias,
)
from jaxcl import config as config_lib, errors, losses, parallel
from jaxcl.data import augment
from jaxcl.trainer import experiment, grad_cache, train_step, validation

# Chunked and whole-batch steps sum the same float32 terms in other orders
# (tests/helpers.py: assert_close), as sharded vs one device does
# (test_two_tower.py's tolerances, whose measured worst they share).
RTOL_LOSS = 1e-5
RTOL_GRAD = 3e-5
RTOL_PARAMS = 1e-4


def test_chunks_take_each_shards_own_rows():
  n, chunks, shards = 24, 3, 4
  x = np.arange(n)
  chunked = np.asarray(grad_cache.to_chunks(jnp.asarray(x), chunks, shards))
  m = n // (chunks * shards)
  for c in range(chunks):
    for d in range(shards):  # shard d's part of chunk c: rows [c m, (c+1) m) of its block
      block = x[d * n // shards:(d + 1) * n // shards]
      np.testing.assert_array_equal(chunked[c, d * m:(d + 1) * m], block[c * m:(c + 1) * m])
  np.testing.assert_array_equal(grad_cache.from_chunks(jnp.asarray(chunked), shards), x)
  images = jnp.arange(24 * 2 * 3).reshape(24, 2, 3)
  np.testing.assert_array_equal(
      grad_cache.from_chunks(grad_cache.to_chunks(images, 2, 4), 4), images)


def _setup(config_file, devices, microbatch_size, impl='dense', naflex=False, **extra):
  config = tiny_config(config_file, TINY_TWO_TOWER, batch_size=16,
                       microbatch_size=microbatch_size, **extra)
  if naflex:  # images as patches on their own grids, {'patches', 'grid'}: chunked alike
    config.dataset.update(resolution='naflex', max_patches=(6,))
  config.loss.update(impl=impl, block_size=3)
  return experiment.setup(config, devices=jax.devices()[:devices])


# (config, devices, loss, microbatch size): 4 chunks on 1 device, 2 on 8.
CASES = [(CLIP_CONFIG, 1, 'dense', 4, False),
         pytest.param(CLIP_CONFIG, 8, 'blockwise', 8, False, marks=pytest.mark.slow),
         pytest.param(SIGLIP_CONFIG, 8, 'ring', 8, False, marks=pytest.mark.slow),
         pytest.param(SIGLIP_CONFIG, 1, 'dense', 2, False, marks=pytest.mark.slow),
         pytest.param(SIGLIP_CONFIG, 8, 'dense', 8, True, marks=pytest.mark.slow)]


@pytest.mark.slow  # too long for the quick loop (conftest.py: QUICK_TEST_S)
@pytest.mark.parametrize('config_file,devices,impl,microbatch_size,naflex', CASES,
                         ids=lambda v: os.path.basename(v) if isinstance(v, str) else None)
def test_microbatched_step_equals_whole_batch(config_file, devices, impl, microbatch_size,
                                              naflex):
  results = []
  for m in (0, microbatch_size):
    exp = _setup(config_file, devices, m, impl, naflex)
    state = exp.init_state()
    batch = parallel.put_batch(exp.mesh, two_tower_batch(exp, 16))
    (loss, (metrics, _, tau, *_)), grads = jax.jit(train_step.make_loss_and_grads(exp))(
        state, batch)
    step = train_step.make_train_step(exp)
    for i in range(3):
      state, step_metrics = step(state, parallel.put_batch(exp.mesh,
                                                           two_tower_batch(exp, 16, seed=i)))
    results.append(jax.device_get((loss, metrics, grads, state.params, step_metrics)))
  (loss, metrics, grads, params, last), (loss_c, metrics_c, grads_c, params_c, last_c) = results
  assert float(loss) > 0 and len(jax.tree.leaves(grads)) > 10
  assert_close(loss_c, loss, rtol=RTOL_LOSS, what='loss')
  assert_close(metrics_c, metrics, rtol=RTOL_LOSS, what='metrics')
  assert_close(grads_c, grads, rtol=RTOL_GRAD, what='grads')
  assert abs(float(grads['temperature']['log_tau'][...])) > 0  # τ's gradient comes from pass 2
  assert_close(without_key_bias(params_c), without_key_bias(params), rtol=RTOL_PARAMS,
               what='params after 3 steps')
  for key in ('loss', 'grad_norm', 'temperature'):
    assert_close(last_c[key], last[key], rtol=RTOL_LOSS * 10, what=key)


def test_frozen_tower_gets_no_gradient_in_chunks():
  exp = _setup(CLIP_CONFIG, 1, 4, **{'optimizer.frozen': "('image_encoder/.*',)"})
  (_, _), grads = jax.jit(train_step.make_loss_and_grads(exp))(
      exp.init_state(), parallel.put_batch(exp.mesh, two_tower_batch(exp, 16)))
  assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(grads['image_encoder']))
  assert any(np.any(np.asarray(g)) for g in jax.tree.leaves(grads['text_encoder']))


# ------------------------------------------------------ SimCLR's batch norm ---
def _simclr(devices, microbatch_size):
  config = tiny_config(batch_size=16, microbatch_size=microbatch_size)
  return experiment.setup(config, devices=jax.devices()[:devices])


def _per_chunk_reference(exp, state, images, microbatch_size, shards):
  """The loss, gradients and running statistics the docs promise, written
  without grad_cache: each chunk's rows (shard d's rows [c m, (c+1) m) of
  its block) through the train-mode model in turn, one NT-Xent over all."""
  n = len(images)
  chunks = n // microbatch_size
  rows = np.arange(n).reshape(shards, chunks, -1).transpose(1, 0, 2).reshape(chunks, -1)
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  keys = augment.view_keys(key, 2, n)

  def loss_fn(params):
    stats, a, b = state.batch_stats, [], []
    for chunk in rows:
      model = nnx.merge(exp.train_graphdef, params, stats, copy=True)
      inputs = exp.method.model_inputs(keys[chunk], {'image': images[chunk]}, exp.config)
      za, zb = exp.method.embeddings(model, inputs)
      stats = nnx.state(model, nnx.BatchStat)
      a.append(za)
      b.append(zb)
    tau = nnx.merge(exp.train_graphdef, params, stats).temperature(state.step)
    loss = losses.nt_xent(jnp.concatenate(a), jnp.concatenate(b), tau).loss
    return loss, stats

  (loss, stats), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(state.params)
  return jax.device_get((loss, grads, stats))


@pytest.mark.slow  # too long for the quick loop (conftest.py: QUICK_TEST_S)
@pytest.mark.parametrize('devices,microbatch_size',
                         [(1, 4), pytest.param(8, 8, marks=pytest.mark.slow)])
def test_simclr_chunks_normalize_with_their_own_statistics(devices, microbatch_size):
  exp = _simclr(devices, microbatch_size)
  state = exp.init_state()
  images = np.random.default_rng(0).integers(0, 256, (16, 8, 8, 1), dtype=np.uint8)
  (loss, (_, stats, *_)), grads = jax.device_get(jax.jit(train_step.make_loss_and_grads(exp))(
      state, parallel.put_batch(exp.mesh, {'image': images})))
  on_one_device = jax.tree.map(jnp.asarray, jax.device_get(state))
  ref_loss, ref_grads, ref_stats = _per_chunk_reference(_simclr(1, 0), on_one_device, images,
                                                        microbatch_size, devices)
  assert_close(loss, ref_loss, rtol=RTOL_LOSS, what='loss')
  assert_close(grads, ref_grads, rtol=RTOL_GRAD, what='grads')
  assert_close(stats, ref_stats, rtol=RTOL_LOSS, what='running statistics')
  # ...which is not the whole-batch step: batch norm's statistics differ.
  (whole, _), _ = jax.jit(train_step.make_loss_and_grads(_simclr(1, 0)))(
      on_one_device, {'image': images})
  assert abs(float(whole) - float(loss)) > 1e-4


# ---------------------------------------------------------------- validation ---
@pytest.mark.parametrize('batch,microbatch,devices,match', [
    (16, 5, 1, 'microbatch_size 5 must divide batch_size 16'),
    (16, 4, 8, 'be a multiple of the 8 data shards'),
    (16, -1, 1, 'microbatch_size must be an integer >= 0'),
])
def test_bad_microbatch_sizes_are_config_errors(batch, microbatch, devices, match):
  config = config_lib.base_config()
  config.update(batch_size=batch, microbatch_size=microbatch)
  with pytest.raises(errors.ConfigError, match=match):
    validation.validate(config, num_devices=devices, process_count=1, check_data=False)
  config.microbatch_size = 8 if devices == 8 else 4
  validation.validate(config, num_devices=devices, process_count=1, check_data=False)


@pytest.mark.slow
def test_microbatches_with_fsdp_equal_the_whole_batch():
  """The gradient sum lives where FSDP keeps the parameters; the step is the same."""
  results = []
  for m in (0, 8):
    config = tiny_config(CLIP_CONFIG, TINY_TWO_TOWER, batch_size=16, microbatch_size=m)
    config.mesh.update(data=2, fsdp=4)
    exp = experiment.setup(config, devices=jax.devices()[:8])
    split = [s for s in jax.tree.leaves(exp.state_sharding.params) if 'fsdp' in s.spec]
    assert len(split) >= 2  # the token embedding and the patch embedding, at least
    (loss, _), grads = jax.jit(train_step.make_loss_and_grads(exp))(
        exp.init_state(), parallel.put_batch(exp.mesh, two_tower_batch(exp, 16)))
    results.append(jax.device_get((loss, grads)))
  (loss, grads), (loss_c, grads_c) = results
  assert_close(loss_c, loss, rtol=RTOL_LOSS, what='loss')
  assert_close(grads_c, grads, rtol=RTOL_GRAD, what='grads')
