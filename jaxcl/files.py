"""The files of a workdir, their names, and how jaxcl writes them.

Every file jaxcl writes whole goes through `write_atomically`: readers (and
a rerun after a crash) see the old file or the new one, never a part of
either. Only the append-only logs (jaxcl.workdir.metrics_log, TensorBoard events) and
orbax's checkpoints, which are atomic in their own way, are written
otherwise.
"""

from __future__ import annotations

import uuid

import fsspec
from etils import epath

# gs:// paths go through gcsfs, whose listings cache never expires by default:
# a process would not see the checkpoints tensorstore (or another host)
# wrote since it last looked. Every listing asks the store.
for _protocol in ('gs', 'gcs'):
  fsspec.config.conf.setdefault(_protocol, {})['use_listings_cache'] = False

CONFIG_FILE = 'config.json'  # the config a run was trained with
EVAL_FILE = 'eval.json'  # the final (or `jaxcl eval`'s) evaluation
METRICS_FILE = 'metrics.jsonl'  # one JSON row per log step (jaxcl.workdir.metrics_log)
METRICS_PARTS_DIR = 'metrics.jsonl.d'  # the same rows on object stores, in parts
CHECKPOINT_DIR = 'checkpoints'
CHECKPOINT_DONE = 'commit_success.txt'  # orbax's marker of a complete checkpoint
BATCH_HISTORY_FILE = 'batch_history.json'
SKIPPED_IMAGES_FILE = 'skipped_images.json'
SKIPPED_SAMPLES_FILE = 'skipped_samples.json'  # shard streams' first bad samples
SWEEP_JSON, SWEEP_CSV, SWEEP_PNG = 'sweep.json', 'sweep.csv', 'sweep.png'  # jaxcl sweep
SWEEP_FILES = (SWEEP_JSON, SWEEP_CSV, SWEEP_PNG)
TOKENIZER_FILE = 'tokenizer.json'  # two towers: the tokenizer's spec
SENTENCEPIECE_FILE = 'tokenizer.model'  # and its SentencePiece model, if any
# or its CLIP BPE vocabulary, as given: open_clip's merges or a Hugging Face tokenizer.json
CLIP_BPE_GZ_FILE, CLIP_BPE_JSON_FILE = 'tokenizer.bpe.txt.gz', 'tokenizer.bpe.json'
CLIP_BPE_FILES = (CLIP_BPE_GZ_FILE, CLIP_BPE_JSON_FILE)
DATA_FACTS_FILE = 'data_facts.json'  # what export needs of the data (jaxcl.workdir.run_files)
TEACHER_FILE = 'teacher.json'  # distill.teacher's workdir and step (jaxcl.trainer.teacher)
UNRESTORABLE_DIR = 'unrestorable_checkpoints'  # checkpoints set aside (jaxcl.trainer.checkpoints)
LOCK_DIR = 'jaxcl.lock'  # held by the run in progress (jaxcl.workdir.lock)
WALL_FILE = 'wall_time.json'  # a sweep run's training time
REPORT_DIR, REPORT_FILE = 'report', 'report.html'
# the newest step's zero-shot classifiers (jaxcl.evaluation.zeroshot_cache)
ZEROSHOT_CACHE_FILE = 'zeroshot_classifiers.npz'
COMPILED_STEP_FILE = 'compiled_step.json'  # the step's memory and FLOPs (jaxcl.trainer.step_memory)
# profile_steps' traces: jax.profiler.start_trace(WORKDIR) writes plugins/profile/<time>/,
# where `tensorboard --logdir WORKDIR` finds them (jaxcl.trainer.profiling)
PROFILE_DIR = 'plugins'
# wandb.project: wandb's own files, its offline runs (jaxcl.workdir.metric_writer)
WANDB_DIR = 'wandb'
# Everything jaxcl keeps at the top of a workdir (files and folders), with
# what each holds: nothing else, `jaxcl export --output` included, may write
# there under these names. The README's "What a run writes" is made from
# this list (docs/generate.py).
WORKDIR_CONTENTS = (
    (METRICS_FILE, 'one JSON row per log step: `loss`, `temperature` (τ) and '
     '`inv_temperature`, `contrastive_top1`/`_top5`, `grad_norm`, `learning_rate`, '
     '`examples_per_sec`, `step_time`, `data_wait_fraction`, the τ diagnostics, `bias` '
     '(SigLIP); evaluation rows add `knn_top1`, `linear_top1` (SimCLR) or `zeroshot_top1/5`, '
     '`i2t_r1/5/10`, `t2i_r1/5/10` (CLIP, SigLIP); beside it, TensorBoard event files'),
    (METRICS_PARTS_DIR, 'the same rows on object stores (gs://), in parts written whole'),
    (EVAL_FILE, 'the final evaluation (or `jaxcl eval`\'s) and its step'),
    (CHECKPOINT_DIR, 'orbax checkpoints of the whole train state, `STEP/`, the newest '
     '`keep_checkpoints`'),
    (CONFIG_FILE, 'the config the run was trained with'),
    (TOKENIZER_FILE, 'two towers: the tokenizer\'s spec, used again by eval, export and a resume'),
    (SENTENCEPIECE_FILE, 'and its SentencePiece model, if it has one'),
    (CLIP_BPE_GZ_FILE, 'or its CLIP BPE merges, as given (open_clip\'s file)'),
    (CLIP_BPE_JSON_FILE, 'or a Hugging Face tokenizer.json of CLIP BPE, as given'),
    (TEACHER_FILE, 'distill.teacher: the teacher\'s workdir and the step of its weights '
     'that teach the run, pinned for every resume'),
    (DATA_FACTS_FILE, 'what export needs of the data (image shape, classes, zero-shot '
     'prompts), so a run exports with its dataset gone'),
    (COMPILED_STEP_FILE, 'the compiled step\'s memory per device and FLOPs per example, '
     'known before the first step; its compile time and whether the compilation cache had it'),
    (BATCH_HISTORY_FILE, 'the global batch size from each step on (`--allow_batch_change`)'),
    (ZEROSHOT_CACHE_FILE, 'two towers: the zero-shot classifiers of the newest evaluated step'),
    (LOCK_DIR, 'while a run holds the workdir'),
    (UNRESTORABLE_DIR, 'checkpoints that failed to restore, set aside (never deleted)'),
    (SKIPPED_IMAGES_FILE, 'an image folder\'s unusable images'),
    (SKIPPED_SAMPLES_FILE, 'shard streams\' first bad samples'),
    (PROFILE_DIR, '`profile_steps`: the profiler\'s traces (`tensorboard --logdir DIR`)'),
    (WANDB_DIR, '`wandb.mode=offline`: wandb\'s own files, for `wandb sync`'),
    (REPORT_DIR, '`jaxcl report`: its plots'),
    (REPORT_FILE, '`jaxcl report`: the page that shows them'),
    (WALL_FILE, 'a sweep\'s run: its training time'),
    (SWEEP_JSON, '`jaxcl sweep`: the sweep\'s record (search, candidates, config), in the '
     'sweep\'s folder, whose runs are `tau-*/`'),
    (SWEEP_CSV, '`jaxcl sweep`: its table'),
    (SWEEP_PNG, '`jaxcl sweep`: its plot'),
)
WORKDIR_NAMES = frozenset(name for name, _ in WORKDIR_CONTENTS)


def text_artifact_path(output) -> epath.Path:
  """Where a two-tower export puts the text embedder: FILE's name + '.text'."""
  output = epath.Path(output)
  return output.with_name(output.stem + '.text' + output.suffix)


def tokenizer_artifact_path(output, name: str) -> epath.Path:
  """Where a two-tower export copies the tokenizer's file `name` (SENTENCEPIECE_FILE,
  one of CLIP_BPE_FILES): FILE's stem + '.' + name."""
  output = epath.Path(output)
  return output.with_name(f'{output.stem}.{name}')


def write_atomically(path, data: str | bytes) -> None:
  """Writes `data` to `path` through a temporary file in the same folder,
  renamed into place once complete."""
  write_all_atomically({path: data.encode() if isinstance(data, str) else data})


def write_all_atomically(contents: dict) -> None:
  """Writes {path: bytes} so that either all files are in place or none is
  changed: every one goes to a temporary name first; the renames come once
  all are written, in the order given (put the file that marks the set
  complete last). On object stores, where each upload is whole but a rename
  is a copy and a delete, each file is uploaded in place in the order given:
  a kill between two uploads leaves the first new and the second old, so
  there only the last file (the marker) says the set is complete."""
  if all(is_object_store(path) for path in contents):
    for path, data in contents.items():
      epath.Path(path).write_bytes(data)
    return
  temps = {}
  try:
    for path, data in contents.items():
      path = epath.Path(path)
      path.parent.mkdir(parents=True, exist_ok=True)
      temps[path] = path.parent / f'.{path.name}.{uuid.uuid4().hex[:8]}.tmp'
      temps[path].write_bytes(data)
  except BaseException:
    for tmp in temps.values():
      try:
        tmp.unlink(missing_ok=True)
      except OSError:  # the original error is the one to report
        pass
    raise
  for path, tmp in temps.items():
    tmp.replace(path)


def move_folder(source, target) -> None:
  """Renames folder `source` to `target`. On object stores, which have no
  folders to rename, every object is copied (on the server) and then the
  source deleted: a kill midway leaves the source whole."""
  source, target = epath.Path(source), epath.Path(target)
  if not is_object_store(source):
    source.rename(target)
    return
  for path in files_under(source):
    path.copy(target / str(path)[len(str(source)):].lstrip('/'))
  source.rmtree()


def files_under(folder) -> list[epath.Path]:
  """Every file under `folder`, at any depth (object stores refuse a
  recursive glob, so this walks the listing)."""
  found, pending = [], [epath.Path(folder)]
  while pending:
    for path in pending.pop().iterdir():
      if path.is_dir():
        pending.append(path)
      else:
        found.append(path)
  return found


def is_run(path) -> bool:
  """Whether `path` holds a jaxcl run (its config.json)."""
  return (epath.Path(path) / CONFIG_FILE).exists()


def is_sweep(path) -> bool:
  """Whether `path` holds a jaxcl sweep (sweep.json, or runs named tau-*)."""
  path = epath.Path(path)
  if (path / SWEEP_JSON).exists():
    return True
  return path.is_dir() and any(p.name.startswith('tau-') and is_run(p) for p in path.iterdir())


def is_empty_dir(path) -> bool:
  path = epath.Path(path)
  return path.is_dir() and not any(True for _ in path.iterdir())


def is_object_store(path) -> bool:
  """Whether `path` is on an object store (gs://, s3://): no appends, no
  renames (a copy and a delete), no exclusive directory creation."""
  return '://' in str(path)


def same_file(a, b) -> bool:
  """Whether two local paths name the same file (both resolved); False for
  object-store paths, whose names are compared as written."""
  if is_object_store(a) or is_object_store(b):
    return str(a).rstrip('/') == str(b).rstrip('/')
  return epath.Path(a).resolve() == epath.Path(b).resolve()
