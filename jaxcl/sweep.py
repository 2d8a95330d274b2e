"""`jaxcl sweep`: one run per temperature, compared in a table and a plot.

  jaxcl sweep --config CONFIG --workdir DIR --temperatures 0.05,0.1,0.2,0.5,1.0,learnable

Each value trains the config with temperature.mode=fixed at that τ (which,
as temperature.init, must lie in [temperature.min, temperature.max]; or, for
`learnable`, the config's learnable τ from its init) in DIR/tau-VALUE, one
after the other, and evaluates it. A run whose eval.json is there already, for
exactly this config, is not trained again, so an interrupted sweep resumes
where it stopped (and a killed run resumes from its checkpoint). The sweep
owns its folder: sweep.json records, before the first run trains, its search
(grid, or jaxcl.halving's), candidates, options and the config keys that
change what the runs compute (all but those that say how or where they run);
once a run trained under them, a rerun with anything else is refused (exit 2)
with one line naming the difference (a sweep refused before anything trained
leaves no record). Writes DIR/sweep.csv, DIR/sweep.json and DIR/sweep.png: the
evaluation metrics against τ (log axis) with the learnable run marked at its
final τ, entropy and contrastive accuracy against τ (SimCLR's Table 5), and
the learnable run's τ trajectory.

A Ctrl-C outside a run's training loop (between runs, while one is set up or
evaluated) stops the sweep at once with a line that says to rerun the same
command: what is on disk is whole (atomic files, complete checkpoints); inside
the loop the run saves its step first (guards.Preemption).
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import threading
import time

import jax
from etils import epath

from jaxcl import config as config_lib, errors, files, report, search_records, train
from jaxcl.config import config_files
from jaxcl.search_records import EVAL_COLUMNS, LEARNABLE, TRAIN_COLUMNS
from jaxcl.trainer import validation
from jaxcl.workdir import run_files

WALL_FILE = files.WALL_FILE


# Config keys that say how or where the runs go, not what they compute: a
# sweep resumed on another machine (mesh, data_dir) or logged more often may
# change them. Of the other keys a resumed run may change
# (config.RESUMABLE_CHANGES), these change the sweep's results: its own.
RESULT_KEYS = ('total_steps', 'eval', 'nonfinite', 'init', 'dataset.eval_urls',
               'dataset.eval_samples')


def parse_temperatures(text: str) -> list[str]:
  """'0.05,0.1,learnable' -> ['0.05', '0.1', 'learnable']; ConfigError for
  an empty value, one that is neither a finite number nor 'learnable', or one
  τ twice. Whether the config can train a τ is run_configs' check."""
  values, seen = [v.strip() for v in text.split(',')], {}
  if values == ['']:
    raise config_lib.ConfigError('--temperatures needs at least one value')
  for v in values:
    if not v:
      raise config_lib.ConfigError(f'--temperatures={text} has an empty value (two commas '
                                   f'together, or one at an end)')
    key = v if v == LEARNABLE else _finite(v)
    if key is None:
      raise config_lib.ConfigError(f'--temperatures: {v!r} is neither a finite number nor '
                                   f'{LEARNABLE!r}')
    if key in seen:
      raise config_lib.ConfigError(f'--temperatures lists one τ twice ({seen[key]} and {v})')
    seen[key] = v
  return values


def _finite(text: str) -> float | None:
  """The finite number `text` spells, or None (nan and inf are not τ values)."""
  try:
    value = float(text)
  except ValueError:
    return None
  return value if math.isfinite(value) else None


def run_config(config, value: str):
  """The sweep's config for one temperature value."""
  config = config.copy_and_resolve_references()
  t = config.temperature
  if value == LEARNABLE:
    t.mode = LEARNABLE
  else:
    t.update(mode='fixed', init=float(value))
  config.name = f'{config.name}-tau-{value}' if config.name else f'tau-{value}'
  return config


def run_configs(config, values: list[str]) -> dict:
  """{value: its run's config}, each validated as `jaxcl train` validates
  it, so a fixed τ must lie in the config's [temperature.min,
  temperature.max] as temperature.init must; ConfigError naming the value."""
  validation.validate(config)
  configs = {}
  for value in values:
    configs[value] = run_config(config, value)
    try:  # the data were checked with the config: its runs differ in τ only
      validation.validate(configs[value], check_data=False)
    except config_lib.ConfigError as e:
      raise config_lib.ConfigError(f'--temperatures {value}: {e}') from None
  return configs


def settings(config, values: list[str], search: str = 'grid', **options) -> dict:
  """What a sweep folder holds results of, as sweep.json records it: the
  search, the candidates, the search's options (halving: eta, holdout,
  monitor), total_steps and the config's keys but those of how or where the
  runs go."""
  own = {k: v for k, v in config_lib.flat_config(config).items() if not _how_or_where(k)}
  return {'search': search, 'candidates': list(values), **options,
          'total_steps': config.total_steps, 'config': own}


def _how_or_where(key: str) -> bool:
  under = lambda prefixes: any(key == k or key.startswith(k + '.') for k in prefixes)
  return under(config_lib.RESUMABLE_CHANGES) and not under(RESULT_KEYS)


def check_settings(workdir, new: dict) -> dict | None:
  """The sweep record in workdir/sweep.json (None if there is none or nothing
  trained under it); ConfigError naming the first setting it differs in from
  `new`. An older jaxcl's record is checked on the settings it has (a grid's
  had none)."""
  workdir = epath.Path(workdir)
  record = _read_json(workdir / files.SWEEP_JSON)
  # A sweep refused as its first run starts (a missing init.source, a step
  # too big for memory) or killed before then has no results to keep apart.
  if record is None or not _trained_under(workdir, record):
    return None
  for key, now in new.items():
    was = record.get(key, 'grid' if key == 'search' else None)
    if key == 'config' and isinstance(was, dict):
      _check_config(workdir, was, now)
    elif key in record or key == 'search':
      errors.check(was == now, _difference(workdir, key, was, now))
  return record


def _trained_under(workdir: epath.Path, record: dict) -> bool:
  """Whether something trained under the sweep record in `workdir`: a run
  in a tau-* folder (its config.json is written as it starts training), or
  a rung the record has scores of."""
  runs = workdir.is_dir() and any(
      p.name.startswith('tau-') and files.is_run(p) for p in workdir.iterdir())
  return runs or any(rung.get('scores') for rung in record.get('rungs', []))


def _difference(workdir, key: str, was, now) -> str:
  """One line: the sweep in `workdir` has `was` where this command has `now`."""
  if key == 'search':
    return (f'{workdir} holds a {was} sweep, not {now} (--search={now}); rerun it with '
            f'--search={was}, or use a new workdir')
  if key == 'candidates':
    return (f'{workdir} holds a sweep of --temperatures={",".join(map(str, was or []))}, not '
            f'{",".join(now)}; rerun it with those, or use a new workdir')
  if key == 'total_steps':
    return (f'{workdir} holds a sweep with a different config (total_steps: {was!r} there, '
            f'{now!r} now); use a new workdir')
  flag = lambda value: f'--{key}={value}' if value != '' else f'no --{key}'
  return f'{workdir} holds a sweep with {flag(was)}, not {flag(now)}; use a new workdir'


def _check_config(workdir, was: dict, now: dict) -> None:
  """ConfigError naming the first key the recorded config differs in. Keys
  renamed since it was written count under their new names, keys added since
  at the values such runs behaved by (as a run's saved config)."""
  later = json.loads(json.dumps({k: v for k, v in config_lib.KEYS_ADDED_LATER.items()
                                 if k in now}))
  was = {**later, **config_files.with_new_names(was, str(workdir / files.SWEEP_JSON))}
  changed = sorted(k for k in set(was) | set(now) if was.get(k) != now.get(k))
  if changed:
    k, more = changed[0], len(changed) - 1
    raise config_lib.ConfigError(
        f'{workdir} holds a sweep with a different config ({k}: {was.get(k)!r} there, '
        f'{now.get(k)!r} now{f", and {more} more" if more else ""}); use a new workdir')


def _read_json(path):
  """The JSON object in `path`, or None if it is missing or unreadable."""
  try:
    value = json.loads(epath.Path(path).read_text())
  except (OSError, ValueError):
    return None
  return value if isinstance(value, dict) else None


def finished(run_dir, config) -> bool:
  """Whether run_dir holds this config's finished, evaluated run: its
  eval.json is readable and at total_steps, and its saved config is this one."""
  results = _read_json(epath.Path(run_dir) / files.EVAL_FILE)
  if results is None or results.get('step') != config.total_steps:
    return False
  try:
    saved = config_lib.read_saved(run_dir)
  except config_lib.ConfigError:
    return False
  return saved == config_lib.flat_config(config)


def summarize(run_dir, value: str) -> dict:
  """One row of the sweep table from a finished run's files."""
  run_dir = epath.Path(run_dir)
  rows = report.read_metrics(run_dir)
  last = [r for r in rows if 'loss' in r][-1] if any('loss' in r for r in rows) else {}
  results = _read_json(run_dir / files.EVAL_FILE) or {}
  wall = run_dir / WALL_FILE
  row = {'run': run_dir.name, 'tau': value, 'final_tau': last.get('temperature'),
         **{k: last.get(k) for k in TRAIN_COLUMNS},
         **{k: results[k] for k in EVAL_COLUMNS if k in results},
         'wall_time_s': json.loads(wall.read_text())['seconds'] if wall.exists() else None}
  return row


def prepare(config, workdir, values: list[str], sweep_settings: dict, writer: bool):
  """(the run configs, {value: config}; the folder's sweep record): every run
  validated, and checked against the folder (a sweep of these settings; each
  run's workdir trainable and resumable with its config) before the first
  trains; the sweep's directory made and its settings recorded (by the
  writer). ConfigError for a directory that holds something else."""
  workdir = epath.Path(workdir)
  if workdir.is_dir() and not (files.is_empty_dir(workdir) or files.is_sweep(workdir)):
    raise config_lib.ConfigError(f'workdir {workdir} holds files but is not a jaxcl sweep (no '
                                 f'sweep.json or tau-* runs); use a new or empty directory')
  configs = run_configs(config, values)
  record = check_settings(workdir, sweep_settings)
  for value, cfg in configs.items():
    run_files.check_trainable_workdir(workdir / f'tau-{value}')
    config_lib.check_resumable(cfg, workdir / f'tau-{value}')
  workdir.mkdir(parents=True, exist_ok=True)
  record = {'columns': [], 'rows': [], **(record or {}), **sweep_settings}
  if writer:  # before anything trains: a rerun is checked against it even after a kill
    files.write_atomically(workdir / files.SWEEP_JSON, json.dumps(record, indent=2) + '\n')
  return configs, record


@contextlib.contextmanager
def undone_if_refused(workdir, writer: bool):
  """For a sweep from its prepare on: bad input refused before anything
  trained (by the first run's own checks: a missing init.source, a step too
  big for memory) leaves the folder as it was, its sweep.json or none."""
  workdir, record_path = epath.Path(workdir), epath.Path(workdir) / files.SWEEP_JSON
  made, before = not workdir.exists(), record_path.read_bytes() if record_path.exists() else None
  try:
    yield
  except (errors.ConfigError, errors.DatasetError):  # what cli.main exits 2 for
    if writer and not _trained_under(workdir, _read_json(record_path) or {}):
      if before is None:
        record_path.unlink(missing_ok=True)
      elif record_path.read_bytes() != before:
        files.write_atomically(record_path, before)
      if made and files.is_empty_dir(workdir):
        workdir.rmdir()
    raise


# What a Ctrl-C outside a run's training loop says (cli.main prints it).
INTERRUPTED = ('interrupted (Ctrl-C) between training steps: the checkpoints and records '
               'written so far are kept; run the same command again to resume')


@contextlib.contextmanager
def ctrl_c_stops_the_sweep():
  """For a sweep's body, on one process (several stop together, through
  jax's preemption service): a Ctrl-C outside a run's training loop stops
  the sweep at once, as KeyboardInterrupt(INTERRUPTED), since everything on
  disk is whole (atomic files, complete checkpoints); a second one as a bare
  KeyboardInterrupt. Inside the loop, guards.Preemption saves the step first."""
  if jax.process_count() > 1 or threading.current_thread() is not threading.main_thread():
    yield
    return
  received = []

  def on_ctrl_c(signum, frame):
    del frame
    received.append(signum)
    raise KeyboardInterrupt(INTERRUPTED if len(received) == 1 else '')

  previous = signal.signal(signal.SIGINT, on_ctrl_c)
  try:
    yield
  finally:
    signal.signal(signal.SIGINT, previous)


def timed_train(cfg, run_dir, writer: bool, **kwargs) -> None:
  """train.train_and_evaluate, its seconds added to the run's wall_time.json
  (a run resumed after a kill, or continued at a rung, counts every call)."""
  start = time.perf_counter()
  train.train_and_evaluate(cfg, run_dir, **kwargs)
  if writer:
    before = (_read_json(run_dir / WALL_FILE) or {}).get('seconds', 0.0)
    files.write_atomically(run_dir / WALL_FILE,
                           json.dumps({'seconds': before + time.perf_counter() - start}))


def run_sweep(config, workdir, values: list[str], log=print) -> dict:
  """Trains and evaluates every value (skipping finished runs); writes the
  sweep files. Returns sweep.json's record: the settings, 'columns', 'rows'."""
  workdir = epath.Path(workdir)
  writer = jax.process_index() == 0  # on a pod, process 0 writes the sweep's files
  with undone_if_refused(workdir, writer):
    configs, record = prepare(config, workdir, values, settings(config, values), writer)
    rows = []
    with ctrl_c_stops_the_sweep():
      for value, cfg in configs.items():
        run_dir = workdir / f'tau-{value}'
        if finished(run_dir, cfg):
          log(f'jaxcl sweep: tau-{value} is finished, skipped')
        else:
          log(f'jaxcl sweep: training tau-{value}')
          timed_train(cfg, run_dir, writer)
        rows.append(summarize(run_dir, value))
      record.update(columns=search_records.columns(rows), rows=rows)
      if writer:
        search_records.write_table(workdir, record)
        search_records.plot_sweep(workdir, record)
  return record
