"""Faults caused for real: a workdir held by a live or a killed run,
corrupt and half-written checkpoints, a restore onto another mesh, a changed
global batch, a full or read-only disk."""

import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from helpers import (
  DIGITS_CONFIG,
  REPO,
  RUN,
  RUN_STEPS,
  assert_close,
  final_params,
  jaxcl,
  run_until_checkpoint,
  tiny_overrides,
  xla_flags,
)
from jaxcl import files
from jaxcl.workdir import lock as lock_lib, run_files
from test_data import make_bad_images

# Real killed, corrupted and full-disk runs: minutes (left out by -m "not slow").
pytestmark = pytest.mark.slow

END = RUN_STEPS  # the reference run's last step


# ------------------------------------------------------ batch history ---
def test_data_position_counts_records_of_each_segment():
  history = [[0, 32], [100, 64], [150, 16]]
  assert run_files.data_position(history, 150) == (32 * 100 + 64 * 50, 0)
  assert run_files.data_position(history, 170) == (32 * 100 + 64 * 50, 20)
  assert run_files.data_position([[0, 32]], 7) == (0, 7)


def test_batch_history_goes_back_with_a_fallback(tmp_path):
  (tmp_path / files.BATCH_HISTORY_FILE).write_text('[[0, 32], [100, 64]]')
  assert run_files.batch_history(tmp_path, 64, 150) == [[0, 32], [100, 64]]
  assert run_files.batch_history(tmp_path, 128, 150) == [[0, 32], [100, 64], [150, 128]]
  # Resumed from a checkpoint before the change: the change never happened.
  assert run_files.batch_history(tmp_path, 32, 90) == [[0, 32]]
  assert run_files.batch_history(tmp_path, 64, 100) == [[0, 32], [100, 64]]


# -------------------------------- killed run: stale lock, bad checkpoints ---
def _truncate_files(directory):
  for path in directory.rglob('*'):
    if path.is_file() and path.parent.name == 'd':  # tensorstore's data chunks
      with open(path, 'r+b') as f:
        f.truncate(7)


def test_killed_run_with_corrupt_checkpoints_resumes_from_a_good_one(uninterrupted, tmp_path):
  workdir = tmp_path / 'run'
  # Returned stopped (SIGSTOP): alive, holding the workdir, and not finishing meanwhile.
  proc = run_until_checkpoint(workdir, 20, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
  try:
    # A second run on the live workdir is refused, naming the holder.
    second = jaxcl('train', '--config', DIGITS_CONFIG, '--workdir', str(workdir),
                   *tiny_overrides(), *RUN, devices=2, check=False)
    assert second.returncode == 2
    assert f'in use by a live jaxcl run: pid {proc.pid} on host' in second.stderr.splitlines()[-1]
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()

  ckpts = workdir / 'checkpoints'
  steps = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
  assert len(steps) >= 3
  good, missing, truncated = steps[-3:]
  _truncate_files(ckpts / str(truncated))
  shutil.rmtree(ckpts / str(missing) / 'state')
  half_written = ckpts / f'{truncated + 5}.orbax-checkpoint-tmp-1'  # a killed write
  shutil.copytree(ckpts / str(good), half_written)

  resumed = jaxcl('train', '--config', DIGITS_CONFIG, '--workdir', str(workdir),
                  *tiny_overrides(), *RUN, devices=2)
  out = resumed.stdout
  assert f'took over the lock of a run that is gone: pid {proc.pid}' in out
  assert f'checkpoint {truncated} does not restore' in out
  assert f'checkpoint {missing} does not restore' in out
  assert f'resuming from step {good}' in out
  aside = sorted(p.name.split('-')[0] for p in (workdir / 'unrestorable_checkpoints').iterdir())
  assert aside == sorted([str(missing), str(truncated)])  # kept for inspection
  assert not half_written.exists()
  assert not (workdir / lock_lib.LOCK_DIR).exists()
  _, params_a = final_params(uninterrupted)
  step, params_b = final_params(workdir)
  assert step == END
  # Exact: the same program on the same 2 devices, from a checkpoint that
  # restores the state (data position and RNG included) bit for bit.
  jax.tree.map(np.testing.assert_array_equal, params_b, params_a)


def test_no_restorable_checkpoint_is_an_error_that_changes_nothing(uninterrupted, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(uninterrupted, workdir)
  for step in (END - 10, END - 5, END):
    shutil.rmtree(workdir / 'checkpoints' / str(step) / 'state')
  proc = jaxcl('train', '--config', DIGITS_CONFIG, '--workdir', str(workdir),
               *tiny_overrides(), *RUN, devices=2, check=False)
  assert proc.returncode == 1
  message = proc.stderr.strip().splitlines()[-1]
  assert message.startswith('jaxcl: no checkpoint in') and f'step {END - 10}:' in message
  assert 'Traceback' not in proc.stderr
  assert sorted(p.name for p in (workdir / 'checkpoints').iterdir()) == [
      str(END - 10), str(END - 5), str(END)]


# --------------------------------------------------------- elastic restore ---
def _copy_at_step(uninterrupted, workdir, step):
  shutil.copytree(uninterrupted, workdir)
  for path in (workdir / 'checkpoints').iterdir():
    if int(path.name) > step:
      shutil.rmtree(path)
  (workdir / 'eval.json').unlink()


def _losses(workdir):
  rows = [json.loads(line) for line in open(workdir / 'metrics.jsonl')]
  return {r['step']: r['loss'] for r in rows if 'loss' in r}


def test_restore_onto_another_mesh_continues_the_run(uninterrupted, tmp_path):
  """Written on 2 devices (data=2), resumed on 4 (data=2 x fsdp=2)."""
  workdir = tmp_path / 'run'
  _copy_at_step(uninterrupted, workdir, END - 10)
  proc = jaxcl('train', '--config', DIGITS_CONFIG, '--workdir', str(workdir), *tiny_overrides(),
               *RUN, '--config.mesh.data=2', '--config.mesh.fsdp=2', devices=4)
  assert "mesh {'data': 2, 'fsdp': 2}" in proc.stdout
  assert f'resuming from step {END - 10}' in proc.stdout
  # 10 steps on another mesh reorder the float32 sums (tests/helpers.py:
  # assert_close); measured worst on 2 x86 cores: losses 6e-8, parameters
  # 1.4e-6 (Adam amplifies the rounding of small gradient entries).
  ref, got = _losses(uninterrupted), _losses(workdir)
  assert_close([got[END - 5], got[END]], [ref[END - 5], ref[END]], rtol=5e-6, what='losses')
  _, params_a = final_params(uninterrupted)
  _, params_b = final_params(workdir)
  assert_close(params_b, params_a, rtol=5e-5, what='params')


def test_global_batch_changes_only_when_asked(uninterrupted, tmp_path):
  workdir = tmp_path / 'run'
  _copy_at_step(uninterrupted, workdir, END - 10)
  args = ['train', '--config', DIGITS_CONFIG, '--workdir', str(workdir),
          *tiny_overrides(batch_size=64), *RUN]
  refused = jaxcl(*args, devices=2, check=False)
  assert refused.returncode == 2
  assert '--allow_batch_change' in refused.stderr.splitlines()[-1]
  assert json.loads((workdir / files.BATCH_HISTORY_FILE).read_text()) == [[0, 32]]

  proc = jaxcl(*args, '--allow_batch_change', devices=2)
  assert f'global batch 32 -> 64 from step {END - 10}' in proc.stdout
  assert json.loads((workdir / files.BATCH_HISTORY_FILE).read_text()) == [[0, 32], [END - 10, 64]]
  assert sorted(_losses(workdir))[-1] == END


# ------------------------------------------------ full and read-only disks ---
DISK_SCRIPT = r'''
set -u
disk="$1"; shift
mkdir -p "$disk" && mount -t tmpfs -o size=900k tmpfs "$disk" || exit 90
"$@" > "$disk.out1" 2> "$disk.err1"; echo $? > "$disk.rc1"
ls "$disk/w/checkpoints" > "$disk.ls1"
mount -o remount,size=8m "$disk" || exit 91
"$@" > "$disk.out2" 2> "$disk.err2"; echo $? > "$disk.rc2"
mount -o remount,ro "$disk" || exit 92
"$@" > "$disk.out3" 2> "$disk.err3"; echo $? > "$disk.rc3"
'''


def test_full_disk_then_more_space_then_read_only(tmp_path):
  """In a private mount namespace: a 900 KB tmpfs fills up after a few
  checkpoints; then, with room, the same command resumes from the last
  complete one; then, read-only, a run is refused before it starts. Every
  checkpoint is kept: with keep_checkpoints=3 the disk filled or not
  depending on when orbax removed the oldest (a loaded machine's suite
  once ran all 40 steps)."""
  if shutil.which('unshare') is None:
    pytest.skip('needs unshare(1) for a private tmpfs')
  disk = tmp_path / 'disk'
  env = dict(os.environ, XLA_FLAGS=xla_flags(1))
  cmd = [sys.executable, '-m', 'jaxcl.cli', 'train', '--config', DIGITS_CONFIG, '--workdir',
         str(disk / 'w'), *tiny_overrides(), '--config.total_steps=40',
         '--config.checkpoint_every_steps=5', '--config.log_every_steps=5',
         '--config.eval_every_steps=1000', '--config.keep_checkpoints=100']
  proc = subprocess.run(['unshare', '-rm', 'bash', '-c', DISK_SCRIPT, 'disk', str(disk), *cmd],
                        env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
  if proc.returncode in (90, 91, 92) or 'unshare failed' in proc.stderr:
    pytest.skip(f'no private tmpfs here: {proc.stderr.strip()[-200:]}')
  read = lambda suffix: (tmp_path / f'disk.{suffix}').read_text()
  assert read('rc1').strip() == '1', read('err1')[-2000:]
  message = read('err1').strip().splitlines()[-1]
  # The checkpoint writer or the metric writer meets the full disk first.
  assert message.startswith(('jaxcl: writing a checkpoint in', 'jaxcl: cannot write to'))
  assert 'RESOURCE_EXHAUSTED' in message or 'No space left' in message
  assert 'Traceback' not in read('err1')
  complete = int(message.split('the last complete checkpoint is step ')[1].split(';')[0])
  assert complete >= 5
  assert any('orbax-checkpoint-tmp' in n for n in read('ls1').split())  # the unfinished one

  assert read('rc2').strip() == '0', read('err2')[-2000:]
  assert f'resuming from step {complete}' in read('out2')

  assert read('rc3').strip() == '2'
  assert read('err3').strip().splitlines()[-1].startswith('jaxcl: error: cannot write to workdir')


# ------------------------------------------------------- bad image files ---
def test_image_folder_run_reports_the_images_it_skipped(tmp_path):
  rng = np.random.default_rng(0)
  for split, n in (('train', 24), ('test', 8)):
    for cls in ('a', 'b'):
      (tmp_path / 'images' / split / cls).mkdir(parents=True)
      for i in range(n):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(
            tmp_path / 'images' / split / cls / f'{i}.png')
  bad = make_bad_images(tmp_path / 'images' / 'train' / 'b')
  workdir = tmp_path / 'run'
  proc = jaxcl('train', '--config', DIGITS_CONFIG, '--workdir', str(workdir), *tiny_overrides(),
               '--config.dataset.name=image_folder', f'--config.dataset.path={tmp_path}/images',
               '--config.dataset.image_size=16', '--config.dataset.mean=(0.5,0.5,0.5)',
               '--config.dataset.std=(0.5,0.5,0.5)', '--config.total_steps=2',
               '--config.eval.probe_steps=5')
  assert "3 image(s) of split 'train' skipped" in proc.stdout
  for name in bad:
    assert f'images/train/b/{name}: ' in proc.stdout
  listed = json.loads((workdir / files.SKIPPED_IMAGES_FILE).read_text())
  assert sorted(p.rsplit('/', 1)[1] for p, _ in listed['train']) == bad
  assert 'test' not in listed
