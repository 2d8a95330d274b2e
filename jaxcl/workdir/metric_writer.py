"""Where metrics go: the metrics log (DIR/metrics.jsonl, jaxcl.workdir.metrics_log),
TensorBoard event files in DIR, a progress bar, and Weights & Biases when
wandb.project is set; all from process 0 only."""

from __future__ import annotations

import math
import secrets
import sys
import tempfile

import jax
import numpy as np
from etils import epath
from tqdm import tqdm

from jaxcl import errors, files
from jaxcl.workdir import metrics_log

WANDB_ID_FILE = 'jaxcl_run_id'  # in WORKDIR/wandb: the run's wandb id
# On object stores an event file is uploaded whole at each flush: a new file
# every this many records keeps each upload small.
TB_RECORDS_PER_FILE = 500


def _summary_writer_class():
  """tensorboardX's SummaryWriter, imported without torch: tensorboardX
  imports torch, when it is installed, only to accept torch tensors, which
  jaxcl never logs, and that import costs ~2 s of CPU at every start."""
  torch_absent = 'torch' not in sys.modules
  if torch_absent:
    sys.modules['torch'] = None  # `import torch` raises ImportError, which tensorboardX expects
  try:
    from tensorboardX import SummaryWriter
  finally:
    if torch_absent:
      del sys.modules['torch']
  return SummaryWriter


class _EventFiles:
  """TensorBoard event files in `workdir`, written by tensorboardX. An object
  store cannot append, so there they are written in a local folder and each
  flush uploads the file that grew, whole; a new file every
  TB_RECORDS_PER_FILE records keeps each upload small. (tensorboardX's own
  gs:// writer uploads the same way, but again for every file at exit,
  retrying for minutes when the store cannot be reached.)"""

  def __init__(self, workdir: epath.Path):
    summary_writer = _summary_writer_class()
    self._remote = workdir if files.is_object_store(workdir) else None
    self._dir = epath.Path(tempfile.mkdtemp(prefix='jaxcl-tensorboard-') if self._remote
                           else workdir)
    self._new = lambda suffix: summary_writer(str(self._dir), filename_suffix=suffix)
    self.writer = self._new('')
    self._records, self._uploaded = 0, {}

  def flush(self) -> None:
    self.writer.flush()
    if self._remote is None:
      return
    self._records += 1
    if self._records % TB_RECORDS_PER_FILE == 0:
      self.writer.close()
      self.writer = self._new(f'.{self._records}')  # another name, even in the same second
    self._upload()

  def _upload(self) -> None:
    for path in self._dir.iterdir():
      size = path.stat().length
      if self._uploaded.get(path.name) != size:
        (self._remote / path.name).write_bytes(path.read_bytes())
        self._uploaded[path.name] = size

  def close(self) -> None:
    self.writer.close()
    if self._remote is not None:
      self._upload()
      self._dir.rmtree()


class MetricWriter:
  """wandb_config: the config's `wandb` group (project '': no wandb);
  run_config: the flat config, which the wandb run records."""

  def __init__(self, workdir, total_steps: int, initial_step: int, enabled: bool | None = None,
               *, wandb_config=None, run_config: dict | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._jsonl = self._tb = self._bar = self._wandb = None
    if not self.enabled:
      return
    workdir = epath.Path(workdir)
    self._wandb = _wandb_run(workdir, wandb_config, run_config or {})  # first: it may fail
    self._jsonl = metrics_log.MetricsLog(workdir, initial_step)
    self._tb = _EventFiles(workdir)
    self._bar = tqdm(total=total_steps, initial=initial_step, unit='step', dynamic_ncols=True,
                     disable=total_steps == initial_step)

  def advance(self, steps: int = 1, **postfix):
    if self._bar is not None:
      self._bar.update(steps)
      if postfix:
        self._bar.set_postfix({k: f'{v:.4g}' for k, v in postfix.items()}, refresh=False)

  def write(self, step: int, metrics: dict):
    """One record: {'step': step, **metrics} (floats) to every sink; a
    metric that is an array (per-example τ) goes to TensorBoard as a
    histogram only."""
    if not self.enabled:
      return
    record = {'step': int(step)}
    arrays = {k: np.asarray(v) for k, v in metrics.items() if np.ndim(v)}
    metrics = {k: v for k, v in metrics.items() if k not in arrays}
    for key, values in arrays.items():
      self._tb.writer.add_histogram(key, values, int(step))
    for key, value in metrics.items():
      value = float(value)
      record[key] = value if math.isfinite(value) else str(value)
      self._tb.writer.add_scalar(key, value, int(step))
    self._jsonl.write(record)
    self._tb.flush()
    if self._wandb is not None:
      self._wandb.log({k: float(v) for k, v in metrics.items()}, step=int(step))

  def print(self, message: str):
    if not self.enabled:
      return
    if self._bar is not None and not self._bar.disable:
      self._bar.write(message)
    else:
      print(message, flush=True)

  def close(self):
    if not self.enabled:
      return
    self._bar.close()
    self._tb.close()
    self._jsonl.close()
    if self._wandb is not None:  # closed once: a failure may close the writer again
      run, self._wandb = self._wandb, None
      run.finish()


def wandb_run_id(workdir: epath.Path) -> str:
  """The wandb run id of the run in `workdir`: made at random by its first
  start and kept in WORKDIR/wandb/jaxcl_run_id, so a resumed run continues
  its wandb run and a new run in a reused path (or the same path on another
  machine) starts its own."""
  path = workdir / files.WANDB_DIR / WANDB_ID_FILE
  if path.exists():
    return path.read_text().strip()
  run_id = 'jaxcl-' + secrets.token_hex(8)
  path.parent.mkdir(parents=True, exist_ok=True)
  files.write_atomically(path, run_id + '\n')
  return run_id


def _wandb_run(workdir: epath.Path, settings, run_config: dict):
  """The wandb run of `workdir` when settings.project is set, else None
  (wandb is imported only then: it is optional)."""
  if settings is None or not settings['project']:
    return None
  import wandb  # train checked it is installed
  local = '://' not in str(workdir)  # wandb keeps its files on a local disk
  try:
    return wandb.init(
        project=settings['project'], entity=settings['entity'] or None,
        name=settings['name'] or run_config.get('name') or workdir.name,
        dir=str(workdir) if local else None, config=run_config, mode=settings['mode'],
        resume='allow', id=wandb_run_id(workdir))
  except Exception as e:  # no login, no network: one line
    raise errors.RunError(f'wandb.init failed ({errors.type_and_first_line(e)}); log in with '
                          f'`wandb login` or set --config.wandb.mode=offline') from None
