"""Multi-process start-up: one jaxcl process per host (TPU pod) or per GPU
(SLURM), joined by `jax.distributed.initialize` before any device is used.

- Explicit: `--coordinator_address HOST:PORT --num_processes N --process_id I`
  (any cluster, or several local processes on one machine).
- TPU pod slices and SLURM jobs with more than one task: detected from the
  environment; `jax.distributed.initialize()` then finds the coordinator and
  the process's rank itself.

On CPUs the processes' collectives go through gloo.
"""

from __future__ import annotations

import os
import sys
import traceback

from jaxcl import errors


def cluster_detected() -> str | None:
  """'tpu pod' or 'slurm' when this process is one of several the
  environment describes, else None."""
  hosts = os.environ.get('TPU_WORKER_HOSTNAMES', '')
  if ',' in hosts or os.environ.get('MEGASCALE_COORDINATOR_ADDRESS'):
    return 'tpu pod'
  if os.environ.get('SLURM_JOB_ID') and int(os.environ.get('SLURM_NTASKS', '1') or 1) > 1:
    return 'slurm'
  return None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, heartbeat_timeout_s: int = 100) -> str | None:
  """Joins the job's processes; returns how ('flags', 'tpu pod', 'slurm') or
  None for a single-process run. Must run before jax touches a device.
  heartbeat_timeout_s: a process silent this long (a hung or vanished host)
  is declared dead, and the others stop instead of waiting for it."""
  explicit = (coordinator_address, num_processes, process_id)
  if any(v is not None for v in explicit) and not all(v is not None for v in explicit):
    raise ValueError('--coordinator_address, --num_processes and --process_id go together')
  import jax  # noqa: PLC0415  (this module loads no jax: cli calls multi_process at every exit)
  if coordinator_address is not None:
    if not 0 <= process_id < num_processes:
      raise ValueError(f'--process_id {process_id} must be in [0, --num_processes '
                       f'{num_processes})')
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               heartbeat_timeout_seconds=heartbeat_timeout_s)
    return 'flags'
  how = cluster_detected()
  if how is not None:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat_timeout_s)
  return how


def multi_process() -> bool:
  """Whether jax.distributed has joined this process to others."""
  if 'jax' not in sys.modules:
    return False
  import jax  # noqa: PLC0415  (loaded already: see above)
  return jax.distributed.is_initialized() and jax.process_count() > 1


def report_error(e: BaseException) -> int:
  """One line on stderr for an error in one process of several (a lost
  process named as such, a bug with its traceback); returns exit code 1."""
  import jax  # noqa: PLC0415  (as in initialize)
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
