"""Runs on Google Cloud Storage for real, against a local GCS server
(tests/gcs_server.py): a gs:// workdir and a gs:// TFDS data_dir, kill -9
and resume, SIGTERM, the corrupt-checkpoint fallback, and jaxcl eval,
export, report and sweep on a gs:// workdir, each against the same run on
the local disk."""

import csv
import json
import os
import signal
import subprocess

import jax
import numpy as np
import pytest
from etils import epath

from helpers import (
  DIGITS_CONFIG,
  RUN,
  RUN_STEPS,
  final_params,
  jaxcl,
  logged_steps,
  newest_checkpoint,
  preempt,
  run_until_checkpoint,
  tiny_overrides,
  upload_tree,
)
from jaxcl import files, report
from jaxcl.workdir import lock as lock_lib

# Whole runs against the server: minutes (left out by -m "not slow").
pytestmark = pytest.mark.slow

SIGTERM_S = 60  # answering SIGTERM: the step, its checkpoint uploaded, exit


def _same_params(workdir, reference) -> None:
  # Exact: the same program on the same 2 devices, from a checkpoint that
  # restores the state (data position and RNG included) bit for bit.
  step, params = final_params(workdir)
  assert step == RUN_STEPS
  jax.tree.map(np.testing.assert_array_equal, params, final_params(reference)[1])


def test_killed_run_with_corrupt_checkpoints_on_gcs_resumes_exactly(uninterrupted, gcs_dir,
                                                                     gcs_bucket, tmp_path):
  """A whole run on gs:// killed and resumed (over 60 s): the object store's
  half-written and corrupt checkpoints only exist after a real SIGKILL."""
  workdir, data_dir = gcs_dir, f'{gcs_bucket}/tfds'  # the first run prepares digits there
  data = [f'--config.dataset.data_dir={data_dir}']
  with open(tmp_path / 'err', 'w') as err:
    proc = run_until_checkpoint(workdir, 20, data, stdout=subprocess.DEVNULL, stderr=err)
  proc.send_signal(signal.SIGKILL)  # stopped at a checkpoint, killed: no clean-up at all
  proc.wait()
  assert (epath.Path(data_dir) / 'digits').is_dir()

  ckpts = workdir / files.CHECKPOINT_DIR
  complete = sorted(int(p.name) for p in ckpts.iterdir()
                    if p.name.isdigit() and (p / files.CHECKPOINT_DONE).exists())
  good, missing, truncated = complete[-3:]
  for path in files.files_under(ckpts / str(truncated)):
    if path.parent.name == 'd':  # tensorstore's data chunks
      path.write_bytes(path.read_bytes()[:7])
  (ckpts / str(missing) / 'state').rmtree()
  # A write killed midway: orbax writes in place on object stores, so a
  # folder without its commit marker.
  half_written = ckpts / str(truncated + 5)
  for path in files.files_under(ckpts / str(good)):
    if path.name != files.CHECKPOINT_DONE:
      target = half_written / str(path.relative_to(ckpts / str(good)))
      target.write_bytes(path.read_bytes())

  resumed = jaxcl('train', '--config', DIGITS_CONFIG, '--workdir', str(workdir), *data,
                  *tiny_overrides(), *RUN, devices=2)
  out = resumed.stdout
  assert f'took over the lock of a run that is gone: pid {proc.pid}' in out
  assert f'checkpoint {truncated} does not restore' in out
  assert f'checkpoint {missing} does not restore' in out
  assert f'resuming from step {good}' in out
  assert f'checkpoint {truncated + 5}' not in out  # never tried: incomplete
  aside = sorted(p.name.split('-')[0] for p in (workdir / files.UNRESTORABLE_DIR).iterdir())
  assert aside == sorted([str(missing), str(truncated)])  # kept for inspection
  assert not (workdir / lock_lib.LOCK_DIR).exists()
  _same_params(workdir, uninterrupted)
  # The metrics of both starts read as the uninterrupted run's one file.
  assert logged_steps(workdir) == logged_steps(uninterrupted)
  assert [r['step'] for r in report.read_metrics(workdir)] == [
      r['step'] for r in report.read_metrics(uninterrupted)]
  assert not (workdir / files.METRICS_FILE).exists()  # never appended to on an object store


def test_sigterm_on_gcs_checkpoints_exits_0_and_resumes_exactly(uninterrupted, gcs_dir,
                                                                 tmp_path):
  workdir = gcs_dir
  with open(tmp_path / 'out', 'w') as out, open(tmp_path / 'err', 'w') as err:
    proc = run_until_checkpoint(workdir, 10, stdout=out, stderr=err)  # returned stopped
  preempt(proc, SIGTERM_S, tmp_path / 'err')
  line = [row for row in (tmp_path / 'out').read_text().splitlines()
          if 'preempted (SIGTERM)' in row]
  assert line
  step = int(line[0].split('checkpoint of step ')[1].split()[0])
  assert newest_checkpoint(workdir) == step < RUN_STEPS
  resumed = jaxcl('train', '--config', DIGITS_CONFIG, '--workdir', str(workdir),
                  *tiny_overrides(), *RUN, devices=2)
  assert f'resuming from step {step}' in resumed.stdout
  _same_params(workdir, uninterrupted)


def test_eval_export_and_report_on_a_gcs_workdir(uninterrupted, gcs_dir, tmp_path):
  workdir = gcs_dir
  upload_tree(uninterrupted, workdir)  # the same run, on the bucket
  (workdir / files.EVAL_FILE).unlink()
  jaxcl('eval', '--workdir', str(workdir), devices=2)
  assert json.loads((workdir / files.EVAL_FILE).read_text()) == json.loads(
      (uninterrupted / files.EVAL_FILE).read_text())

  remote, local = workdir / 'out' / 'enc.jaxexport', tmp_path / 'enc.jaxexport'
  jaxcl('export', '--workdir', str(workdir), '--output', str(remote))
  jaxcl('export', '--workdir', str(uninterrupted), '--output', str(local))
  assert remote.read_bytes() == local.read_bytes()
  assert json.loads(epath.Path(f'{remote}.json').read_text()) == json.loads(
      open(f'{local}.json').read())

  proc = jaxcl('report', '--workdir', str(workdir))
  assert f'wrote {workdir}/{files.REPORT_FILE}' in proc.stdout
  page = (workdir / files.REPORT_FILE).read_text()
  plots = sorted(p.name for p in (workdir / report.REPORT_DIR).iterdir())
  assert plots and page.count('<img ') >= len(plots)


def test_sweep_on_gcs(gcs_dir):
  workdir = gcs_dir
  runs = ['--config.total_steps=6', '--config.log_every_steps=3',
          '--config.eval_every_steps=1000', '--config.checkpoint_every_steps=6']
  jaxcl('sweep', '--config', DIGITS_CONFIG, '--workdir', str(workdir),
        '--temperatures=0.1,learnable', *tiny_overrides(), *runs)
  rows = list(csv.DictReader((workdir / files.SWEEP_CSV).read_text().splitlines()))
  assert [r['tau'] for r in rows] == ['0.1', 'learnable']
  assert all(r['knn_top1'] != '' and r['loss'] != '' for r in rows)
  assert (workdir / files.SWEEP_PNG).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  for run in ('tau-0.1', 'tau-learnable'):
    assert json.loads((workdir / run / files.EVAL_FILE).read_text())['step'] == 6
  assert os.environ['STORAGE_EMULATOR_HOST'].startswith('http://127.0.0.1:')  # not a real bucket
