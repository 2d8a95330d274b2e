"""profile_steps (a jax.profiler trace in the workdir) and wandb (every
metrics.jsonl record, in an offline run under the workdir): their checks,
one tiny run with both, and wandb never imported when it is off."""

import importlib.util
import json
import pathlib
import re
import struct
import subprocess
import sys

import pytest

from helpers import DIGITS_CONFIG, REPO, tiny_config
from jaxcl import config as config_lib, errors, files, train
from jaxcl.trainer import validation
from jaxcl.workdir.metric_writer import MetricWriter


def _validate(**values):
  config = config_lib.base_config()
  config.update_from_flattened_dict(values)
  validation.validate(config, num_devices=8, process_count=1, check_data=False)


@pytest.mark.parametrize('values, message', [
    ({'profile_steps': (3, 2)}, 'profile_steps must be () or (first, last) steps with '
                                '1 <= first <= last, got (3, 2)'),
    ({'profile_steps': (0, 2)}, 'profile_steps must be () or (first, last) steps with '
                                '1 <= first <= last, got (0, 2)'),
    ({'profile_steps': (2,)}, r'profile_steps must be \(\) or .*, got \(2,\)'),
    ({'profile_steps': (1.5, 2)}, r'profile_steps must be \(\) or .*, got \(1.5, 2\)'),
    ({'wandb.mode': 'cloud'}, "wandb.mode must be one of ('online', 'offline', 'disabled'), "
                              "got 'cloud'"),
])
def test_bad_values_are_one_line_errors(values, message):
  with pytest.raises(errors.ConfigError, match=message if '\\' in message else None) as e:
    _validate(**values)
  if '\\' not in message:
    assert str(e.value) == message


def test_good_values_validate():
  _validate(profile_steps=(5, 5), **{'wandb.project': 'p', 'wandb.mode': 'offline'})
  _validate(profile_steps=(1, 100))


def test_wandb_missing_fails_before_training(monkeypatch, tmp_path):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, 'find_spec',
                      lambda name, *a: None if name == 'wandb' else real(name, *a))
  _validate(**{'wandb.project': 'p'})  # eval and export of such a run need no wandb
  config = tiny_config(DIGITS_CONFIG)
  config.wandb.project = 'p'
  with pytest.raises(errors.ConfigError) as e:
    train.train_and_evaluate(config, tmp_path / 'run')
  assert str(e.value) == 'wandb.project is set but wandb is not installed: pip install wandb'
  assert not (tmp_path / 'run').exists()


def test_default_config_does_not_import_wandb():
  code = ('import sys, jaxcl.train, jaxcl.workdir.metric_writer, jaxcl.trainer.profiling; '
          'assert "wandb" not in sys.modules')
  subprocess.run([sys.executable, '-c', code], check=True, cwd=REPO, timeout=300)


def _wandb_env(monkeypatch, tmp_path):
  """Offline and quiet, with wandb's own settings and caches in `tmp_path`."""
  for name, value in (('WANDB_MODE', 'offline'), ('WANDB_SILENT', 'true'),
                      ('WANDB_CONFIG_DIR', tmp_path / 'wandb-config'),
                      ('WANDB_CACHE_DIR', tmp_path / 'wandb-cache'),
                      ('WANDB_DATA_DIR', tmp_path / 'wandb-data')):
    monkeypatch.setenv(name, str(value))
  monkeypatch.delenv('WANDB_DIR', raising=False)  # the run's files go to the workdir


def _wandb_records(path):
  """The protobuf records of an offline run's .wandb file: wandb's header
  (':W&B', magic, version), then LevelDB-log chunks in 32 KiB blocks."""
  from wandb.proto import wandb_internal_pb2
  data = pathlib.Path(path).read_bytes()
  assert data[:4] == b':W&B', data[:7]
  pos, parts, block = 7, [], 32768
  while pos + 7 <= len(data):
    if block - pos % block < 7:  # a block's tail too short for a chunk header: padding
      pos += block - pos % block
      continue
    _, length, kind = struct.unpack('<IHB', data[pos:pos + 7])
    parts.append(data[pos + 7:pos + 7 + length])
    pos += 7 + length
    if kind in (1, 4):  # FULL, LAST
      record = wandb_internal_pb2.Record()
      record.ParseFromString(b''.join(parts))
      parts = []
      yield record


def _offline_run(workdir):
  """(run record, {step: {key: value}}) of the one offline run in WORKDIR/wandb."""
  runs = sorted((workdir / files.WANDB_DIR).glob('offline-run-*'))
  assert len(runs) == 1, runs
  run, history = None, {}
  for record in _wandb_records(next(runs[0].glob('*.wandb'))):
    kind = record.WhichOneof('record_type')
    if kind == 'run':
      run = record.run
    elif kind == 'history':
      history.setdefault(record.history.step.num, {}).update(
          {item.key or '.'.join(item.nested_key): json.loads(item.value_json)
           for item in record.history.item})
  return run, history


@pytest.mark.slow  # a training run with its evaluation
def test_a_run_traces_its_steps_and_logs_to_wandb(tmp_path, monkeypatch):
  _wandb_env(monkeypatch, tmp_path)
  config = tiny_config(DIGITS_CONFIG, total_steps=4, log_every_steps=2, eval_every_steps=1000,
                       checkpoint_every_steps=1000, profile_steps=(2, 3))
  config.wandb.update(project='jaxcl-test', mode='offline')
  validation.validate(config)
  workdir = tmp_path / 'run'
  train.train_and_evaluate(config, workdir)

  traces = list((workdir / files.PROFILE_DIR / 'profile').glob('*/*.xplane.pb'))
  assert len(traces) == 1 and traces[0].stat().st_size > 0, traces
  records = [json.loads(line) for line in (workdir / files.METRICS_FILE).read_text().splitlines()]
  run, history = _offline_run(workdir)
  assert run.project == 'jaxcl-test' and run.display_name == 'simclr_digits'
  assert {item.key: json.loads(item.value_json) for item in run.config.update
          }['profile_steps'] == [2, 3]
  assert [r['step'] for r in records if 'loss' in r] == [2, 4]
  for record in records:  # every value, the evaluation's included
    logged = history[record['step']]
    for key, value in record.items():
      if key != 'step':
        assert logged[key] == value, (record['step'], key)
  assert 'knn_top1' in history[4]


def test_a_resumed_run_continues_its_wandb_run(tmp_path, monkeypatch):
  """The run id is made by the first start and kept in the workdir: each
  start writes an offline run of that id, which `wandb sync` appends to one
  run; another workdir gets another id."""
  _wandb_env(monkeypatch, tmp_path)
  settings = {'project': 'jaxcl-test', 'entity': '', 'name': '', 'mode': 'offline'}
  ids = {}
  for name, starts in (('run', (1, 2)), ('other', (1,))):
    workdir = tmp_path / name
    workdir.mkdir()
    for step in starts:
      writer = MetricWriter(workdir, total_steps=2, initial_step=step - 1, enabled=True,
                            wandb_config=settings, run_config={'name': ''})
      writer.write(step, {'loss': float(step)})
      writer.close()
      writer.close()  # a failure may close it again
    runs = sorted((workdir / files.WANDB_DIR).glob('offline-run-*'))
    # offline-run-DATE_TIME-ID, and -1, -2... for a second start within the same second
    ids[name] = {re.search(r'-(jaxcl-[0-9a-f]{16})(-\d+)?$', run.name).group(1) for run in runs}
    assert runs and len(ids[name]) == 1, runs  # two runs (or one: the same second), one id
  assert ids['run'] != ids['other'] and ids['run'].pop().startswith('jaxcl-')
