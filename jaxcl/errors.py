"""jaxcl's exceptions, and how it turns an exception into one line.

Two kinds reach the user: bad input (ConfigError, DatasetError: exit code 2,
nothing written) and a run that stopped for a stated reason (RunError: exit
code 1; Interrupted: 0 after SIGTERM, 130 after Ctrl-C, its step saved).
"""

from __future__ import annotations


class ConfigError(ValueError):
  """An invalid config or command; the message names the key and the problem."""


class UsageError(ConfigError):
  """Bad command-line input (a flag, a command, a path): one line, exit 2."""


class ConfigFileError(ConfigError):
  """A config file that does not load, or an override naming no key."""


class WorkdirLocked(ConfigError):
  """Another live run holds the workdir (exit code 2)."""


class DatasetError(ValueError):
  """A dataset that cannot be found or read; the message says which and why."""


class RunError(RuntimeError):
  """A run stopped for a reason its message states in one line (exit 1)."""


class NonFiniteError(RunError):
  """A step's loss or gradient norm was NaN or infinite (nonfinite=stop)."""


class CheckpointError(RunError):
  """No checkpoint in the workdir restores, or one cannot be written."""


class Interrupted(Exception):
  """A signal stopped the run after its current step was saved; the message
  says where it resumes. exit_code: 0 after SIGTERM (a preemption the
  scheduler asked for), 128 + signal number otherwise (130 for Ctrl-C)."""

  def __init__(self, message: str, exit_code: int):
    super().__init__(message)
    self.exit_code = exit_code


def check(ok: bool, message: str) -> None:
  """Raises ConfigError(message) unless `ok`: one line per invalid value."""
  if not ok:
    raise ConfigError(message)


def first_line(e: BaseException, default: str | None = None) -> str:
  """The first line of `e`'s message; `default` (the exception's type name
  unless given) when the message is empty."""
  lines = str(e).strip().splitlines()
  if lines:
    return lines[0]
  return type(e).__name__ if default is None else default


def type_and_first_line(e: BaseException, limit: int = 300) -> str:
  """'Type: first line' of an error from storage or orbax, cut at `limit`
  characters (TensorStore appends pages of details)."""
  text = first_line(e, '').split('. See full TensorStore details')[0]
  text = f'{type(e).__name__}: {text}' if text else type(e).__name__
  return text if len(text) <= limit else text[:limit] + '...'
