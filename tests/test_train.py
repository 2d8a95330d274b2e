"""The sharded train step against one device; SIGTERM-and-resume against an
uninterrupted run; total_steps=0; eval recomputation."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from helpers import (
  DIGITS_CONFIG,
  RUN,
  RUN_STEPS,
  assert_close,
  final_params,
  jaxcl,
  logged_steps,
  newest_checkpoint,
  preempt,
  run_until_checkpoint,
  tiny_config,
  tiny_overrides,
)
from jaxcl import parallel
from jaxcl.trainer import checkpoints, experiment, train_step, trained

# ------------------------------------------------ sharded == single device ---
# One step's loss, metrics and gradients on 8 devices against 1 differ by
# float32 rounding of reordered sums (tests/helpers.py: assert_close): the
# loss over the batch's logits, the gradients through the encoder's forward
# and backward (batch norm's statistics, the sums over the batch), the
# parameters after a few optimizer steps on those gradients.
# Measured worst on 2 x86 cores in brackets: loss and metrics [1.1e-7], batch
# norm statistics [4.1e-7], gradients [2.7e-6], parameters after 3 Adam steps
# [4.4e-6: m/sqrt(v) amplifies the rounding of gradient entries much smaller
# than their leaf's largest].
RTOL_LOSS = 5e-6
RTOL_GRAD = 3e-5
RTOL_PARAMS = 1e-4


@pytest.fixture(scope='module')
def experiments():
  config = tiny_config(batch_size=16)
  single = experiment.setup(config, devices=jax.devices()[:1])
  sharded = experiment.setup(config, devices=jax.devices()[:8])
  assert dict(sharded.mesh.shape) == {'data': 8, 'fsdp': 1}
  return single, sharded


def _images(n, seed=0):
  return np.random.default_rng(seed).integers(0, 256, size=(n, 8, 8, 1), dtype=np.uint8)


def test_sharded_loss_and_grads_equal_single_device(experiments):
  results = []
  for exp in experiments:
    state = exp.init_state()
    fn = jax.jit(train_step.make_loss_and_grads(exp))
    (loss, (metrics, batch_stats, *_)), grads = fn(
        state, parallel.put_batch(exp.mesh, {'image': _images(16)}))
    results.append(jax.device_get((loss, metrics, batch_stats, grads)))
  (loss1, m1, bs1, g1), (loss8, m8, bs8, g8) = results
  assert_close(loss8, loss1, rtol=RTOL_LOSS, what='loss')
  assert float(loss1) > 0
  del m1['uniformity'], m8['uniformity']  # a per-device estimate: tests/test_diagnostics.py
  assert_close(m8, m1, rtol=RTOL_LOSS, what='metrics')
  # Global batch norm: the running statistics agree too.
  assert_close(bs8, bs1, rtol=RTOL_LOSS, what='batch_stats')
  assert len(jax.tree.leaves(g1)) == len(jax.tree.leaves(g8)) > 5
  assert_close(g8, g1, rtol=RTOL_GRAD, what='grads')
  # The temperature receives a gradient.
  assert abs(float(g1['temperature']['log_tau'][...])) > 0


@pytest.fixture(scope='module')
def train_steps(experiments):
  return [train_step.make_train_step(exp) for exp in experiments]


def test_sharded_train_steps_equal_single_device(experiments, train_steps):
  finals = []
  for exp, step in zip(experiments, train_steps):
    state = exp.init_state()
    for i in range(3):
      state, metrics = step(state, parallel.put_batch(exp.mesh, {'image': _images(16, seed=i)}))
    finals.append(jax.device_get((state.params, metrics)))
  (p1, m1), (p8, m8) = finals
  assert_close(p8, p1, rtol=RTOL_PARAMS, what='params')
  assert_close(m8['loss'], m1['loss'], rtol=RTOL_LOSS, what='loss')


def test_temperature_is_clamped_after_update(experiments, train_steps):
  exp = experiments[0]
  state = exp.init_state()
  log_tau = state.params['temperature']['log_tau']
  log_tau[...] = np.log(exp.config.temperature.min) - 1.0  # pushed out of range
  state, metrics = train_steps[0](state, parallel.put_batch(exp.mesh, {'image': _images(16)}))
  tau = float(np.exp(state.params['temperature']['log_tau'][...]))
  assert tau == pytest.approx(exp.config.temperature.min, rel=1e-5)


# ------------------------------------------ the reference run (conftest) ---
# SIGKILL and resume: tests/test_reliability.py (with corrupt checkpoints).
@pytest.mark.slow  # a whole CLI run
def test_outputs_of_a_run(uninterrupted):
  rows = [json.loads(line) for line in open(uninterrupted / 'metrics.jsonl')]
  train_rows = [r for r in rows if 'loss' in r]
  for key in ('step', 'loss', 'temperature', 'inv_temperature', 'examples_per_sec',
              'contrastive_top1', 'grad_norm', 'step_time', 'data_wait_time', 'compute_time',
              'flops_per_example', 'tflops_per_device', 'positive_prob', 'entropy',
              'effective_negatives', 'hardest_negative_share', 'alignment', 'uniformity'):
    assert key in train_rows[0]
  assert [r['step'] for r in train_rows] == list(range(5, RUN_STEPS + 1, 5))
  assert train_rows[-1]['loss'] < train_rows[0]['loss']
  assert any(p.startswith('events.out.tfevents') for p in os.listdir(uninterrupted))
  results = json.loads((uninterrupted / 'eval.json').read_text())
  assert 0 <= results['knn_top1'] <= 1 and 0 <= results['linear_top1'] <= 1


@pytest.mark.slow  # a whole CLI run
def test_eval_recomputes_eval_json(uninterrupted, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(uninterrupted, workdir)  # eval writes eval.json; the shared run stays as it is
  before = json.loads((workdir / 'eval.json').read_text())
  proc = jaxcl('eval', '--workdir', str(workdir), devices=2)
  after = json.loads((workdir / 'eval.json').read_text())
  # Exact: the same program on the same 2 devices, from the same checkpoint.
  assert after['step'] == before['step'] == RUN_STEPS
  assert after['knn_top1'] == pytest.approx(before['knn_top1'], abs=1e-9)
  assert after['linear_top1'] == pytest.approx(before['linear_top1'], abs=1e-9)
  assert json.loads(proc.stdout)['knn_top1'] == after['knn_top1']


@pytest.mark.slow  # a whole CLI run
def test_zero_steps_evaluates_random_encoder(tmp_path):
  jaxcl('train', '--config', DIGITS_CONFIG, '--workdir', str(tmp_path), *tiny_overrides(),
        '--config.total_steps=0')
  results = json.loads((tmp_path / 'eval.json').read_text())
  assert results['step'] == 0
  assert 0.2 < results['knn_top1'] <= 1 and 0.2 < results['linear_top1'] <= 1


# How long a run may take to answer SIGTERM: finish its step, write that
# checkpoint, exit (measured: about 1 s on 2 busy cores; 10x margin on a
# machine 3x slower).
SIGTERM_S = 30


@pytest.mark.slow
def test_sigterm_checkpoints_exits_0_and_resumes_exactly(uninterrupted, tmp_path):
  """Preemption for real: SIGTERM mid-run -> the step's checkpoint, exit 0;
  the same command again ends where the uninterrupted run ends."""
  workdir = tmp_path / 'preempted'
  # Files, not pipes: nothing reads a pipe while the test waits for the run.
  with open(tmp_path / 'out', 'w') as out, open(tmp_path / 'err', 'w') as err:
    proc = run_until_checkpoint(workdir, 10, stdout=out, stderr=err)  # returned stopped
  # Stopped at most log_every_steps past its last logged step: SIGTERM comes mid-run.
  logged = max(logged_steps(workdir), default=0)
  if logged > RUN_STEPS - 10:
    proc.kill()
  assert logged <= RUN_STEPS - 10, f'stopped too late to preempt: step {logged} logged'
  preempt(proc, SIGTERM_S, tmp_path / 'err')
  out = (tmp_path / 'out').read_text()
  line = [row for row in out.splitlines() if 'preempted (SIGTERM)' in row]
  assert line, out
  step = int(line[0].split('checkpoint of step ')[1].split()[0])
  assert 10 <= step <= logged + 5 < RUN_STEPS
  assert newest_checkpoint(workdir) == step
  assert not (workdir / 'eval.json').exists()

  resumed = jaxcl('train', '--config', DIGITS_CONFIG, '--workdir', str(workdir),
                  *tiny_overrides(), *RUN, devices=2)
  assert f'resuming from step {step}' in resumed.stdout
  _, params_a = final_params(uninterrupted)
  _, params_b = final_params(workdir)
  # Exact: the same program on the same 2 devices, from a checkpoint that
  # restores the state (data position and RNG included) bit for bit.
  jax.tree.map(np.testing.assert_array_equal, params_b, params_a)


# ------------------------------------------------------------- NaN and Inf ---
EXPLODE = ['--config.total_steps=8', '--config.log_every_steps=1', '--config.eval.probe_steps=10',
           '--config.optimizer.learning_rate=1e35', '--config.optimizer.warmup_steps=0']


@pytest.mark.slow
def test_nonfinite_step_stops_without_saving_it(tmp_path):
  # Step 1's update (learning rate 1e35) makes step 2's loss NaN.
  proc = jaxcl('train', '--config', DIGITS_CONFIG, '--workdir', str(tmp_path), *tiny_overrides(),
               *EXPLODE, '--config.checkpoint_every_steps=1', check=False)
  assert proc.returncode == 1
  message = proc.stderr.strip().splitlines()[-1]
  assert 'step 2: loss nan' in message and 'the last good checkpoint is step 1' in message
  assert 'Traceback' not in proc.stderr
  assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir() if p.name.isdigit()) == ['1']


@pytest.mark.slow
def test_nonfinite_steps_skipped_leave_the_state(tmp_path):
  jaxcl('train', '--config', DIGITS_CONFIG, '--workdir', str(tmp_path), *tiny_overrides(),
        *EXPLODE, '--config.checkpoint_every_steps=1', '--config.keep_checkpoints=10',
        '--config.nonfinite=skip')
  rows = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
  assert [r['skipped'] for r in rows if 'skipped' in r] == [0.0] + [1.0] * 7
  exp, last = trained.load_trained(str(tmp_path))
  manager = checkpoints.checkpoint_manager(str(tmp_path), exp.config.keep_checkpoints)
  first = checkpoints.restore_checkpoint(manager, exp.abstract_state(), step=1)
  manager.close()
  assert int(last.step) == 8
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(last.params),
               jax.device_get(first.params))
