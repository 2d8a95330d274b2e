"""The `jaxcl` command: train, eval, export.

  jaxcl train  --config configs/simclr_digits.py --workdir DIR [--config.key=value ...]
               [--allow_batch_change]
  jaxcl eval   --workdir DIR
  jaxcl export --workdir DIR --output FILE
  jaxcl sweep  --config CONFIG --workdir DIR --temperatures 0.05,0.1,0.2,0.5,1.0,learnable
  jaxcl report --workdir DIR

Several processes (one per host or GPU) add --coordinator_address HOST:PORT
--num_processes N --process_id I, except on TPU pods and under SLURM, where
they find each other themselves; --heartbeat_timeout S (default 60) bounds
how long they wait for a host that stopped answering.

Bad input (an unknown or mistyped override, an invalid value, a missing
dataset or workdir) prints one line `jaxcl: error: ...` and exits with code 2
before anything is compiled or written.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
import warnings

from absl import flags
from ml_collections import config_flags

from jaxcl import errors

USAGE = __doc__.split('\n\n')[1]
COMMANDS = ('train', 'eval', 'export', 'sweep', 'report')

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file (Python).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory: checkpoints, metrics, eval.json.')
_OUTPUT = flags.DEFINE_string('output', None, 'export: the artifact file to write.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'Multi-process: HOST:PORT of process 0 (with --num_processes '
    'and --process_id). TPU pods and SLURM jobs are detected without them.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Multi-process: how many.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'Multi-process: this one, from 0.')
_HEARTBEAT = flags.DEFINE_integer(
    'heartbeat_timeout', 60, 'Multi-process: seconds without a heartbeat after which a process '
    '(a hung or vanished host) counts as dead and the others stop.', lower_bound=1)
_ALLOW_BATCH_CHANGE = flags.DEFINE_bool(
    'allow_batch_change', False, 'train: resume a run with a different global batch_size '
    '(reported, and recorded in the workdir).')
_TEMPERATURES = flags.DEFINE_string(
    'temperatures', '0.05,0.1,0.2,0.5,1.0,learnable',
    'sweep: comma-separated fixed τ values and/or "learnable".')


class UsageError(Exception):
  """Bad command-line input: printed as one line, exit code 2."""


def _parse(argv: list[str]):
  try:
    flags.FLAGS(argv)
  except flags.Error as e:
    raise UsageError(str(e).splitlines()[0]) from None
  except (AttributeError, KeyError) as e:  # config_flags: an override names no key
    key = str(e).strip('\'"')
    where = [a.split('=')[0] for a in argv if a.startswith('--config.') and key in a]
    raise UsageError(f'unknown config key {key!r}' + (f' in {where[0]}' if where else '') +
                     '; the config file lists the keys') from None
  except Exception as e:  # pylint: disable=broad-except
    raise UsageError(f'{type(e).__name__}: {e}') from None


def _load_config():
  if flags.FLAGS['config'].value is None:
    raise UsageError('--config is required')
  filename = flags.FLAGS['config'].config_filename
  if not filename:
    raise UsageError('--config is required')
  if not os.path.isfile(filename):
    raise UsageError(f'config file {filename} does not exist')
  try:
    config = _CONFIG.value
    config.keys()  # a file that failed to load raises here
  except Exception as e:  # pylint: disable=broad-except
    raise UsageError(f'cannot load config {flags.FLAGS["config"].config_filename}: '
                     f'{errors.first_line(e)}') from None
  _check_tuple_overrides(config, sys.argv)
  return config


def _check_tuple_overrides(config, argv):
  """config_flags reads `--config.names=abc` for a tuple field as ('a', 'b',
  'c'); a tuple value must be written as one."""
  for arg in argv:
    if not arg.startswith('--config.') or '=' not in arg:
      continue
    key, value = arg[len('--config.'):].split('=', 1)
    node = config
    try:
      for part in key.split('.'):
        node = node[part]
    except (KeyError, TypeError):
      continue
    if isinstance(node, (tuple, list)) and not value.strip().startswith(('(', '[')):
      raise UsageError(f'--config.{key} takes a tuple, written (a, b) or [a, b]; got {value!r}')


def _require(flag, name):
  if not flag.value:
    raise UsageError(f'--{name} is required')
  return flag.value


def _check_workdir(path: str, must_exist: bool):
  from etils import epath  # pylint: disable=g-import-not-at-top
  p = epath.Path(path)
  if p.exists() and not p.is_dir():
    raise UsageError(f'workdir {path} exists and is not a directory')
  if must_exist and not p.is_dir():
    raise UsageError(f'workdir {path} does not exist')


class _OneLine(logging.Filter):
  """Library log records as one line, without tracebacks: a failure they
  describe (orbax's background checkpoint writer, for one) reaches the user
  as jaxcl's own one-line message."""

  def filter(self, record):
    record.msg = (record.getMessage().splitlines() or [''])[0][:300]
    record.args, record.exc_info, record.exc_text, record.stack_info = None, None, None, None
    return True


def _quiet():
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger('absl').setLevel(logging.WARNING)
  logging.getLogger('absl').addFilter(_OneLine())
  # orbax's write tasks that fail after a failed checkpoint was reported.
  logging.getLogger('asyncio').setLevel(logging.CRITICAL)
  # Exceptions Python cannot raise anywhere (tensorstore calling back into an
  # event loop orbax has closed after a failed write) would print tracebacks.
  sys.unraisablehook = lambda unraisable: None
  warnings.filterwarnings('ignore', category=DeprecationWarning)
  warnings.filterwarnings('ignore', category=UserWarning)


def run(argv: list[str]) -> int:
  if len(argv) < 2 or argv[1] not in COMMANDS:
    raise UsageError('choose a command: ' + ' | '.join(COMMANDS) + '\n' + USAGE)
  command = argv[1]
  _parse([argv[0]] + argv[2:])
  workdir = _require(_WORKDIR, 'workdir')
  _quiet()

  # Imported late so that `jaxcl` with bad flags answers before jax starts.
  from jaxcl import distributed  # pylint: disable=g-import-not-at-top
  try:
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                           heartbeat_timeout_s=_HEARTBEAT.value)
  except ValueError as e:
    raise UsageError(str(e)) from None
  from jaxcl import config as config_lib  # pylint: disable=g-import-not-at-top
  from jaxcl import data  # pylint: disable=g-import-not-at-top
  try:
    if command == 'sweep':
      from jaxcl import sweep  # pylint: disable=g-import-not-at-top
      values = sweep.parse_temperatures(_TEMPERATURES.value)
      config = _load_config()
      _check_workdir(workdir, must_exist=False)
      table = sweep.run_sweep(config, workdir, values)
      print(f'wrote {workdir}/sweep.csv, sweep.json and sweep.png ({len(table["rows"])} runs)')
    elif command == 'report':
      _check_workdir(workdir, must_exist=True)
      from jaxcl import report  # pylint: disable=g-import-not-at-top
      print(f'wrote {report.write_report(workdir)}')
    elif command == 'train':
      config = _load_config()
      _check_workdir(workdir, must_exist=False)
      config_lib.validate(config)
      from jaxcl import train  # pylint: disable=g-import-not-at-top
      train.train_and_evaluate(config, workdir, allow_batch_change=_ALLOW_BATCH_CHANGE.value)
    elif command == 'eval':
      _check_workdir(workdir, must_exist=True)
      from jaxcl import train  # pylint: disable=g-import-not-at-top
      print(json.dumps(train.evaluate_workdir(workdir), indent=2))
    else:
      output = _require(_OUTPUT, 'output')
      _check_workdir(workdir, must_exist=True)
      from jaxcl import export  # pylint: disable=g-import-not-at-top
      metadata = export.export_encoder(workdir, output)
      print(f'wrote {output} and {output}.json: uint8 {metadata["input"]["shape"]} -> float32 '
            f'{metadata["output"]["shape"]}')
      if 'text' in metadata:
        print(f'wrote {export.text_path(output)}: int32 {metadata["text"]["input"]["shape"]} -> '
              f'float32 {metadata["text"]["output"]["shape"]} ({metadata["tokenizer"]["type"]} '
              f'tokenizer in {output}.json)')
  except (config_lib.ConfigError, data.DatasetError) as e:
    raise UsageError(str(e)) from None
  except RuntimeError as e:
    from jaxcl import train  # pylint: disable=g-import-not-at-top
    if not isinstance(e, train.RunError):
      raise
    print(f'jaxcl: {e}', file=sys.stderr)
    return 1
  return 0


def main(argv=None) -> None:
  argv = list(sys.argv if argv is None else argv)
  try:
    code = run(argv)
  except UsageError as e:
    print(f'jaxcl: error: {e}', file=sys.stderr)
    code = 2
  except (Exception, KeyboardInterrupt) as e:  # pylint: disable=broad-except
    from jaxcl import distributed  # pylint: disable=g-import-not-at-top
    if not distributed.multi_process():
      raise
    code = _report_in_multi_process(e)
  from jaxcl import distributed  # pylint: disable=g-import-not-at-top
  if code and distributed.multi_process():
    # A normal exit would run jax.distributed's shutdown barrier, which waits
    # for the other processes: for a dead one until the heartbeat timeout,
    # for a live one forever (it waits in a collective for us). Leaving at
    # once closes our connections, so the others' collectives fail and they
    # stop too, with the message below.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
  sys.exit(code)


def _report_in_multi_process(e: BaseException) -> int:
  """One line for an error in one process of several; exit code 1."""
  import jax  # pylint: disable=g-import-not-at-top
  first = errors.first_line(e)[:300]
  me = jax.process_index()
  if type(e).__name__ == 'JaxRuntimeError' and any(
      s in str(e) for s in ('Gloo', 'Connection reset', 'Connection closed', 'UNAVAILABLE',
                            'Socket closed')):
    line = (f'jaxcl: error: process {me}: lost another process of the job ({first[:200]}); '
            f'run the same command on every process to resume from the last checkpoint')
  else:  # a bug: the traceback helps
    traceback.print_exc()
    line = f'jaxcl: error: process {me}: {type(e).__name__}: {first}'
  print('\n' + line, file=sys.stderr, flush=True)  # after any progress bar
  return 1


if __name__ == '__main__':
  main()
