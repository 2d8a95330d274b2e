"""The step's memory on record: compiled_step.json for every run, a step
that cannot fit refused in one line before anything is written, and the
knobs (microbatches, remat) lowering the compiled step's temporaries."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import (
  CLIP_CONFIG,
  DIGITS_CONFIG,
  TINY_TWO_TOWER,
  assert_close,
  jaxcl,
  tiny_config,
  tiny_overrides,
)
from jaxcl import files, parallel
from jaxcl.trainer import experiment, step_memory, train_step


def _analysis(config):
  exp = experiment.setup(config, devices=jax.devices()[:1])
  return step_memory.analysis(train_step.compile_step(exp), exp)


def test_analysis_adds_up_and_counts_flops():
  record = _analysis(tiny_config(batch_size=64))
  parts = record['argument_bytes'] + record['output_bytes'] + record['temp_bytes']
  assert record['peak_bytes'] == parts - record['alias_bytes']
  assert record['temp_bytes'] > 0 and record['alias_bytes'] > 0  # the donated state
  assert record['flops_per_example'] > 0


@pytest.mark.slow  # too long for the quick loop (conftest.py: QUICK_TEST_S)
def test_microbatches_and_remat_lower_the_temporaries():
  two_tower = dict(TINY_TWO_TOWER, **{'model.vit.depth': '2', 'text.depth': '2',
                                      'model.vit.patch_size': '4'})
  records = {name: _analysis(tiny_config(CLIP_CONFIG, two_tower, batch_size=128, **extra))
             for name, extra in (('plain', {}), ('chunks', {'microbatch_size': 16}),
                                 ('remat', {'model.remat': 'full'}))}
  temp = {name: record['temp_bytes'] for name, record in records.items()}
  assert temp['chunks'] < temp['plain'] / 2, temp  # 8 chunks: one chunk's activations
  assert temp['remat'] < temp['plain'] / 2, temp
  # XLA counts a loop's body once; the FLOPs are the plain step's, lowered unrolled.
  flops = {name: record['flops_per_example'] for name, record in records.items()}
  assert flops['chunks'] == flops['remat'] == pytest.approx(flops['plain'], rel=0.03), flops


def test_activation_bytes_are_the_residuals_remat_drops():
  two_tower = dict(TINY_TWO_TOWER, **{'model.vit.depth': '2', 'text.depth': '2',
                                      'model.vit.patch_size': '4'})
  activations = {}
  for remat in ('none', 'full'):
    config = tiny_config(CLIP_CONFIG, two_tower, batch_size=64, **{'model.remat': remat})
    activations[remat] = step_memory.activation_bytes(
        experiment.setup(config, devices=jax.devices()[:1]))
  # remat full keeps at least each block's float32 input: [n, tokens, width] per block
  size = config.augment.image_size
  image_tokens = (size // 4) ** 2
  block_inputs = 2 * 64 * 4 * (image_tokens * 32 + 48 * 32)
  assert block_inputs <= activations['full'] < activations['none'] / 3, (block_inputs, activations)


@pytest.mark.slow
def test_every_run_records_its_compiled_step(uninterrupted):
  record = json.loads((uninterrupted / files.COMPILED_STEP_FILE).read_text())
  assert record['peak_bytes'] > record['temp_bytes'] > 0
  assert record['flops_per_example'] > 0
  assert record['batch_size'] > 0 and record['microbatch_size'] == 0
  assert record['device_kind'] == 'cpu' and record['device_memory_bytes'] is None


@pytest.mark.slow
def test_a_step_too_large_for_the_memory_stops_before_writing(tmp_path):
  workdir = tmp_path / 'run'
  result = jaxcl('train', '--config', DIGITS_CONFIG, '--workdir', str(workdir),
                 *tiny_overrides(), '--config.device_memory_gb=0.001', check=False)
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and 'the compiled step needs' in lines[0], result.stderr
  assert 'more than the 1.0 MiB of device_memory_gb' in lines[0]
  assert not workdir.exists()


# ------------------------------------------------- bfloat16 optimizer state ---
@pytest.mark.slow  # too long for the quick loop (conftest.py: QUICK_TEST_S)
@pytest.mark.parametrize('optimizer', ['adamw', pytest.param('sgd', marks=pytest.mark.slow)])
def test_bfloat16_first_moment_halves_it_and_steps_alike(optimizer):
  images = np.random.default_rng(0).integers(0, 256, (32, 8, 8, 1), dtype=np.uint8)
  results = {}
  for dtype in ('float32', 'bfloat16'):
    config = tiny_config(**{'optimizer.name': optimizer, 'optimizer.mu_dtype': dtype,
                            'optimizer.warmup_steps': 0, 'optimizer.learning_rate': 1e-2})
    exp = experiment.setup(config, devices=jax.devices()[:1])
    state, step = exp.init_state(), train_step.make_train_step(exp)
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim >= 2]
    assert moments and all(x.dtype == jnp.dtype(dtype) for x in moments
                           if x.dtype != jnp.float32), dtype
    batch = parallel.put_batch(exp.mesh, {'image': images})
    state, _ = step(state, batch)  # updates from the float32 moment, stored rounded
    before = jax.device_get(state.params)
    state, _ = step(state, batch)  # the same gradient again, updated from the stored moment
    update = jax.tree.map(lambda new, old: np.asarray(new) - old, jax.device_get(state.params),
                          before)
    results[dtype] = before, update, parallel.bytes_per_device(state.opt_state)
  (start, update, opt_bytes), (start_bf16, update_bf16, opt_bytes_bf16) = (
      results['float32'], results['bfloat16'])
  assert_close(start_bf16, start, rtol=0, what='params after the first step')
  # Adam holds mu and nu (mu halved: 3/4 of the state), SGD only its momentum (1/2).
  expected = 0.75 if optimizer == 'adamw' else 0.5
  assert opt_bytes_bf16 == pytest.approx(expected * opt_bytes, rel=0.02)
  # optax updates from the float32 moment and stores it rounded, so the second update
  # from the same parameters and gradient differs only by mu's rounding to bfloat16
  # (8 significant bits: 2^-8 of the update at most, Adam's normalization included).
  # Later steps differ more: near-zero gradients are noise that Adam scales to steps of
  # ±learning rate, so the runs' results are compared in benchmarks/RESULTS.md instead.
  differs = False
  for new, old in zip(jax.tree.leaves(update_bf16), jax.tree.leaves(update)):
    scale = np.max(np.abs(old))
    assert np.max(np.abs(new - old)) <= 2 ** -8 * scale + 1e-9
    differs |= bool(np.any(new != old))
  assert differs
