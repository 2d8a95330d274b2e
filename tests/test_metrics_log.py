"""The metrics log (jaxcl.metrics_log) on a local disk and on a real local
GCS server: what a run and its resumed runs wrote reads back as one file,
with the rows past each resume point replaced, in either layout."""

import json

import pytest
from etils import epath

from jaxcl import files, metrics_log, report


@pytest.fixture(params=['local', 'gcs'])
def workdir(request, tmp_path):
  if request.param == 'local':
    return epath.Path(tmp_path)
  return request.getfixturevalue('gcs_dir')


def _log(workdir, start_step: int, steps) -> None:
  """A run (re)started at `start_step` that logs `steps`, as train does:
  the run's start files first, then one row per step."""
  metrics_log.drop_rows_after(workdir, start_step)
  log = metrics_log.MetricsLog(workdir, start_step)
  for step in steps:
    log.write({'step': step, 'loss': 1.0 / (step + 1)})
  log.close()


def _steps(workdir) -> list[int]:
  return [row['step'] for row in report.read_metrics(workdir)]


def test_resumed_runs_read_as_one_log(workdir, monkeypatch):
  monkeypatch.setattr(metrics_log, 'PART_ROWS', 3)  # several parts per start on object stores
  assert not metrics_log.exists(workdir)
  _log(workdir, 0, range(0, 80, 10))  # killed after logging step 70
  assert metrics_log.exists(workdir)
  _log(workdir, 50, range(60, 100, 10))  # resumed from its checkpoint at 50
  _log(workdir, 90, [])  # resumed from 90, killed before it logged
  _log(workdir, 70, range(80, 120, 10))  # fell back to 70 (a corrupt checkpoint at 90)
  assert _steps(workdir) == list(range(0, 120, 10))
  if files.is_object_store(workdir):  # bounded parts, never a metrics.jsonl to append to
    parts = sorted(p.name for p in (workdir / files.METRICS_PARTS_DIR).iterdir())
    assert parts == ['0000-from-000000000-00000.jsonl', '0000-from-000000000-00001.jsonl',
                     '0000-from-000000000-00002.jsonl', '0001-from-000000050-00000.jsonl',
                     '0001-from-000000050-00001.jsonl', '0002-from-000000070-00000.jsonl',
                     '0002-from-000000070-00001.jsonl']
    assert not (workdir / files.METRICS_FILE).exists()
  else:
    rows = [json.loads(line) for line in (workdir / files.METRICS_FILE).read_text().splitlines()]
    assert [row['step'] for row in rows] == list(range(0, 120, 10))


def test_every_write_is_whole(workdir):
  # What a reader (or a run killed between writes) finds after each write is
  # the log up to that write, nothing more or less.
  log = metrics_log.MetricsLog(workdir, 0)
  for step in range(metrics_log.PART_ROWS + 2):
    log.write({'step': step})
    if step in (0, 1, metrics_log.PART_ROWS - 1, metrics_log.PART_ROWS, metrics_log.PART_ROWS + 1):
      assert _steps(workdir) == list(range(step + 1))
  log.close()


def test_lines_that_are_not_rows_are_skipped_and_counted(workdir):
  _log(workdir, 0, [0, 10])
  if files.is_object_store(workdir):
    part = next((workdir / files.METRICS_PARTS_DIR).iterdir())
    part.write_text(part.read_text() + '{"step": 2')  # an edit by hand
  else:
    path = workdir / files.METRICS_FILE
    path.write_text(path.read_text() + '{"step": 2')  # a full disk cut the last write short
  rows, skipped = report.read_metrics(workdir, with_skipped=True)
  assert [row['step'] for row in rows] == [0, 10] and skipped == 1
  _log(workdir, 10, [20])  # a resume drops it
  assert report.read_metrics(workdir, with_skipped=True)[1] == 0
  assert _steps(workdir) == [0, 10, 20]
