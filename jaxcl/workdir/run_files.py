"""The files of a run in its workdir (names in jaxcl.files), beyond the
checkpoints: taking the workdir, what a run writes when it starts (config,
batch history, tokenizer, data facts), the metrics a resumed run redoes, the
skipped images, and eval.json."""

from __future__ import annotations

import contextlib
import json

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from jaxcl import config as config_lib, data, errors, files, parallel
from jaxcl.text import tokenizers
from jaxcl.workdir import lock as lock_lib, metrics_log

MAX_LISTED = 5  # skipped images named in the run's log (all go to the file)


def check_trainable_workdir(workdir) -> None:
  """ConfigError unless `workdir` is new, empty, or a jaxcl run (its
  config.json or its lock): training never writes among a user's files."""
  workdir = epath.Path(workdir)
  if not workdir.is_dir() or files.is_empty_dir(workdir):
    return
  if not (files.is_run(workdir) or (workdir / files.LOCK_DIR).exists()):
    names = sorted(p.name for p in workdir.iterdir())
    raise errors.ConfigError(
        f'workdir {workdir} holds files but is not a jaxcl workdir (no {files.CONFIG_FILE}; '
        f'it has {", ".join(names[:3])}{", ..." if len(names) > 3 else ""}); use a new or empty '
        f'directory')


@contextlib.contextmanager
def hold_workdir(workdir):
  """Creates `workdir` and holds its lock (jaxcl.lock) for the body: one
  run per workdir. Process 0 takes it for the job; every process raises
  ConfigError if the workdir is in use or cannot be written."""
  lock, error = lock_lib.WorkdirLock(workdir), None
  if jax.process_index() == 0:
    try:
      epath.Path(workdir).mkdir(parents=True, exist_ok=True)
      lock.acquire()
    except errors.ConfigError as e:
      error = e
    except OSError as e:  # not writable, read-only, full, a file on the way
      error = errors.ConfigError(f'cannot write to workdir {workdir}: '
                                 f'{e.strerror or errors.type_and_first_line(e)}')
  if jax.process_count() > 1:
    held = multihost_utils.broadcast_one_to_all(np.int32(error is None))
    if not held and error is None:
      error = errors.ConfigError(f'process 0 could not take workdir {workdir}; its '
                                 f'message says why')
  if error is not None:
    raise error
  try:
    yield lock
  finally:
    lock.release()


# ---------------------------------------------------------- batch history ---
def batch_history(workdir, batch_size: int, step: int) -> list:
  """[[first step, global batch size], ...]: the run's segments up to
  `step`, where this run continues with `batch_size`."""
  path = epath.Path(workdir) / files.BATCH_HISTORY_FILE
  if path.exists():
    history = json.loads(path.read_text())
  elif files.is_run(workdir):  # a run from before the file
    history = [[0, config_lib.load_saved(workdir).batch_size]]
  else:
    history = []
  history = [[s, b] for s, b in history if s < step]  # a fallback may have gone back
  if not history or history[-1][1] != batch_size:
    history.append([step, batch_size])
  return history


def data_position(history: list, step: int) -> tuple[int, int]:
  """(start_record, start_batch) of jaxcl.data.train_iterator for resuming
  at `step`: the records the earlier segments read, and the batches of the
  current one read so far."""
  records = sum(b * (s_next - s) for (s, b), (s_next, _) in zip(history, history[1:]))
  return records, step - history[-1][0]


# ------------------------------------------------------ the run's start ---
def write_run_start(workdir, config, history: list, tokenizer, facts: dict, step: int) -> None:
  """What a run writes before its first step (process 0): its config, batch
  history, tokenizer and data facts, and metrics.jsonl without the rows past
  `step` (a killed run logged them; the resumed run logs them again)."""
  if jax.process_index() != 0:
    return
  workdir = epath.Path(workdir)
  config_lib.save(config, workdir)
  files.write_atomically(workdir / files.BATCH_HISTORY_FILE, json.dumps(history) + '\n')
  if tokenizer is not None:
    tokenizer.save(workdir)  # travels with the checkpoints: the same ids later
  files.write_atomically(workdir / files.DATA_FACTS_FILE, json.dumps(facts, indent=1) + '\n')
  metrics_log.drop_rows_after(workdir, step)


def data_facts(info: data.DatasetInfo, extra: dict) -> dict:
  """What export needs of the data, as data_facts.json holds it: the stored
  image shape, the classes, and the method's own facts (zero-shot prompts)."""
  return {'image_shape': list(info.image_shape), 'num_classes': info.num_classes,
          'class_names': list(info.class_names), **extra}


def saved_data_facts(workdir) -> dict | None:
  """The data facts a run saved, None for a run from before the file."""
  path = epath.Path(workdir) / files.DATA_FACTS_FILE
  if not path.exists():
    return None
  try:
    facts = json.loads(path.read_text())
    info = data.DatasetInfo(tuple(int(n) for n in facts['image_shape']),
                            int(facts['num_classes']), tuple(facts['class_names']))
  except (ValueError, KeyError, TypeError) as e:
    raise errors.ConfigError(f'{path} is not a jaxcl data facts file '
                             f'({errors.type_and_first_line(e)})') from None
  return {**facts, 'info': info}


def saved_tokenizer(workdir):
  """The tokenizer a run in `workdir` saved, or None."""
  if not (epath.Path(workdir) / files.TOKENIZER_FILE).exists():
    return None
  try:
    return tokenizers.load_tokenizer(workdir)
  except (ValueError, RuntimeError, OSError) as e:  # corrupt, missing or swapped files
    raise errors.ConfigError(f'cannot load the tokenizer saved in {workdir}: '
                             f'{errors.first_line(e)}') from None


# ---------------------------------------------------------------- reports ---
def report_skipped_images(workdir, dataset: data.Dataset) -> list[str]:
  """Lines naming an image folder's empty class folders and the images it
  left out (unreadable or wrongly sized; all of them go to
  workdir/skipped_images.json), over every split the run opened."""
  sources = dataset.opened_splits()
  skipped = {split: source.skipped for split, source in sources
             if getattr(source, 'skipped', None)}
  empty = sorted({folder for _, source in sources
                  for folder in getattr(source, 'empty_classes', ())})
  lines = [f'jaxcl: class folder {folder} has no images (its class has no examples in that '
           f'split)' for folder in empty]
  if not skipped:
    return lines
  if jax.process_index() == 0:
    files.write_atomically(epath.Path(workdir) / files.SKIPPED_IMAGES_FILE,
                           json.dumps(skipped, indent=1) + '\n')
  for split, items in skipped.items():
    lines.append(f'jaxcl: {len(items)} image(s) of split {split!r} skipped (unreadable or '
                 f'wrongly sized; all listed in {files.SKIPPED_IMAGES_FILE}):')
    lines += [f'  {path}: {why}' for path, why in items[:MAX_LISTED]]
    if len(items) > MAX_LISTED:
      lines.append(f'  ... and {len(items) - MAX_LISTED} more')
  return lines


def write_eval(workdir, step: int, results: dict) -> None:
  if jax.process_index() == 0:
    files.write_atomically(epath.Path(workdir) / files.EVAL_FILE,
                           json.dumps({'step': int(step), **results}, indent=2) + '\n')


# ------------------------------------------------------------ shard streams ---
def current_stream_positions(train_iter):
  """Where every stream of the run stands (all processes' streams, int64
  [S, sources, 7]), for the checkpoint; None for random-access data."""
  if not isinstance(train_iter, data.StreamBatches):
    return None
  return _gather_int64(train_iter.positions)


def _gather_int64(local: np.ndarray) -> np.ndarray:
  """All processes' int64 rows, concatenated: gathered as two int32 halves,
  since jax (without x64) would cut them to int32."""
  halves = np.stack([local >> 31, local & (2**31 - 1)]).astype(np.int32)
  gathered = parallel.gather_to_host(np.moveaxis(halves, 0, -1)).astype(np.int64)
  return (gathered[..., 0] << 31) | gathered[..., 1]


def stream_metrics(workdir, train_iter, max_bad_fraction: float) -> tuple[dict, str | None]:
  """(metrics, stop): for streams ({}, None otherwise) 'skipped_samples', the
  bad samples skipped by all processes so far, and for a mixture
  'mixture/NAME', the share of the rows each source gave so far; `stop`
  says why the run must stop, when more than `max_bad_fraction` of all the
  samples read were bad (every process decides alike). Each process's first
  bad samples (shard and key) go to workdir/skipped_samples[.pN].json."""
  if not isinstance(train_iter, data.StreamBatches):
    return {}, None
  read, skipped, rows = _gather_int64(train_iter.counts()[None]).sum(axis=0)
  if train_iter.bad:
    index = jax.process_index()
    name = files.SKIPPED_SAMPLES_FILE.replace('.json', f'.p{index}.json' if index else '.json')
    files.write_atomically(epath.Path(workdir) / name, json.dumps(
        {'read': int(read.sum()), 'skipped': int(skipped.sum()), 'first': train_iter.bad},
        indent=1) + '\n')
  metrics = {'skipped_samples': float(skipped.sum())}
  if len(rows) > 1:
    metrics.update({f'mixture/{name}': float(count / max(1, rows.sum()))
                    for name, count in zip(train_iter.names, rows)})
  stop = None
  if (read.sum() >= data.MIN_SAMPLES_FOR_BAD_FRACTION
      and skipped.sum() > max_bad_fraction * read.sum()):
    first = f'; first: {train_iter.bad[0]}' if train_iter.bad else ''
    stop = (f'{skipped.sum()} of the {read.sum()} samples read are bad, more than '
            f'dataset.max_bad_fraction={max_bad_fraction} (all listed in '
            f'{files.SKIPPED_SAMPLES_FILE}){first}')
  return metrics, stop
