"""jaxcl sweep --search halving: the rungs against hand-worked schedules, the
choice at each rung, the held-out splits, and a real sweep killed and
resumed whose winner ends exactly as its uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from helpers import (
  CLIP_CONFIG,
  DIGITS_CONFIG,
  REPO,
  TINY_TWO_TOWER,
  final_params,
  jaxcl,
  tiny_config,
  tiny_overrides,
  xla_flags,
)
from jaxcl import errors, halving, methods, sweep
from jaxcl.data import sources
from jaxcl.trainer import trained


def _candidate_steps(rungs):
  """Steps trained in all: each rung's candidates from the previous rung's step."""
  return sum(count * (step - before) for (step, count), before in
             zip(rungs, [0] + [step for step, _ in rungs[:-1]]))


def test_schedule_against_hand_worked_rungs():
  # 6 candidates halved: 6 to T/8, 3 to T/4, 2 to T/2, 1 to T = 2.125 runs
  assert halving.schedule(6, 600) == [(75, 6), (150, 3), (300, 2), (600, 1)]
  assert _candidate_steps(halving.schedule(6, 600)) == 6 * 75 + 3 * 75 + 2 * 150 + 300 == 1275
  # 5 candidates: 3 rungs before the last (2^2 < 5 <= 2^3); steps rounded down
  assert halving.schedule(5, 100) == [(12, 5), (25, 3), (50, 2), (100, 1)]
  assert halving.schedule(9, 90, eta=3) == [(10, 9), (30, 3), (90, 1)]
  assert halving.schedule(4, 8) == [(2, 4), (4, 2), (8, 1)]
  assert halving.schedule(1, 50) == [(50, 1)]
  with pytest.raises(errors.ConfigError, match='too few'):
    halving.schedule(6, 7)  # the first rung would be step 0


def test_survivors_keep_the_best_in_candidate_order():
  candidates = ['0.05', '0.1', '0.5', 'learnable']
  scores = {'0.05': 0.7, '0.1': 0.9, '0.5': 0.8, 'learnable': 0.8}
  assert halving.survivors(scores, candidates, 2) == ['0.1', '0.5']  # a tie: the earlier
  assert halving.survivors(scores, candidates, 3) == ['0.1', '0.5', 'learnable']
  unscored = {'0.05': float('nan'), '0.1': 0.1, '0.5': None}
  assert halving.survivors(unscored, candidates, 2) == ['0.05', '0.1']  # nan and None: last
  assert halving.survivors(unscored, candidates, 1) == ['0.1']


def test_holdout_slices_the_eval_train_split():
  config = tiny_config()
  changes = halving.holdout_changes(config.dataset, 0.2)
  assert changes['dataset.eval_train_split'] == 'train[:80%]'
  assert changes['dataset.eval_test_split'] == 'train[80%:]'
  assert halving.holdout_changes(config.dataset, 0) == {}
  config.dataset.eval_train_split = 'train[:50%]'
  with pytest.raises(errors.ConfigError, match='cannot be sliced'):
    halving.holdout_changes(config.dataset, 0.2)
  with pytest.raises(errors.ConfigError, match='holdout'):
    halving.holdout_changes(tiny_config().dataset, 1.0)
  dataset = sources.Dataset(tiny_config().dataset)
  sizes = {split: len(dataset.split(split)[0])
           for split in ('train', 'train[:80%]', 'train[80%:]')}
  assert sizes['train[:80%]'] + sizes['train[80%:]'] == sizes['train'] == 1500


def test_a_monitor_is_a_score_the_methods_evaluation_writes():
  """The method says what its evaluation writes that can rank; held-out
  slices replace a two-tower's zero-shot and retrieval suite."""
  simclr = tiny_config()
  assert methods.get('simclr').rankable_metrics(simclr) == ('knn_top1', 'linear_top1')
  assert halving.monitor_metrics(simclr, 'linear_top1', {}) == ('linear_top1',)
  with pytest.raises(errors.ConfigError, match="simclr's evaluation writes no such score here; "
                                               'choose one of knn_top1, linear_top1$'):
    halving.monitor_metrics(simclr, 'zeroshot_top1', {})
  clip = tiny_config(CLIP_CONFIG, TINY_TWO_TOWER, **{'eval.zeroshot': "('cifar100',)",
                                                     'eval.retrieval': "('coco_captions',)"})
  rankable = methods.get('clip').rankable_metrics(clip)
  suite = ('zeroshot/cifar100/top5', 'retrieval/coco_captions/t2i_r10')
  assert {'zeroshot_top1', 'zeroshot_top5', 'i2t_r1', 't2i_r10', *suite} <= set(rankable)
  assert not {'zeroshot_ece', 'test_uniformity', 'tolerance', 'knn_top1'} & set(rankable)
  for monitor in ('t2i_r5', *suite):
    assert halving.monitor_metrics(clip, monitor, {}) == (monitor,)
  held_out = halving.holdout_changes(clip.dataset, 0.2)
  assert halving.monitor_metrics(clip, 't2i_r5', held_out) == ('t2i_r5',)
  for monitor in suite:
    with pytest.raises(errors.ConfigError, match='writes no such score here'):
      halving.monitor_metrics(clip, monitor, held_out)


# ------------------------------------------------------- a real halving sweep ---
CANDIDATES = '0.1,0.5,learnable'
TOTAL = 8  # 3 candidates: rungs at steps 2 (3 runs), 4 (2 runs), 8 (1 run)
RUN = [f'--config.total_steps={TOTAL}', '--config.log_every_steps=2',
       '--config.eval_every_steps=1000', '--config.checkpoint_every_steps=100']


def _sweep_args(workdir):
  return ['sweep', '--config', DIGITS_CONFIG, '--workdir', str(workdir), '--search', 'halving',
          f'--temperatures={CANDIDATES}', *tiny_overrides(), *RUN]


@pytest.fixture(scope='module')
def halved(tmp_path_factory):
  """A halving sweep killed (SIGKILL) once the second rung has begun, then
  run again to its end."""
  workdir = tmp_path_factory.mktemp('halving')
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=xla_flags(1))
  proc = subprocess.Popen([sys.executable, '-m', 'jaxcl.cli', *_sweep_args(workdir)], cwd=REPO,
                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline, killed_at = time.monotonic() + 600, None
  while proc.poll() is None and time.monotonic() < deadline:
    try:
      record = json.loads((workdir / 'sweep.json').read_text())
    except (OSError, ValueError):  # not there yet
      record = {}
    rungs = record.get('rungs') or [{'scores': {}}]  # the settings come first, then the rungs
    if len(rungs[0]['scores']) == 3:  # the first rung scored: the second begins
      proc.send_signal(signal.SIGKILL)
      killed_at = record
      break
    time.sleep(0.05)
  proc.wait()
  assert killed_at is not None, f'the sweep ended ({proc.returncode}) before it could be killed'
  done = jaxcl(*_sweep_args(workdir))
  return workdir, killed_at, done


@pytest.mark.slow  # a real sweep: 3 tiny runs, killed and resumed
def test_halving_records_every_rung_and_keeps_the_best(halved):
  workdir, killed_at, done = halved
  record = json.loads((workdir / 'sweep.json').read_text())
  assert [(r['step'], len(r['candidates'])) for r in record['rungs']] == [(2, 3), (4, 2), (8, 1)]
  first, second, last = record['rungs']
  assert killed_at['rungs'][0]['scores'] == first['scores']  # scored once, kept over the kill
  assert second['candidates'] == halving.survivors(first['scores'], first['candidates'], 2)
  assert last['candidates'] == halving.survivors(second['scores'], second['candidates'], 1)
  winner = record['winner']
  assert last['candidates'] == [winner] and f'chose tau-{winner}' in done.stdout
  assert record['steps_trained'] == 3 * 2 + 2 * 2 + 4 == 14
  rows = {row['tau']: row for row in record['rows']}
  for value in CANDIDATES.split(','):
    reached = max(r['step'] for r in record['rungs'] if value in r['candidates'])
    assert final_params(workdir / f'tau-{value}')[0] == reached, value
    assert rows[value]['steps'] == reached
  assert json.loads((workdir / f'tau-{winner}' / 'eval.json').read_text())['step'] == TOTAL
  assert 'knn_top1' in rows[winner] and rows[winner]['wall_time_s'] > 0
  # a recorded score is the monitor's: held-out kNN of that run's checkpoint
  loser = next(v for v in first['candidates'] if v not in second['candidates'])
  step, results = trained.evaluate_checkpoint(
      workdir / f'tau-{loser}', halving.holdout_changes(tiny_config().dataset, 0.2))
  assert step == 2 and results['knn_top1'] == first['scores'][loser]
  assert (workdir / 'sweep.png').read_bytes()[:4] == b'\x89PNG'


@pytest.mark.slow  # one more tiny run
def test_the_winner_ends_as_its_uninterrupted_run(halved, tmp_path):
  workdir, _, _ = halved
  winner = json.loads((workdir / 'sweep.json').read_text())['winner']
  fixed = [] if winner == 'learnable' else [
      '--config.temperature.mode=fixed', f'--config.temperature.init={winner}']
  plain = tmp_path / 'plain'
  jaxcl('train', '--config', DIGITS_CONFIG, '--workdir', str(plain), *tiny_overrides(), *RUN,
        *fixed)
  (step, params), (plain_step, plain_params) = (final_params(workdir / f'tau-{winner}'),
                                                final_params(plain))
  assert step == plain_step == TOTAL
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(plain_params)):
    np.testing.assert_array_equal(a, b)


def _files(folder) -> dict:
  """{path: bytes} of every file under `folder`."""
  return {p: p.read_bytes() for p in sorted(folder.rglob('*')) if p.is_file()}


@pytest.mark.slow
def test_a_halving_sweep_is_refused_to_other_settings_or_a_grid(halved):
  """(Was test_a_halving_sweep_is_not_resumed_with_other_candidates, whose
  case is the first below; issue 29 added the other settings and the grid.)"""
  workdir, _, _ = halved
  before = _files(workdir)
  other = _sweep_args(workdir)
  other[other.index(f'--temperatures={CANDIDATES}')] = '--temperatures=0.1,0.5'
  grid = [a for a in _sweep_args(workdir) if a not in ('--search', 'halving')]
  for args, message in (
      # A grid would replace the record and train each loser on from its rung.
      (grid, 'holds a halving sweep, not grid'),
      (grid + ['--config.total_steps=16'], 'holds a halving sweep, not grid'),
      (other, f'holds a sweep of --temperatures={CANDIDATES}, not 0.1,0.5')):
    result = jaxcl(*args, check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith(f'jaxcl: error: {workdir} {message}'), lines[0]
  assert _files(workdir) == before


# ---------------------------------------------------------------- Ctrl-C ---
@pytest.mark.slow  # two candidates to step 1, one of them to step 2
def test_ctrl_c_between_candidates_says_how_to_resume(tmp_path):
  workdir = tmp_path / 'sweep'
  args = ['sweep', '--config', DIGITS_CONFIG, '--workdir', str(workdir), '--search', 'halving',
          '--temperatures=0.1,0.5', *tiny_overrides(), '--config.total_steps=2', *RUN[1:]]
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1',
             XLA_FLAGS=xla_flags(1))
  with open(tmp_path / 'err', 'w') as err:
    proc = subprocess.Popen([sys.executable, '-m', 'jaxcl.cli', *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=err, text=True)
    try:
      for line in proc.stdout:  # the first candidate is scored: the second starts
        if line.startswith('jaxcl sweep: rung 1/2: tau-0.5'):
          proc.send_signal(signal.SIGINT)
          break
      proc.stdout.read()
      proc.wait(timeout=120)
    finally:
      proc.kill()
  lines = (tmp_path / 'err').read_text().strip().splitlines()
  assert proc.returncode == 130 and not any('Traceback' in line for line in lines), lines[-20:]
  assert lines[-1].endswith('run the same command again to resume')  # not "stopped (Ctrl-C)"
  assert lines[-1] == f'jaxcl: {sweep.INTERRUPTED}'
  scored = json.loads((workdir / 'sweep.json').read_text())['rungs'][0]['scores']
  assert list(scored) == ['0.1']
  done = jaxcl(*args)  # the same command resumes: tau-0.1's score is kept, not trained again
  assert 'rung 1/2: tau-0.1' not in done.stdout and 'rung 1/2: tau-0.5' in done.stdout
  record = json.loads((workdir / 'sweep.json').read_text())
  assert record['rungs'][0]['scores']['0.1'] == scored['0.1'] and 'winner' in record


def test_orbax_errors_of_a_save_cut_by_ctrl_c_are_not_printed():
  # A second Ctrl-C that lands in orbax's wait for its writer makes orbax log
  # the KeyboardInterrupt as an error; jaxcl's own line says it stopped.
  script = (
      'from absl import logging\n'
      'from jaxcl import cli\n'
      'cli._quiet()\n'
      'for error in (KeyboardInterrupt, ValueError):\n'
      '  try:\n'
      '    raise error()\n'
      '  except BaseException:\n'
      '    logging.exception("Save Finalize thread (save_finalize) failed: %s", error.__name__)\n')
  proc = subprocess.run([sys.executable, '-c', script], cwd=REPO, capture_output=True, text=True,
                        check=True, timeout=120)
  lines = proc.stderr.strip().splitlines()  # the other error, in one line, is kept
  assert len(lines) == 1 and lines[0].endswith('Save Finalize thread (save_finalize) failed: '
                                               'ValueError'), lines
