"""The tiled losses (impl='blockwise' and 'ring') against the dense ones:
values, metrics and gradients (embeddings, temperature, SigLIP bias), on one
device and sharded over 8, with batch sizes that are not multiples of the
block size."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from helpers import assert_close, tiny_config
from jaxcl import losses, parallel
from jaxcl.trainer import experiment, train_step

LOSSES = {
    'info_nce': losses.info_nce,
    'nt_xent': losses.nt_xent,
    'clip': losses.clip_loss,
    'siglip': losses.siglip_loss,
}


# Tolerances (tests/helpers.py: assert_close; measured worst on 2 x86 cores
# in brackets). The loss and its metrics: sums over <= 80 logits per row and
# 40 rows, reordered by tiles and devices [2.8e-7]. The gradients add the
# reduction over rows [3.0e-7]. The train step puts the encoder around the
# loss, on 8 devices' shapes vs 1 [metrics 1.9e-7; grads 2.7e-6].
RTOL_LOSS = 2e-6
RTOL_GRAD = 5e-6
RTOL_STEP = 5e-6
RTOL_STEP_GRAD = 3e-5


def _embeddings(n, d, seed):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(2, n, d))
  return jnp.asarray(x / np.linalg.norm(x, axis=-1, keepdims=True), jnp.float32)


def _loss_fn(name, impl, block_size, mesh=None):
  """(a, b, τ, bias) -> (loss, metrics), dense or tiled, on `mesh` if given."""
  fn = LOSSES[name]

  def local(a, b, tau, bias, axis_name=None):
    options = losses.LossOptions(axis_name, impl, block_size)
    if name == 'siglip':
      return fn(a, b, tau, bias, options)[:2]
    return fn(a, b, tau, options)[:2]

  if mesh is None:
    return local
  return jax.shard_map(functools.partial(local, axis_name='data'), mesh=mesh,
                       in_specs=(P('data'), P('data'), P(), P()), out_specs=(P(), P()))


def _value_and_grads(fn, a, b, tau, bias):
  (loss, metrics), grads = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3), has_aux=True))(
      a, b, tau, bias)
  return jax.device_get((loss, metrics, grads))


@pytest.fixture(scope='module')
def mesh():
  return jax.make_mesh((8,), ('data',), axis_types=(AxisType.Auto,), devices=jax.devices()[:8])


@pytest.mark.parametrize('name', LOSSES)
@pytest.mark.parametrize('impl', ['blockwise', 'ring'])
@pytest.mark.parametrize('sharded', [False, True], ids=['one device', '8 devices'])
def test_tiled_equals_dense(name, impl, sharded, mesh):
  # 40 rows: 5 per device; blocks of 3 leave a partial block everywhere.
  a, b = _embeddings(40, 16, seed=len(name))
  tau, bias = 0.1, -3.0
  ref_loss, ref_metrics, ref_grads = _value_and_grads(_loss_fn(name, 'dense', 0), a, b, tau,
                                                      bias)
  loss, metrics, grads = _value_and_grads(
      _loss_fn(name, impl, 3, mesh if sharded else None), a, b, tau, bias)
  # Tiles reorder the sums over 40 columns (and, sharded, over 8 devices).
  assert_close(loss, ref_loss, rtol=RTOL_LOSS, what='loss')
  assert_close(metrics, ref_metrics, rtol=RTOL_LOSS, what='metrics')
  for got, want, what in zip(grads, ref_grads, ('a', 'b', 'temperature', 'bias')):
    assert_close(got, want, rtol=RTOL_GRAD, what=what)
  assert abs(ref_grads[2]) > 1e-3  # the temperature gradient is there, and matched
  if name == 'siglip':
    assert abs(ref_grads[3]) > 1e-3


def test_block_larger_than_the_batch_and_bf16():
  a, b = _embeddings(6, 8, seed=1)
  dense = _value_and_grads(_loss_fn('clip', 'dense', 0), a, b, 0.07, 0.0)
  tiled = _value_and_grads(_loss_fn('clip', 'blockwise', 1024), a, b, 0.07, 0.0)
  assert_close(tiled[0], dense[0], rtol=RTOL_LOSS)
  a16, b16 = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
  dense16 = _loss_fn('clip', 'dense', 0)(a16, b16, 0.07, 0.0)[0]
  tiled16 = _loss_fn('clip', 'blockwise', 4)(a16, b16, 0.07, 0.0)[0]
  assert tiled16.dtype == jnp.float32
  assert_close(tiled16, dense16, rtol=RTOL_LOSS)


@pytest.mark.parametrize('name', LOSSES)
def test_auto_is_dense_up_to_its_size_and_tiled_above(name, monkeypatch):
  """impl='auto' computes the logits whole while a device's anchors x
  candidates fit AUTO_DENSE_MAX_LOGITS, in tiles (a custom_vjp) above."""
  a, b = _embeddings(8, 4, seed=3)
  anchors = 16 * 16 if name == 'nt_xent' else 8 * 8  # NT-Xent: 2n anchors x 2N columns

  def tiled(limit):
    monkeypatch.setattr(losses.contrastive, 'AUTO_DENSE_MAX_LOGITS', limit)
    jaxpr = str(jax.make_jaxpr(_loss_fn(name, 'auto', 4))(a, b, 0.1, -3.0))
    return 'custom_vjp_call' in jaxpr

  assert not tiled(anchors) and tiled(anchors - 1)
  assert losses.LossOptions().impl == 'auto'


def test_unknown_impl_is_refused():
  with pytest.raises(ValueError, match='impl must be one of'):
    losses.LossOptions(impl='chunky')


@pytest.mark.slow  # too long for the quick loop (conftest.py: QUICK_TEST_S)
def test_train_step_with_ring_loss_equals_dense_single_device():
  results = []
  for impl, devices in (('dense', 1), ('ring', 8)):
    config = tiny_config(batch_size=16)
    config.loss.update(impl=impl, block_size=3)
    exp = experiment.setup(config, devices=jax.devices()[:devices])
    images = np.random.default_rng(0).integers(0, 256, (16, 8, 8, 1), dtype=np.uint8)
    (loss, (metrics, *_)), grads = jax.jit(train_step.make_loss_and_grads(exp))(
        exp.init_state(), parallel.put_batch(exp.mesh, {'image': images}))
    results.append(jax.device_get((loss, metrics, grads)))
  (loss1, m1, g1), (loss8, m8, g8) = results
  # The encoder's forward and backward, summed over 8 devices vs 1: RTOL_STEP.
  assert_close(loss8, loss1, rtol=RTOL_STEP, what='loss')
  del m1['uniformity'], m8['uniformity']  # a per-device estimate: tests/test_diagnostics.py
  assert_close(m8, m1, rtol=RTOL_STEP, what='metrics')
  assert_close(g8, g1, rtol=RTOL_STEP_GRAD, what='grads')


# ------------------------------------------ what the sharded step communicates ---
_COLLECTIVE = re.compile(r'=\s*(\(.*?\)|\S+)\s+(all-gather|collective-permute|all-to-all)'
                         r'(?:-start)?\(')
_SHAPE = re.compile(r'(f32|bf16|s32|u32|u8)\[([\d,]*)\]')


def _moved_arrays(hlo: str):
  """(op, dtype, shape) of every all-gather / collective-permute / all-to-all."""
  moved = []
  for match in _COLLECTIVE.finditer(hlo):
    for dtype, dims in _SHAPE.findall(match.group(1)):
      moved.append((match.group(2), dtype, tuple(int(x) for x in dims.split(',') if x)))
  return moved


@pytest.mark.slow  # too long for the quick loop (conftest.py: QUICK_TEST_S)
@pytest.mark.parametrize('impl', ['dense', pytest.param('ring', marks=pytest.mark.slow)])
def test_sharded_step_moves_only_embeddings(impl):
  """Between devices the loss moves embeddings (and their ids), nothing the
  size of an image or an activation: the compiled HLO's gathers and permutes
  are all [rows, embedding size] (or [rows] ids)."""
  config = tiny_config(batch_size=16)
  config.loss.update(impl=impl, block_size=4)
  exp = experiment.setup(config, devices=jax.devices()[:8])
  batch = parallel.put_batch(exp.mesh, {'image': np.zeros((16, 8, 8, 1), np.uint8)})
  hlo = train_step.make_train_step(exp).lower(exp.init_state(), batch).compile().as_text()
  moved = _moved_arrays(hlo)
  assert moved, 'the loss must communicate embeddings'
  dim, n = config.model.head_out, 16
  for op, dtype, shape in moved:
    if impl == 'dense':  # both views' embeddings of the global batch, gathered once
      assert (op, dtype, shape) == ('all-gather', 'f32', (2 * n, dim)), (op, dtype, shape)
    else:  # this device's 2 x 2 anchors (and their ids) passed around the ring
      assert op == 'collective-permute' and shape in ((2 * n // 8, dim), (2 * n // 8,)), (
          op, dtype, shape)
