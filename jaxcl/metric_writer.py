"""Where metrics go: DIR/metrics.jsonl, TensorBoard event files in DIR, and a
progress bar; all from process 0 only."""

from __future__ import annotations

import json
import math

import jax
from etils import epath

from jaxcl import files


class MetricWriter:

  def __init__(self, workdir, total_steps: int, initial_step: int, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._jsonl = self._tb = self._bar = None
    if not self.enabled:
      return
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    workdir = epath.Path(workdir)
    self._jsonl = workdir.joinpath(files.METRICS_FILE).open('a')
    self._tb = SummaryWriter(str(workdir))
    self._bar = tqdm(total=total_steps, initial=initial_step, unit='step', dynamic_ncols=True,
                     disable=total_steps == initial_step)

  def advance(self, steps: int = 1, **postfix):
    if self._bar is not None:
      self._bar.update(steps)
      if postfix:
        self._bar.set_postfix({k: f'{v:.4g}' for k, v in postfix.items()}, refresh=False)

  def write(self, step: int, metrics: dict):
    """One record: {'step': step, **metrics} (floats) to every sink."""
    if not self.enabled:
      return
    record = {'step': int(step)}
    for key, value in metrics.items():
      value = float(value)
      record[key] = value if math.isfinite(value) else str(value)
      self._tb.add_scalar(key, value, int(step))
    self._jsonl.write(json.dumps(record) + '\n')
    self._jsonl.flush()
    self._tb.flush()

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
