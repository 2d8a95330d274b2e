"""FSDP: with parameters and optimizer state split over an `fsdp` axis of 4,
each device holds about a quarter of them, and the step computes what the
data-parallel step computes."""

import jax
import numpy as np
import pytest

from helpers import assert_close, tiny_config
from jaxcl import parallel
from jaxcl.trainer import experiment, train_step

# FSDP's step reduces the gradients in other orders than data parallelism
# (tests/helpers.py: assert_close; as test_train.py's sharded-vs-one). Measured
# worst on 2 x86 cores: loss [1.3e-7], gradients [2.5e-6], parameters after 2
# Adam steps [2.6e-5: m/sqrt(v) amplifies the rounding of small gradient entries].
RTOL_LOSS = 5e-6
RTOL_GRAD = 3e-5
RTOL_PARAMS = 2e-4


def test_fsdp_spec():
  spec = parallel.fsdp_spec
  assert spec((3, 3, 64, 128), 4) == jax.sharding.PartitionSpec(None, None, None, 'fsdp')
  assert spec((128, 64), 4) == jax.sharding.PartitionSpec('fsdp')
  assert spec((130, 66), 4) == jax.sharding.PartitionSpec()  # nothing divides
  assert spec((64,), 4) == jax.sharding.PartitionSpec()  # small: replicated
  assert spec((128, 64), 1) == jax.sharding.PartitionSpec()


@pytest.fixture(scope='module')
def experiments():
  out = []
  for mesh in ({'data': 8, 'fsdp': 1}, {'data': 2, 'fsdp': 4}):
    config = tiny_config(**{'batch_size': 16, 'model.width': 32, 'model.head_hidden': 256,
                            'model.head_out': 64})
    config.mesh.update(mesh)
    out.append(experiment.setup(config, devices=jax.devices()[:8]))
  return out


def _images(seed):
  return np.random.default_rng(seed).integers(0, 256, (16, 8, 8, 1), dtype=np.uint8)


def test_fsdp_divides_parameter_and_optimizer_memory(experiments):
  sizes = []
  for exp in experiments:
    state = exp.init_state()
    sizes.append(parallel.bytes_per_device((state.params, state.opt_state)))
  dp, fsdp = sizes
  assert 3.5 < dp / fsdp <= 4.0, (dp, fsdp)


@pytest.mark.slow  # too long for the quick loop (conftest.py: QUICK_TEST_S)
def test_fsdp_step_equals_data_parallel(experiments):
  results = []
  for exp in experiments:
    state = exp.init_state()
    (loss, (metrics, *_)), grads = jax.jit(train_step.make_loss_and_grads(exp))(
        state, parallel.put_batch(exp.mesh, {'image': _images(0)}))
    step = train_step.make_train_step(exp)
    for i in range(2):
      state, _ = step(state, parallel.put_batch(exp.mesh, {'image': _images(i)}))
    results.append(jax.device_get((loss, grads, state.params)))
  (loss_dp, grads_dp, params_dp), (loss_fsdp, grads_fsdp, params_fsdp) = results
  assert_close(loss_fsdp, loss_dp, rtol=RTOL_LOSS, what='loss')
  assert_close(grads_fsdp, grads_dp, rtol=RTOL_GRAD, what='grads')
  assert_close(params_fsdp, params_dp, rtol=RTOL_PARAMS, what='params')


@pytest.mark.slow  # too long for the quick loop (conftest.py: QUICK_TEST_S)
def test_ring_loss_over_data_and_fsdp_axes_equals_dense():
  """The batch is split over both mesh axes, so the ring runs over both."""
  results = []
  for impl, mesh in (('dense', {'data': 8, 'fsdp': 1}), ('ring', {'data': 2, 'fsdp': 4})):
    config = tiny_config(batch_size=16)
    config.loss.update(impl=impl, block_size=3)
    config.mesh.update(mesh)
    exp = experiment.setup(config, devices=jax.devices()[:8])
    (loss, _), grads = jax.jit(train_step.make_loss_and_grads(exp))(
        exp.init_state(), parallel.put_batch(exp.mesh, {'image': _images(0)}))
    results.append(jax.device_get((loss, grads)))
  (loss_dense, grads_dense), (loss_ring, grads_ring) = results
  assert_close(loss_ring, loss_dense, rtol=RTOL_LOSS, what='loss')
  assert_close(grads_ring, grads_dense, rtol=RTOL_GRAD, what='grads')
