"""The CLI as a careless or hostile user meets it: it never writes over a
user's files or a run's own, never hands back stale or wrong results
silently, saves on Ctrl-C, and answers every mistake in one line (exact
texts in tests/messages.py)."""

import json
import shutil
import signal
import time

import numpy as np
import pytest
from PIL import Image

import messages
from helpers import (
  DIGITS_CONFIG,
  RUN_STEPS,
  jaxcl,
  jaxcl_each,
  logged_steps,
  run_until_checkpoint,
  tiny_overrides,
)
from jaxcl import config as config_lib, files
from jaxcl.trainer import guards

# Dozens of real CLI processes and runs (left out by -m "not slow").
pytestmark = pytest.mark.slow

STEPS = ['--config.total_steps=2', '--config.log_every_steps=1']


def one_error_line(proc, message: str, **paths):
  """The process exited 2 with exactly `message` (tests/messages.py) on stderr."""
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines() == [messages.expected(message, **paths)]


def listing(folder):
  return sorted((str(p.relative_to(folder)), p.stat().st_mtime_ns, p.stat().st_size)
                for p in folder.rglob('*'))


def copy_of(run, tmp_path):
  workdir = tmp_path / 'copy'
  shutil.copytree(run, workdir)
  return workdir


# --------------------------------------------------- no silent data loss ---
def test_train_refuses_a_folder_that_is_not_a_workdir(tmp_path):
  (tmp_path / 'eval.json').write_text('mine')
  (tmp_path / 'metrics.jsonl').write_text('mine too')
  before = listing(tmp_path)
  proc = jaxcl('train', '--config', DIGITS_CONFIG, '--workdir', str(tmp_path), *tiny_overrides(),
               *STEPS, check=False)
  one_error_line(proc, messages.CLI['not a workdir'], tmp=tmp_path)
  assert listing(tmp_path) == before


def test_export_never_lands_on_a_workdir_file_or_an_existing_file(uninterrupted, tmp_path):
  workdir = copy_of(uninterrupted, tmp_path)
  before = listing(workdir)
  mine = tmp_path / 'mine.bin'
  mine.write_text('keep me')
  cases = [(workdir / 'config', 'export onto config.json'),
           (workdir / 'eval', 'export onto eval.json'),
           (workdir / 'checkpoints' / 'x', 'export into checkpoints'),
           (tmp_path, 'export onto a folder'),
           ('/proc/x', 'export into /proc')]
  procs = jaxcl_each([['export', '--workdir', str(workdir), '--output', str(output), '--overwrite']
                      for output, _ in cases]
                     + [['export', '--workdir', str(workdir), '--output', str(mine)]])
  for proc, (_, message) in zip(procs, cases):
    one_error_line(proc, messages.CLI[message], workdir=workdir, tmp=tmp_path)
  one_error_line(procs[-1], messages.CLI['export onto an existing file'], tmp=tmp_path)
  assert listing(workdir) == before
  assert mine.read_text() == 'keep me' and not (tmp_path / 'mine.bin.json').exists()
  jaxcl('export', '--workdir', str(workdir), '--output', str(mine), '--overwrite')
  assert mine.read_bytes() != b'keep me'
  assert json.loads((tmp_path / 'mine.bin.json').read_text())['step'] == RUN_STEPS
  assert listing(workdir) == before
  assert not [p for p in tmp_path.iterdir() if p.name.endswith('.tmp')]


def test_a_failed_set_of_writes_leaves_nothing(tmp_path):
  (tmp_path / 'a').write_bytes(b'old')
  blocked = tmp_path / 'file'
  blocked.write_text('a file where a folder would be')
  with pytest.raises(OSError):
    files.write_all_atomically({tmp_path / 'a': b'new', blocked / 'b.json': b'{}'})
  assert (tmp_path / 'a').read_bytes() == b'old'
  assert sorted(p.name for p in tmp_path.iterdir()) == ['a', 'file']
  files.write_all_atomically({tmp_path / 'a': b'new', tmp_path / 'b.json': b'{}'})
  assert (tmp_path / 'a').read_bytes() == b'new' and (tmp_path / 'b.json').read_bytes() == b'{}'


@pytest.mark.parametrize('content, message', [
    ('{}', 'saved config empty'),
    ('[]', 'saved config a list'),
    ('{"batch_size": 32', 'saved config not JSON'),
])
def test_an_incomplete_saved_config_is_one_line_and_changes_nothing(uninterrupted, tmp_path,
                                                                    content, message):
  workdir = copy_of(uninterrupted, tmp_path)
  (workdir / 'config.json').write_text(content)
  before = listing(workdir)
  for proc in jaxcl_each([['eval', '--workdir', str(workdir)],
                          ['export', '--workdir', str(workdir), '--output', str(tmp_path / 'enc')],
                          ['train', '--config', DIGITS_CONFIG, '--workdir', str(workdir),
                           *tiny_overrides(), *STEPS]]):
    one_error_line(proc, messages.CLI[message], workdir=workdir)
  assert listing(workdir) == before


def test_saved_configs_are_completed_only_with_keys_added_later(uninterrupted, tmp_path):
  saved = json.loads((uninterrupted / 'config.json').read_text())
  workdir = tmp_path / 'old'
  workdir.mkdir()
  old = json.loads(json.dumps(saved))
  del old['nonfinite'], old['mesh']['fsdp'], old['loss']  # as a run of 2026-11-22 wrote it
  old['temperature'] = {k: v for k, v in old['temperature'].items()
                        if k not in ('warmup_steps', 'lr_multiplier', 'period')}
  (workdir / 'config.json').write_text(json.dumps(old))
  config = config_lib.load_saved(workdir)
  assert (config.nonfinite, config.mesh.fsdp, config.loss.impl, config.temperature.period) == (
      'stop', 1, 'dense', 0)
  assert config.augment.image_size == saved['augment']['image_size'] == 8  # not the default 16
  del old['augment']['image_size']
  old['batch_size'] = '32'
  (workdir / 'config.json').write_text(json.dumps(old))
  with pytest.raises(config_lib.ConfigError, match=r'lacks 1 key\(s\) \(augment.image_size\)'):
    config_lib.load_saved(workdir)
  old['augment']['image_size'] = 8
  (workdir / 'config.json').write_text(json.dumps(old))
  with pytest.raises(config_lib.ConfigError, match="wrong type .*batch_size is '32', where jaxcl "
                                                    'writes an integer'):
    config_lib.load_saved(workdir)


def test_eval_and_export_without_a_checkpoint_write_nothing(uninterrupted, tmp_path):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  shutil.copy(uninterrupted / 'config.json', workdir / 'config.json')
  export = ['export', '--workdir', str(workdir), '--output', str(tmp_path / 'enc')]
  for proc in jaxcl_each([['eval', '--workdir', str(workdir)], export]):
    one_error_line(proc, messages.CLI['no checkpoint'], workdir=workdir)
  assert [p.name for p in workdir.iterdir()] == ['config.json']
  assert sorted(p.name for p in tmp_path.iterdir()) == ['run']


# ------------------------------------------------------------------- Ctrl-C ---
def test_ctrl_c_saves_the_current_step_and_says_where_to_resume(tmp_path):
  workdir = tmp_path / 'run'
  with open(tmp_path / 'out', 'w') as out, open(tmp_path / 'err', 'w') as err:
    proc = run_until_checkpoint(workdir, 10, stdout=out, stderr=err)  # stopped (SIGSTOP)
  logged = logged_steps(workdir)[-1]
  try:
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGCONT)
    proc.wait(timeout=120)
  finally:
    proc.kill()
  out, err = (tmp_path / 'out').read_text(), (tmp_path / 'err').read_text()
  assert proc.returncode == 130, err[-2000:]
  assert 'Traceback' not in err and 'KeyboardInterrupt' not in err
  line = [row for row in out.splitlines() if 'interrupted (Ctrl-C)' in row]
  assert len(line) == 1, out
  step = int(line[0].split('checkpoint of step ')[1].split()[0])
  assert line[0] == (f'jaxcl: interrupted (Ctrl-C): checkpoint of step {step} saved in '
                     f'{workdir / "checkpoints"}; run the same command again to resume')
  assert 10 <= step <= logged + 5 and step < RUN_STEPS
  assert max(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit()) == step
  assert not (workdir / 'eval.json').exists() and not (workdir / 'jaxcl.lock').exists()


def test_a_second_ctrl_c_raises_at_once():
  before = signal.getsignal(signal.SIGINT)  # Python's, or SIG_IGN under a background shell
  preemption = guards.Preemption()
  try:
    preemption._on_signal(signal.SIGINT, None)
    assert preemption.reached(1) and preemption.exit_code == 130
    with pytest.raises(KeyboardInterrupt):
      preemption._on_signal(signal.SIGINT, None)
  finally:
    preemption.close()
  assert signal.getsignal(signal.SIGINT) is before  # the handler it found, given back


def test_a_second_ctrl_c_stops_the_cli_in_one_line(tmp_path):
  # The first Ctrl-C lands in a long evaluation, which the loop finishes
  # before it saves; the second, sent once the first was seen, must not wait.
  workdir = tmp_path / 'run'
  with open(tmp_path / 'out', 'w') as out, open(tmp_path / 'err', 'w') as err:
    proc = run_until_checkpoint(workdir, 5, ['--config.eval_every_steps=5',
                                             '--config.eval.probe_steps=100000'],
                                stdout=out, stderr=err)
  try:
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGCONT)
    deadline = time.monotonic() + 60
    while 'Ctrl-C again' not in (tmp_path / 'err').read_text() and time.monotonic() < deadline:
      time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
  finally:
    proc.kill()
  err = (tmp_path / 'err').read_text()
  assert proc.returncode == 130, err[-2000:]
  assert 'Traceback' not in err
  assert err.strip().splitlines()[-1] == messages.CLI['second ctrl-c']


# ------------------------------------------------- one line, not a traceback ---
CONFIG_FILES = {
    'config without get_config': 'x = 1\n',
    'config that raises': 'def get_config():\n  raise ValueError("no such recipe")\n',
    'config returning None': 'def get_config():\n  return None\n',
    'config calling sys.exit': 'import sys\n\ndef get_config():\n  sys.exit(3)\n',
    'config with a syntax error': 'def get_config(:\n',
}


@pytest.mark.parametrize('case', CONFIG_FILES)
def test_broken_config_files_are_one_line(case, tmp_path):
  path = tmp_path / 'config.py'
  path.write_text(CONFIG_FILES[case])
  for command in ('train', 'sweep'):
    proc = jaxcl(command, '--config', str(path), '--workdir', str(tmp_path / 'run'), check=False)
    one_error_line(proc, messages.CLI[case], tmp=tmp_path)
  assert not (tmp_path / 'run').exists()


def test_report_skips_unreadable_metrics_lines(uninterrupted, tmp_path):
  workdir = copy_of(uninterrupted, tmp_path)
  rows = (workdir / 'metrics.jsonl').read_text()
  (workdir / 'metrics.jsonl').write_text(
      rows + 'garbage\n[1, 2]\n{"loss": 1.0}\n{"step": "x", "loss": 2}\n{"step": 3, "loss"')
  proc = jaxcl('report', '--workdir', str(workdir))
  assert proc.stdout.strip() == (f'wrote {workdir / "report.html"} (5 unreadable line(s) of '
                                 f'metrics.jsonl skipped)')
  assert (workdir / 'report' / 'loss.png').exists()
  proc = jaxcl('report', '--workdir', str(tmp_path), check=False)
  one_error_line(proc, messages.CLI['report on a folder'], tmp=tmp_path)
  assert not (tmp_path / 'report.html').exists()


# ----------------------------------------------------------- help and flags ---
def test_help_exits_0_and_lists_the_flags():
  for args in (['--help'], ['-h'], ['help']):
    proc = jaxcl(*args)
    assert 'jaxcl train' in proc.stdout and 'jaxcl export' in proc.stdout
  for command, flag_names in [('train', ('--config', '--workdir', '--allow_batch_change')),
                              ('export', ('--workdir', '--output', '--overwrite')),
                              ('sweep', ('--config', '--temperatures')),
                              ('report', ('--workdir',))]:
    proc = jaxcl(command, '--help')
    assert proc.stdout.startswith(f'usage: jaxcl {command} ')
    for name in flag_names:
      assert f'  {name}: ' in proc.stdout, (command, name)


@pytest.mark.parametrize('case, args', [
    ('extra argument', ['eval', '--workdir', '{tmp}', 'extra']),
    ('flag of another command', ['report', '--workdir', '{tmp}', '--temperatures', '0.1']),
    ('override without a config', ['eval', '--workdir', '{tmp}', '--config.batch_size=8']),
    ('unknown flag', ['train', '--config', DIGITS_CONFIG, '--workdr', '{tmp}']),
    ('sweep without a config', ['sweep', '--workdir', '{tmp}']),
    ('export without an output', ['export', '--workdir', '{tmp}']),
    ('a tau twice', ['sweep', '--config', DIGITS_CONFIG, '--workdir', '{tmp}/sweep',
                     '--temperatures', '0.1,0.10']),
    ('unknown command', ['fly']),
    ('no command', []),
])
def test_bad_arguments_are_one_line(case, args, tmp_path):
  proc = jaxcl(*[a.replace('{tmp}', str(tmp_path)) for a in args], check=False)
  one_error_line(proc, messages.CLI[case], tmp=tmp_path)
  assert not (tmp_path / 'sweep').exists()


# ----------------------------------------------------------------- datasets ---
def _images(folder, n, seed=0):
  rng = np.random.default_rng(seed)
  folder.mkdir(parents=True, exist_ok=True)
  for i in range(n):
    Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(folder / f'{i}.png')


FOLDER = [*tiny_overrides(), '--config.dataset.name=image_folder', '--config.dataset.image_size=8',
          '--config.dataset.mean=(0.5,0.5,0.5)', '--config.dataset.std=(0.5,0.5,0.5)',
          '--config.batch_size=8', '--config.eval.batch_size=8', *STEPS]


def test_image_folder_without_test_trains_and_reports_empty_classes(tmp_path):
  root = tmp_path / 'images'
  _images(root / 'train' / 'cat', 5)
  _images(root / 'train' / 'dog', 5, seed=1)
  (root / 'train' / 'empty').mkdir()
  proc = jaxcl('train', '--config', DIGITS_CONFIG, '--workdir', str(tmp_path / 'run'), *FOLDER,
               f'--config.dataset.path={root}')
  assert (f'jaxcl: class folder {root}/train/empty has no images (its class has no examples in '
          f'that split)') in proc.stdout
  assert proc.stdout.strip().splitlines()[-1] == (
      f'final (step 2): no evaluation ({root}/test does not exist)  -> '
      f'{tmp_path / "run" / "eval.json"}')
  assert json.loads((tmp_path / 'run' / 'eval.json').read_text()) == {'step': 2}


def test_unlabeled_folder_says_why_nothing_is_evaluated(tmp_path):
  root = tmp_path / 'images'
  _images(root / 'train', 9)
  _images(root / 'test', 3, seed=1)
  proc = jaxcl('train', '--config', DIGITS_CONFIG, '--workdir', str(tmp_path / 'run'), *FOLDER,
               f'--config.dataset.path={root}')
  assert proc.stdout.strip().splitlines()[-1] == (
      f'final (step 2): no evaluation (the evaluation splits have no labels)  -> '
      f'{tmp_path / "run" / "eval.json"}')


def test_a_dataset_smaller_than_one_batch_is_refused(tmp_path):
  root = tmp_path / 'images'
  _images(root / 'train' / 'cat', 3)
  proc = jaxcl('train', '--config', DIGITS_CONFIG, '--workdir', str(tmp_path / 'run'), *FOLDER,
               f'--config.dataset.path={root}', check=False)
  one_error_line(proc, messages.CLI['dataset smaller than a batch'])
  assert not (tmp_path / 'run').exists()
