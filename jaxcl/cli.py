"""The `jaxcl` command: train, eval, export, sweep, report, import.

  jaxcl train  --config FILE --workdir DIR [--config.KEY=VALUE ...] [--allow_batch_change]
  jaxcl eval   --workdir DIR [--zeroshot cifar100,imagenet2012,folder:DIR] [--retrieval NAME]
  jaxcl export --workdir DIR --output FILE [--overwrite] [--format jax|open_clip]
  jaxcl sweep  --config FILE --workdir DIR [--temperatures 0.05,0.1,0.2,0.5,1.0,learnable]
               [--search grid|halving --eta 2 --holdout 0.2 --monitor METRIC]
  jaxcl report --workdir DIR
  jaxcl import SOURCE --output DIR [--tokenizer FILE]
  jaxcl shard  --input PAIRS_OR_FOLDER --output DIR [--shard_size MB] [--workers N]

`jaxcl COMMAND --help` lists a command's flags. Several processes (one per
host or GPU) add --coordinator_address HOST:PORT --num_processes N
--process_id I, except on TPU pods and under SLURM, where they find each
other themselves; --heartbeat_timeout S (default 60) bounds how long they
wait for a host that stopped answering.

Bad input (an unknown or mistyped override, an invalid value, a missing
dataset or workdir) prints one line `jaxcl: error: ...` and exits with code 2
before anything is compiled or written. Ctrl-C during train or sweep saves
the current step, like SIGTERM, and exits 130; a second Ctrl-C stops at once.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import warnings

from absl import flags, logging as absl_logging
from etils import epath
from ml_collections import config_flags

from jaxcl import errors
from jaxcl.config import config_files
from jaxcl.trainer import distributed, validation

EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130, the shell's code for Ctrl-C

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file (Python).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory: checkpoints, metrics, eval.json.')
_OUTPUT = flags.DEFINE_string('output', None, 'The artifact file to write (export --format '
                              'open_clip: a directory; import: the new workdir; shard: the new '
                              'folder of shards).')
_OVERWRITE = flags.DEFINE_bool('overwrite', False,
                               'Replace the files --output would write if they exist (--format '
                               'open_clip: a directory holding an earlier open_clip export).')
_WITH_TEMPERATURE = flags.DEFINE_bool(
    'with_temperature', False, 'export: the image embedder also returns τ(x), a run with '
    'temperature.mode=predicted (an uncertainty score).')
_FORMAT = flags.DEFINE_enum(
    'format', 'jax', ['jax', 'open_clip'], 'jax: jax.export artifacts (FILE, FILE.json). '
    'open_clip: a CLIP or SigLIP model as an open_clip directory (open_clip_config.json, '
    "open_clip_model.safetensors, the tokenizer), for open_clip.create_model('local-dir:DIR').")
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'Multi-process: HOST:PORT of process 0 (with --num_processes '
    'and --process_id). TPU pods and SLURM jobs are detected without them.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Multi-process: how many.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'Multi-process: this one, from 0.')
_HEARTBEAT = flags.DEFINE_integer(
    'heartbeat_timeout', 60, 'Multi-process: seconds without a heartbeat after which a process '
    '(a hung or vanished host) counts as dead and the others stop.', lower_bound=1)
_ALLOW_BATCH_CHANGE = flags.DEFINE_bool(
    'allow_batch_change', False, 'Resume a run with a different global batch_size '
    '(reported, and recorded in the workdir).')
_TOKENIZER = flags.DEFINE_string(
    'tokenizer', None, "The source's tokenizer file (CLIP: tokenizer.json or "
    "bpe_simple_vocab_16e6.txt.gz; SigLIP: its SentencePiece model; SigLIP 2: Gemma's "
    'tokenizer.model), when SOURCE lacks it.')
_MAX_PATCHES = flags.DEFINE_string(
    'max_patches', None, 'eval of a NaFlex run (dataset.resolution=naflex): comma-separated '
    "patch budgets evaluated by this call instead of the run's eval.max_patches; results "
    'max_patches/N/zeroshot_top1 ...')
_ZEROSHOT = flags.DEFINE_string(
    'zeroshot', None, 'Comma-separated zero-shot datasets evaluated by this call instead of the '
    "run's eval.zeroshot (its saved config is unchanged): TFDS NAME[:SPLIT] or folder:PATH, "
    "'=LIST' for a shipped name list (folder:/data/val=imagenet); results zeroshot/KEY/top1|5.")
_RETRIEVAL = flags.DEFINE_string(
    'retrieval', None, 'Comma-separated image-text TFDS datasets (NAME[:SPLIT], coco_captions) '
    "for image-text retrieval by this call instead of the run's eval.retrieval; results "
    'retrieval/KEY/i2t_r1 ... t2i_r10.')
_INPUT = flags.DEFINE_string('input', None, 'shard: a pairs file (JSONL/CSV/TSV of image path '
                             'and caption) or an image folder (CLASS/*.png, or train/ and test/).')
_SHARD_SIZE = flags.DEFINE_float('shard_size', 256, 'shard: about how many MB a shard holds.',
                                 lower_bound=0.001)
_WORKERS = flags.DEFINE_integer('workers', -1, 'shard: processes decoding and encoding images '
                                '(-1: the cores; 0: none besides this one).', lower_bound=-1)
_TEST_FRACTION = flags.DEFINE_float(
    'test_fraction', 0.0, "shard, pairs file: the fraction of images held out in test-*.tar "
    "(by a hash of the image's path, as dataset.pairs.test_fraction).")
_TEMPERATURES = flags.DEFINE_string(
    'temperatures', '0.05,0.1,0.2,0.5,1.0,learnable',
    'Comma-separated fixed τ values and/or "learnable".')
_SEARCH = flags.DEFINE_enum('search', 'grid', ['grid', 'halving'], 'sweep: train every τ to the '
                            'end (grid), or halve the candidates at rungs (jaxcl.halving).')
_ETA = flags.DEFINE_integer('eta', 2, 'sweep --search halving: 1/eta of the candidates go on at '
                            'each rung.', lower_bound=2)
_HOLDOUT = flags.DEFINE_float('holdout', 0.2, 'sweep --search halving: the fraction of the eval '
                              'train split that scores the rungs (0: the eval splits).')
_MONITOR = flags.DEFINE_string('monitor', '', 'sweep --search halving: the evaluation metric '
                               "that ranks the candidates (default: the method's, e.g. knn_top1).")

MULTI_PROCESS = ('coordinator_address', 'num_processes', 'process_id', 'heartbeat_timeout')
# command: (what it does, its required flags, its optional flags)
COMMANDS = {
    'train': ('Trains a config in a workdir, or resumes the run there.',
              ('config', 'workdir'), ('allow_batch_change', *MULTI_PROCESS)),
    'eval': ("Recomputes a run's eval.json from its newest checkpoint.",
             ('workdir',), ('zeroshot', 'retrieval', 'max_patches', *MULTI_PROCESS)),
    'export': ('Writes the trained encoder(s) as jax.export artifacts and FILE.json, or '
               '(--format open_clip) a CLIP or SigLIP model as an open_clip directory.',
               ('workdir', 'output'), ('overwrite', 'format', 'with_temperature', *MULTI_PROCESS)),
    'sweep': ('Trains one run per temperature, or halves them at rungs on held-out data '
              '(--search halving), and compares them (sweep.csv/json/png).',
              ('config', 'workdir'), ('temperatures', 'search', 'eta', 'holdout', 'monitor',
                                      *MULTI_PROCESS)),
    'report': ('Plots a run or a sweep: DIR/report.html and DIR/report/*.png.',
               ('workdir',), ()),
    'import': ('Makes a workdir at step 0 from the CLIP, SigLIP or SigLIP 2 checkpoint SOURCE: '
               'an open_clip '
               'or transformers directory, or a big_vision .npz.', ('output',), ('tokenizer',)),
    'shard': ('Writes a pairs file or an image folder as webdataset shards in the new folder '
              'DIR (train-000000.tar ..., sizes.json, manifest.json), for dataset.name=webdataset.',
              ('input', 'output'), ('shard_size', 'workers', 'test_fraction')),
}
POSITIONAL = {'import': 'SOURCE'}  # the commands that take one positional argument
HELP_FLAGS = ('-h', '--help', '-help', '--helpfull', 'help')


UsageError = errors.UsageError


def _command_help(command: str) -> str:
  summary, required, optional = COMMANDS[command]
  lines = [f'usage: jaxcl {command} ' + (f'{POSITIONAL[command]} ' if command in POSITIONAL
                                        else '')
           + ' '.join(f'--{f} {f.upper()}' for f in required)
           + (' [--config.KEY=VALUE ...]' if 'config' in required else '')
           + (' [flags]' if optional else ''), '', summary, '', 'flags:']
  for name in (*required, *optional):
    flag = flags.FLAGS[name]
    default = '' if flag.default is None or name in required else f' (default: {flag.default})'
    lines.append(f'  --{name}: {flag.help}{" (required)" if name in required else default}')
  if 'config' in required:
    lines.append('  --config.KEY=VALUE: override any key of the config file '
                 '(--config.batch_size=512, --config.temperature.init=0.1)')
  return '\n'.join(lines)


def _flag_name(arg: str) -> str | None:
  """'--workdir=x' / '-workdir' -> 'workdir'; None for a positional argument."""
  if not arg.startswith('-') or arg in ('-', '--'):
    return None
  return arg.lstrip('-').split('=', 1)[0]


def _config_path(args: list[str]) -> str | None:
  for i, arg in enumerate(args):
    if arg in ('--config', '-config') and i + 1 < len(args):
      return args[i + 1]
    if arg.startswith(('--config=', '-config=')):
      return arg.split('=', 1)[1]
  return None


def _check_flags(command: str, args: list[str]) -> None:
  """Flags of other commands, and --config overrides where no config is read."""
  _, required, optional = COMMANDS[command]
  own = set(required) | set(optional)
  for arg in args:
    name = _flag_name(arg)
    if name is None:
      continue
    base = name[2:] if name.startswith('no') and name[2:] in flags.FLAGS else name
    if base.startswith('config.') and 'config' in own:
      continue
    if (base in flags.FLAGS or base.startswith('config.')) and base not in own:
      raise UsageError(f'jaxcl {command} does not take --{base} (its flags: '
                       + ', '.join(f'--{f}' for f in sorted(own)) + ')')


def _parse(command: str, args: list[str]) -> list[str]:
  _check_flags(command, args)
  config = None
  if 'config' in COMMANDS[command][1]:
    path = _config_path(args)
    if path is None:
      raise UsageError('--config is required')
    try:
      config = config_files.load(path)
      config_files.check_overrides(config, args)
    except config_files.ConfigFileError as e:
      raise UsageError(str(e)) from None
  try:
    positional = flags.FLAGS([f'jaxcl {command}'] + args)[1:]
  except flags.UnrecognizedFlagError as e:
    suggestion = config_files.closest(e.flagname, COMMANDS[command][1] + COMMANDS[command][2])
    raise UsageError(f'unknown flag --{e.flagname}'
                     + (f' (did you mean --{suggestion}?)' if suggestion else
                        f'; jaxcl {command} --help lists its flags')) from None
  except flags.Error as e:
    raise UsageError(config_files.value_error_message(config, args, errors.first_line(e))
                     ) from None
  except (Exception, SystemExit) as e:  # the config file ran twice
    raise UsageError(f'{type(e).__name__}: {errors.first_line(e)}') from None
  if config is not None:  # config_flags' own copy, as config_files.load settled the first
    config_files.settle(_CONFIG.value)
  wanted = 1 if command in POSITIONAL else 0
  if len(positional) > wanted:
    takes = f'one {POSITIONAL[command]}' if wanted else 'no positional arguments'
    raise UsageError(f'jaxcl {command} takes {takes}, got '
                     + ' '.join(repr(p) for p in positional))
  if len(positional) < wanted:
    raise UsageError(f'jaxcl {command} needs {POSITIONAL[command]}')
  for name in COMMANDS[command][1]:
    if name != 'config' and not flags.FLAGS[name].value:
      raise UsageError(f'--{name} is required')
  return positional


def _check_workdir(path: str, must_exist: bool):
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
    if record.exc_info and isinstance(record.exc_info[1], KeyboardInterrupt):
      return False  # orbax's save cut by a second Ctrl-C: main's one line says it
    record.msg = (record.getMessage().splitlines() or [''])[0][:300]
    record.args, record.exc_info, record.exc_text, record.stack_info = None, None, None, None
    return True


def _quiet():
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
  if len(argv) < 2:
    raise UsageError('choose a command: ' + ' | '.join(COMMANDS) + '; jaxcl --help for more')
  if argv[1] in HELP_FLAGS:
    print(__doc__.strip())
    return 0
  command = argv[1]
  if command not in COMMANDS:
    raise UsageError(f'unknown command {command!r}; choose one of: ' + ' | '.join(COMMANDS))
  if any(arg in HELP_FLAGS for arg in argv[2:]):
    print(_command_help(command))
    return 0
  positional = _parse(command, argv[2:])
  workdir = _WORKDIR.value
  _quiet()

  try:
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                           heartbeat_timeout_s=_HEARTBEAT.value)
  except ValueError as e:
    raise UsageError(str(e)) from None
  # Each command's modules are imported here, when it runs: with them at the
  # top `jaxcl --help` took 4-6 s instead of 0.4 s (pyproject.toml's ruff section).
  try:
    if 'output' in COMMANDS[command][1]:  # X/sub, X a file: one line before anything starts
      validation.check_output_path(_OUTPUT.value)
    if command != 'shard':  # the only command that compiles nothing
      from jaxcl.trainer import compilation_cache
      if _CONFIG.value:
        compilation_cache.enable(_CONFIG.value.compilation_cache_dir, workdir)
      else:  # a run's saved setting: no cache where it cannot be made (another machine)
        compilation_cache.enable(compilation_cache.saved_setting(workdir), workdir, strict=False)
    if command == 'sweep':
      from jaxcl import sweep
      values = sweep.parse_temperatures(_TEMPERATURES.value)
      _check_workdir(workdir, must_exist=False)
      ignored = [f'--{f}' for f in ('eta', 'holdout', 'monitor') if flags.FLAGS[f].present]
      errors.check(_SEARCH.value == 'halving' or not ignored, f'{", ".join(ignored)}: for '
                   '--search halving only; this is a grid sweep (add --search halving)')
      if _SEARCH.value == 'halving':
        from jaxcl import halving
        table = halving.run_halving(_CONFIG.value, workdir, values, _ETA.value, _HOLDOUT.value,
                                    _MONITOR.value)
        print(f'chose tau-{table["winner"]} ({table["steps_trained"]} steps trained in all)')
      else:
        table = sweep.run_sweep(_CONFIG.value, workdir, values)
      print(f'wrote {workdir}/sweep.csv, sweep.json and sweep.png ({len(table["rows"])} runs)')
    elif command == 'report':
      _check_workdir(workdir, must_exist=True)
      from jaxcl import report
      path, skipped = report.write_report(workdir)
      print(f'wrote {path}' + (f' ({skipped} unreadable line(s) of metrics.jsonl skipped)'
                               if skipped else ''))
    elif command == 'train':
      _check_workdir(workdir, must_exist=False)
      from jaxcl import train
      validation.validate(_CONFIG.value)
      train.train_and_evaluate(_CONFIG.value, workdir,
                               allow_batch_change=_ALLOW_BATCH_CHANGE.value)
    elif command == 'import':
      from jaxcl.hub import importer
      summary = importer.import_checkpoint(positional[0], _OUTPUT.value, _TOKENIZER.value)
      print(f'wrote {summary["workdir"]}: {summary["method"]}, {summary["parameters"]:,} '
            f'parameters, {summary["images"]}, τ {summary["temperature"]:.4g} '
            f'(step 0; jaxcl eval / export / train --workdir use it)')
    elif command == 'shard':
      from jaxcl.data import shard_writer
      workers = (os.cpu_count() or 1) if _WORKERS.value < 0 else _WORKERS.value
      shard_writer.write_shards(_INPUT.value, _OUTPUT.value, shard_mb=_SHARD_SIZE.value,
                                workers=workers, test_fraction=_TEST_FRACTION.value)
    elif command == 'eval':
      _check_workdir(workdir, must_exist=True)
      from jaxcl.data import naflex
      from jaxcl.trainer import trained
      zeroshot, retrieval = (None if flag.value is None else
                             [name.strip() for name in flag.value.split(',') if name.strip()]
                             for flag in (_ZEROSHOT, _RETRIEVAL))
      budgets = None if _MAX_PATCHES.value is None else naflex.parse_budgets(_MAX_PATCHES.value)
      print(json.dumps(trained.evaluate_workdir(workdir, zeroshot, retrieval, budgets), indent=2))
    elif _FORMAT.value == 'open_clip':
      errors.check(not _WITH_TEMPERATURE.value, '--with_temperature needs --format jax')
      _check_workdir(workdir, must_exist=True)
      from jaxcl.hub import open_clip_export
      print(open_clip_export.describe(open_clip_export.export_open_clip(
          workdir, _OUTPUT.value, overwrite=_OVERWRITE.value), _OUTPUT.value))
    else:
      _check_workdir(workdir, must_exist=True)
      from jaxcl import export
      output = _OUTPUT.value
      metadata = export.export_encoder(workdir, output, overwrite=_OVERWRITE.value,
                                       with_temperature=_WITH_TEMPERATURE.value)
      print(export.describe(metadata, output))
  except (errors.ConfigError, errors.DatasetError) as e:
    raise UsageError(str(e)) from None
  except errors.Interrupted as e:  # the run printed where it stopped
    return e.exit_code
  except errors.RunError as e:
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
  except BrokenPipeError:  # `jaxcl --help | head`: the reader has what it wanted
    os._exit(0)  # flushing stdout would fail again
  except KeyboardInterrupt as e:
    if distributed.multi_process():
      code = distributed.report_error(e)
    else:  # a second Ctrl-C, or one outside the training loop (e: a command's own words)
      print('\njaxcl: ' + (str(e) or 'stopped (Ctrl-C); nothing after the last complete '
                                     'checkpoint was saved'), file=sys.stderr, flush=True)
      sys.stdout.flush()
      # At once: an interpreter shutdown would wait for, and log errors from,
      # orbax's background writer (an unfinished checkpoint is never restored).
      os._exit(EXIT_INTERRUPTED)
  except Exception as e:
    if not distributed.multi_process():
      raise
    code = distributed.report_error(e)
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


if __name__ == '__main__':
  main()
