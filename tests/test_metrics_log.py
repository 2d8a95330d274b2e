"""The metrics log (jaxcl.workdir.metrics_log) on a local disk and on a real local
GCS server: what a run and its resumed runs wrote reads back as one file,
with the rows past each resume point replaced, in either layout; and the
TensorBoard files, which on object stores start anew every few records."""

import json
import struct

import pytest
from etils import epath

from jaxcl import files, report
from jaxcl.workdir import metric_writer, metrics_log


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


def _scalar_steps(folder) -> dict:
  """{event file name: [step of each scalar]} of the TensorBoard files in
  `folder` (TFRecords of Event protos: length, its CRC, the data, its CRC)."""
  from tensorboardX.proto import event_pb2
  found = {}
  for path in folder.iterdir():
    if path.name.startswith('events.out.tfevents'):
      data, i, steps = path.read_bytes(), 0, []
      while i < len(data):
        size, = struct.unpack('<Q', data[i:i + 8])
        event = event_pb2.Event.FromString(data[i + 12:i + 12 + size])
        steps += [event.step for _ in event.summary.value]
        i += 12 + size + 4
      found[path.name] = steps
  return found


def test_tensorboard_files_roll_on_object_stores_only(workdir, monkeypatch):
  monkeypatch.setattr(metric_writer, 'TB_RECORDS_PER_FILE', 3)
  writer = metric_writer.MetricWriter(workdir, total_steps=7, initial_step=0, enabled=True)
  for step in range(7):
    writer.write(step, {'loss': 1.0, 'temperature': 0.1})
  writer.close()
  found = _scalar_steps(workdir)
  if files.is_object_store(workdir):  # uploaded whole at each flush: 3 records per file at most
    assert sorted(map(sorted, found.values())) == [[0, 0, 1, 1, 2, 2], [3, 3, 4, 4, 5, 5], [6, 6]]
  else:
    assert list(found.values()) == [[0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6]]
  assert _steps(workdir) == list(range(7))
