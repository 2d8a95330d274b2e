"""Per-example state (TrainState.per_example; loss.estimator=sogclr): the
batch carries each row's dataset index, the step writes exactly the batch's
rows (the averages the loss computed, on 1 and 8 devices and in
microbatches), the tables survive a kill and resume exactly, and a restore
onto another number of devices keeps every example's row."""

import dataclasses
import json
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import (
  CLIP_CONFIG,
  DIGITS_CONFIG,
  RUN,
  SIGLIP_CONFIG,
  TINY_TWO_TOWER,
  assert_close,
  jaxcl,
  run_until_checkpoint,
  tiny_config,
  tiny_overrides,
  without_key_bias,
)
from jaxcl import data, errors, losses, parallel
from jaxcl.data import augment
from jaxcl.losses import estimators
from jaxcl.text import tokenizers
from jaxcl.trainer import synthetic, train_step, trained, validation

# 1 and 8 devices, whole batch and microbatches sum the same float32 terms in
# other orders (tests/test_grad_cache.py's tolerances).
RTOL = 1e-4


def test_records_carry_their_dataset_index():
  config = tiny_config(DIGITS_CONFIG)
  source, _ = data.Dataset(config.dataset).training()
  batches = data.train_iterator(source, batch_size=32, seed=3)
  for _ in range(2):
    batch = next(batches)
    assert batch['index'].dtype == np.int32 and len(set(batch['index'].tolist())) == 32
    for image, index in zip(batch['image'], batch['index']):
      np.testing.assert_array_equal(image, source[int(index)]['image'])
  sample = data.caption_sampler(tokenizers.build_tokenizer(tiny_config(CLIP_CONFIG).text))
  record = {'image': np.zeros((2, 2, 3), np.uint8), 'label': 1, 'index': np.int32(7),
            'captions': ['a red circle']}
  assert sample(record, np.random.default_rng(0))['index'] == 7


def test_every_epoch_carries_the_source_rows():
  """grain passes a repeated dataset's functions the stream position (epoch *
  rows + row); the index must stay the row, epoch after epoch, or the tables
  are read clamped and never written after the first epoch."""
  source = [{'image': np.full((1,), row, np.uint8), 'label': 0} for row in range(10)]
  batches = data.train_iterator(source, batch_size=5, seed=0)
  stream = np.concatenate([next(batches)['index'] for _ in range(8)])  # 4 epochs
  for epoch in stream.reshape(4, 10):
    assert sorted(epoch.tolist()) == list(range(10))
  assert len({tuple(e) for e in stream.reshape(4, 10)}) > 1  # each epoch shuffled anew
  batches = data.train_iterator(source, batch_size=5, seed=0, start_record=35)
  np.testing.assert_array_equal(next(batches)['index'], stream[35:40])


def _clip(devices, microbatch_size=0, examples=40, temperature='learnable'):
  config = tiny_config(CLIP_CONFIG, TINY_TWO_TOWER, batch_size=16,
                       microbatch_size=microbatch_size)
  config.loss.update(estimator='sogclr', sogclr_gamma=0.5)
  config.temperature.update(mode=temperature, min=0.05, max=0.7, individual_eta=0.05)
  validation.validate(config, check_data=False)
  exp = synthetic.setup(config, devices=jax.devices()[:devices])
  return dataclasses.replace(exp, train_examples=examples)


STEP_ROWS = [np.arange(16), np.arange(8, 24), np.r_[30:40, 0:6]]  # rows 24-29 never read


def _three_steps(exp):
  step = train_step.make_train_step(exp)
  state, batches = exp.init_state(), []
  for i, rows in enumerate(STEP_ROWS):
    batch = dict(synthetic.batch(exp, 16, seed=i), index=rows.astype(np.int32))
    batches.append((jax.device_get(state), batch))  # a host copy: the step donates the state
    state, metrics = step(state, parallel.put_batch(exp.mesh, batch))
  return jax.device_get(state), metrics, batches


def _reference_rows(exp, state, batch):
  """The batch's rows after the step, from their embeddings with
  losses.clip_loss on one device: what the step must write."""
  _, encode = train_step.make_towers(exp)
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  images_text = {k: jnp.asarray(v) for k, v in batch.items() if k != 'index'}
  (a, b), _ = encode(state.params, state.batch_stats,
                     (images_text, augment.view_keys(key, 1, 16)))
  old = {k: jnp.asarray(v)[batch['index']] for k, v in state.per_example.items()}
  estimator = estimators.from_rows(old, exp.config.loss, exp.config.temperature)
  # an individual state brings each anchor's τ; the model's is unused then
  tau = 1.0 if 'tau' in old else jnp.exp(state.params['temperature']['log_tau'][...])
  new = losses.clip_loss(a, b, tau, state=estimator).state
  return jax.tree.map(np.asarray, new.rows())


@pytest.mark.slow  # too long for the quick loop (conftest.py: QUICK_TEST_S)
@pytest.mark.parametrize('temperature', ['learnable', 'individual'])
def test_step_writes_the_batch_rows(temperature):
  exp = _clip(1, temperature=temperature)
  state, metrics, batches = _three_steps(exp)
  table = np.asarray(state.per_example['log_u'])
  assert table.shape == (40, 2) and np.isfinite(metrics['sogclr_log_u'])
  assert np.all(np.isneginf(table[24:30]))
  assert np.all(np.isfinite(np.delete(table, range(24, 30), 0)))
  for i, (before, batch) in enumerate(batches):  # each step's rows hold what its loss computed
    after = batches[i + 1][0] if i + 1 < len(batches) else state
    got = {k: np.asarray(v)[batch['index']] for k, v in after.per_example.items()}
    assert_close(got, _reference_rows(exp, before, batch), rtol=RTOL, what=f'rows of step {i}')
  if temperature == 'individual':
    tau = np.asarray(state.per_example['tau'])
    assert np.all(tau[24:30] == np.float32(exp.config.temperature.init))  # never in a batch
    assert len(np.unique(tau[:24])) > 10 and np.all((tau >= 0.05) & (tau <= 0.7))
    assert metrics['temperature_values'].shape == (32,)
    assert metrics['temperature_p10'] <= metrics['temperature_p50'] <= metrics['temperature_p90']


@pytest.mark.slow
@pytest.mark.parametrize('temperature', ['learnable', 'predicted'])
def test_tables_on_8_devices_and_in_microbatches_equal_1_device(temperature):
  """(predicted: each anchor's τ from its embedding, whose gradient reaches
  the towers through the microbatches' cached embedding gradients too)"""
  (table, params), *others = [
      jax.tree.map(np.asarray, (state.per_example['log_u'], without_key_bias(state.params)))
      for state, _, _ in (_three_steps(_clip(d, m, temperature=temperature))
                          for d, m in ((1, 0), (8, 0), (8, 8)))]
  if temperature == 'predicted':  # the head learned: τ is no longer init for every input
    assert np.any(np.asarray(params['temperature']['head']['kernel'][...]) != 0)
  seen = np.isfinite(table)
  for other_table, other_params in others:
    np.testing.assert_array_equal(np.isfinite(other_table), seen)
    assert_close(other_table[seen], table[seen], rtol=RTOL, what='log u')
    assert_close(other_params, params, rtol=RTOL, what='params after 3 steps')


def test_sogclr_is_refused_where_it_cannot_run():
  config = tiny_config(SIGLIP_CONFIG, TINY_TWO_TOWER)
  config.loss.estimator = 'sogclr'
  with pytest.raises(errors.ConfigError, match='softmax denominator; siglip has none'):
    validation.validate(config, check_data=False)
  config = tiny_config(DIGITS_CONFIG)
  config.loss.update(estimator='sogclr', sogclr_gamma=0.0)
  with pytest.raises(errors.ConfigError, match=r'loss.sogclr_gamma must be a number in \(0, 1\]'):
    validation.validate(config, check_data=False)
  config = tiny_config(DIGITS_CONFIG)
  config.temperature.mode = 'individual'
  with pytest.raises(errors.ConfigError, match='set loss.estimator=sogclr'):
    validation.validate(config, check_data=False)


# iSogCLR: both per-example tables (u, and each example's τ with its moment).
INDIVIDUAL = ['--config.loss.estimator=sogclr', '--config.loss.impl=blockwise',
              '--config.loss.block_size=8', '--config.temperature.mode=individual',
              '--config.temperature.min=0.05', '--config.temperature.max=0.7']
RESUMED_STEPS = 20


def _tables(workdir):
  """(step, per-example tables) of the newest checkpoint, restored onto
  this process's 8 devices."""
  _, state = trained.load_trained(str(workdir))
  return int(state.step), jax.tree.map(np.asarray, jax.device_get(state.per_example))


def _summary_kinds(workdir) -> dict:
  """{tag: [kind of each value]} of a run's TensorBoard event files (TFRecords
  of Event protos: length, its CRC, the data, its CRC)."""
  from tensorboardX.proto import event_pb2
  kinds = {}
  for path in workdir.glob('events.out.tfevents*'):
    data, i = path.read_bytes(), 0
    while i < len(data):
      size, = struct.unpack('<Q', data[i:i + 8])
      for value in event_pb2.Event.FromString(data[i + 12:i + 12 + size]).summary.value:
        kinds.setdefault(value.tag, []).append(value.WhichOneof('value'))
      i += 12 + size + 4
  return kinds


@pytest.mark.slow
def test_tables_survive_kill_and_resume_and_another_device_count(tmp_path):
  """Whole runs (over 60 s): a SIGKILL mid-run, the resume and a device
  count change are what the per-example tables must survive, and only real
  processes and real checkpoints show it."""
  run = [*tiny_overrides(), *RUN[1:], f'--config.total_steps={RESUMED_STEPS}', *INDIVIDUAL]
  straight = tmp_path / 'straight'
  jaxcl('train', '--config', DIGITS_CONFIG, '--workdir', str(straight), *run, devices=2)
  killed = tmp_path / 'killed'
  proc = run_until_checkpoint(killed, 10, overrides=run)
  proc.kill()
  proc.wait()
  jaxcl('train', '--config', DIGITS_CONFIG, '--workdir', str(killed), *run, devices=2)
  step, tables = _tables(straight)  # restored onto 8 devices: 1,500 rows padded to 1,504
  examples = len(data.Dataset(tiny_config(DIGITS_CONFIG).dataset).training()[0])
  assert step == RESUMED_STEPS and tables['log_u'].shape == (-(-examples // 8) * 8, 2)
  seen = np.isfinite(tables['log_u'][:examples]).all(axis=1)
  assert seen.sum() == RESUMED_STEPS * 32 < examples  # within the first epoch: each row once
  assert np.all(tables['tau'][:examples][~seen] == np.float32(0.2))  # the config's init
  assert len(np.unique(tables['tau'][:examples][seen])) > 100
  jax.tree.map(np.testing.assert_array_equal, _tables(killed)[1], tables)
  # The batch's τ: quantiles in metrics.jsonl and report's plot, a TensorBoard histogram.
  logged = [json.loads(line) for line in (straight / 'metrics.jsonl').read_text().splitlines()]
  assert all(r['temperature_p10'] <= r['temperature_p90'] for r in logged if 'loss' in r)
  assert _summary_kinds(straight)['temperature_values'] == ['histo'] * (RESUMED_STEPS // 5)
  jaxcl('report', '--workdir', str(straight))
  assert (straight / 'report' / 'temperature.png').exists()
  # Another device count resumes from the 2-device checkpoint: 4 more steps
  # fill 4 batches of new rows and leave every other row as it was.
  jaxcl('train', '--config', DIGITS_CONFIG, '--workdir', str(straight),
        *[a for a in run if 'total_steps' not in a], '--config.total_steps=24', devices=8)
  step, longer = _tables(straight)
  assert step == 24 and np.isfinite(longer['log_u'][:examples]).all(axis=1).sum() == 24 * 32
  for name in ('log_u', 'tau', 'tau_moment'):
    np.testing.assert_array_equal(longer[name][:examples][seen], tables[name][:examples][seen])
