"""Run guards: stopping cleanly on a signal (Preemption) and never
continuing past, or checkpointing, a non-finite step (FiniteCheck)."""

from __future__ import annotations

import math
import os
import signal
import sys

import jax
import numpy as np
from jax._src import distributed as jax_distributed
from jax.experimental import multihost_utils

from jaxcl import errors


class FiniteCheck:
  """Checks each step's loss and gradient norm, one step late: the loop
  keeps one step in flight, so step s is read once step s + 1 has been
  dispatched. `settle()` checks the pending step now (before a checkpoint,
  and at the end). Counts the steps skipped under nonfinite=skip; raises
  NonFiniteError under nonfinite=stop."""

  def __init__(self, nonfinite: str, manager):
    """nonfinite: config.nonfinite, 'stop' or 'skip'."""
    self._skip = nonfinite == 'skip'
    self._manager = manager
    self._pending = None  # (step, metrics) not checked yet
    self.skipped = 0

  def push(self, step: int, metrics) -> None:
    """Step `step` was dispatched with `metrics`; checks the one before."""
    self.settle()
    self._pending = (step, metrics)

  def settle(self) -> None:
    if self._pending is not None:
      step, metrics = self._pending
      self._pending = None
      self.skipped += self._check(step, metrics)

  def _check(self, step: int, metrics) -> int:
    values = jax.device_get({k: metrics[k] for k in ('loss', 'grad_norm', 'skipped')
                             if k in metrics})
    if self._skip:
      return int(values['skipped'])
    if math.isfinite(values['loss']) and math.isfinite(values['grad_norm']):
      return 0
    try:
      self._manager.wait_until_finished()  # the message names the last checkpoint written
    except Exception:  # reported by the run's own message
      pass
    raise errors.NonFiniteError(
        f'step {step}: loss {values["loss"]} / gradient norm {values["grad_norm"]} is not '
        f'finite; training stopped, nothing after step {step - 1} was saved; the last good '
        f'checkpoint is step {self._manager.latest_step()} (set nonfinite=skip to skip such '
        f'steps)')


class Preemption:
  """SIGTERM (what TPU and SLURM preemption send) or Ctrl-C (SIGINT) asks
  the loop to finish its step, checkpoint it and stop (errors.Interrupted:
  exit 0 after SIGTERM, 130 after Ctrl-C). A second Ctrl-C raises
  KeyboardInterrupt at once.

  One process: Python signal handlers set a flag. Several processes:
  jax.distributed's preemption sync manager catches SIGTERM on any of them
  and `reached_preemption_sync_point` turns true on all of them at the same
  step, so they save the same checkpoint together. A Python handler there
  would replace jax's, and a process that stopped alone would leave the
  others waiting in a collective."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.received = None  # the first signal's number
    self._previous = {}
    self.native = (jax.process_count() > 1
                   and jax_distributed.global_state.preemption_sync_manager is not None)
    if self.native:
      return
    for signum in self.SIGNALS if jax.process_count() == 1 else (signal.SIGTERM,):
      try:
        self._previous[signum] = signal.signal(signum, self._on_signal)
      except ValueError:  # not the main thread: leave signals to the caller
        pass

  def _on_signal(self, signum, frame):
    del frame
    if signum == signal.SIGINT and self.received == signal.SIGINT:
      raise KeyboardInterrupt  # the second Ctrl-C: stop now
    if self.received is None:
      self.received = signum
    if signum == signal.SIGINT:
      # os.write, not print: the handler may have interrupted a print.
      os.write(sys.stderr.fileno(), b'\njaxcl: Ctrl-C: finishing this step to save it (Ctrl-C '
                                    b'again to stop at once)\n')

  def close(self) -> None:
    """Gives the signals back to their previous handlers."""
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}

  @property
  def exit_code(self) -> int:
    return 0 if self.received in (None, signal.SIGTERM) else 128 + self.received

  def describe(self) -> str:
    return 'interrupted (Ctrl-C)' if self.received == signal.SIGINT else 'preempted (SIGTERM)'

  def reached(self, step: int) -> bool:
    """Called by every process at every step."""
    if self.native:
      return bool(multihost_utils.reached_preemption_sync_point(step))
    if jax.process_count() > 1:  # jax's preemption service is off: share the flags (~2 ms)
      return bool(np.any(multihost_utils.process_allgather(np.int32(self.received is not None))))
    return self.received is not None
