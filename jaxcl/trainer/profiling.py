"""`profile_steps=(A, B)`: a jax.profiler trace of training steps A..B, for
TensorBoard's profile tab (`tensorboard --logdir WORKDIR`).

jax.profiler.start_trace(DIR) writes DIR/plugins/profile/<time>/<host>.xplane.pb
(files.PROFILE_DIR): with DIR the workdir itself, TensorBoard finds the trace
next to the scalars jaxcl.workdir.metric_writer writes there. Only process 0 traces:
every process tracing would write one folder each into the same workdir, and
all run the same program.
"""

from __future__ import annotations

import jax


class StepProfiler:
  """Starts the trace just before step A runs and stops it once step B (or
  the last step of the run) has finished on the device. Steps are 1-based,
  as metrics.jsonl counts them; a run resumed past A traces nothing."""

  def __init__(self, workdir, profile_steps, total_steps: int, enabled: bool | None = None):
    self._workdir = workdir
    self._first, self._last = tuple(profile_steps) or (0, 0)
    self._last = min(self._last, total_steps)
    self.enabled = bool(profile_steps) and (jax.process_index() == 0 if enabled is None
                                            else enabled)
    self.tracing = False

  def before(self, step: int) -> None:
    """Called before step `step` runs (its batch read included)."""
    if self.enabled and step == self._first and not self.tracing:
      jax.profiler.start_trace(str(self._workdir))
      self.tracing = True

  def after(self, step: int, state) -> None:
    """Called once step `step` has been dispatched; `state` is its output."""
    if self.tracing and step >= self._last:
      jax.block_until_ready(state)  # the trace holds the steps' device work
      self.close()

  def close(self) -> None:
    """Stops a trace in progress and writes it (also when the loop ends by an
    exception); nothing otherwise."""
    if self.tracing:
      self.tracing = False
      jax.profiler.stop_trace()
