"""jax's persistent compilation cache for every jaxcl command.

A restarted run (after a preemption, a kill, a resume on the same mesh), the
rungs of a halving sweep and the evaluation programs compile the same XLA
programs again; with the cache they load them from disk instead (on the
2-core CPU machine the digits step takes seconds to compile and a fraction
of that to load; a ViT-B/16 step takes minutes on a pod).

Where the cache lives (config key `compilation_cache_dir`):
  ''      jax's own JAX_COMPILATION_CACHE_DIR when it is set; else, for a
          workdir on an object store, the bucket's jaxcl_compilation_cache
          folder (gs://BUCKET/jaxcl_compilation_cache), which outlives a
          pod's VMs and which every host reads; else the user's cache
          folder, $XDG_CACHE_HOME/jaxcl/compilation
          (~/.cache/jaxcl/compilation), shared by every run of the user.
          Never inside the workdir: a run refused or killed during its
          first compile must leave nothing there.
  'none'  no persistent cache.
  a path  that folder (local or gs://).

With JAXCL_COMPILATION_STATS_DIR set, each process writes how many of its
compiles used the cache and how many it found there to a file of that
folder when it exits (the test suite reports its hit rate from them).
"""

from __future__ import annotations

import atexit
import json
import os
import threading

import jax
from etils import epath

from jaxcl import errors, files

OFF = 'none'
# jax's own variable; jax reads it into jax_compilation_cache_dir at import.
JAX_ENV = 'JAX_COMPILATION_CACHE_DIR'
# Programs that compile faster than this are not worth a file (jax's own default is 1 s;
# the step programs take longer, the small evaluation programs of a run pay for themselves
# from about this).
MIN_COMPILE_SECONDS = 0.5

STATS_ENV = 'JAXCL_COMPILATION_STATS_DIR'
BUCKET_FOLDER = 'jaxcl_compilation_cache'  # the default's folder on an object store

_hits = 0
_requests = 0
_lock = threading.Lock()
_listening = False


def resolve(setting: str, workdir: str | None) -> str | None:
  """The cache folder a run with `compilation_cache_dir = setting` uses, or None (off)."""
  if setting == OFF:
    return None
  if setting:
    return setting
  if os.environ.get(JAX_ENV):
    return os.environ[JAX_ENV]
  if workdir and files.is_object_store(workdir):
    scheme, _, bucket = str(workdir).split('/')[:3]
    return f'{scheme}//{bucket}/{BUCKET_FOLDER}'
  base = epath.Path(os.environ.get('XDG_CACHE_HOME') or epath.Path('~/.cache').expanduser())
  return str(base / 'jaxcl' / 'compilation')


def saved_setting(workdir: str | None) -> str:
  """compilation_cache_dir of the run saved in `workdir`, else ''."""
  if not workdir:
    return ''
  try:
    return str(json.loads((epath.Path(workdir) / files.CONFIG_FILE).read_text())
               .get('compilation_cache_dir', ''))
  except (OSError, ValueError, AttributeError):
    return ''  # no run there, or a bad config.json: the command reports it itself


def enable(setting: str, workdir: str | None, strict: bool = True) -> str | None:
  """Points jax's persistent cache at resolve(setting, workdir) (before the
  first compile of the process; jax makes the folder then); returns the
  folder, or None when off. A local folder that could not be made is a
  ConfigError when `strict` and the config named it, else no cache (a
  read-only home, or a workdir's saved setting on another machine, must not
  stop a command). Writes nothing."""
  folder = resolve(setting, workdir)
  problem = None if folder is None else _unmakeable(folder)
  if problem and setting and strict:
    raise errors.ConfigError(f'compilation_cache_dir {folder!r}: {problem}')
  if problem:
    folder = None
  jax.config.update('jax_compilation_cache_dir', folder)
  if folder is not None:
    jax.config.update('jax_persistent_cache_min_compile_time_secs',
                      min(MIN_COMPILE_SECONDS,
                          jax.config.jax_persistent_cache_min_compile_time_secs))
    listen()
  return folder


def _unmakeable(folder: str) -> str | None:
  """Why a local `folder` could not be made or written, or None."""
  if files.is_object_store(folder):
    return None  # checked by the first write; object stores have no folders to make
  path = epath.Path(folder).expanduser().absolute()
  while not path.exists():
    path = path.parent
  if not path.is_dir():
    return f'{path} is a file, not a folder'
  if not os.access(path, os.W_OK):  # a local folder's permission: nothing read or written
    return f'{path} is not writable'
  return None


def hits() -> int:
  """How many programs this process has loaded from the persistent cache so far."""
  return _hits


def folder() -> str | None:
  return jax.config.jax_compilation_cache_dir or None


def describe(from_cache: bool) -> str:
  """Where a compiled program came from, for the run's log: '(from the
  compilation cache in DIR)', '(compiled; cached in DIR)' or '(no
  compilation cache)'."""
  where = folder()
  if where is None:
    return '(no compilation cache)'
  return (f'(from the compilation cache in {where})' if from_cache else
          f'(compiled; cached in {where})')


def _on_event(event: str, **_) -> None:
  global _hits, _requests
  with _lock:
    if event == '/jax/compilation_cache/cache_hits':
      _hits += 1
    elif event == '/jax/compilation_cache/compile_requests_use_cache':
      _requests += 1


def write_stats() -> None:
  """This process's counts so far to STATS_ENV's folder (one file per process)."""
  if _requests and os.environ.get(STATS_ENV):
    path = epath.Path(os.environ[STATS_ENV]) / f'{os.getpid()}.json'
    path.write_text(json.dumps({'requests': _requests, 'hits': _hits}))


def listen() -> None:
  """Counts this process's cache hits (hits()); and its compiles for
  STATS_ENV's folder, when that is set."""
  global _listening
  if not _listening:
    jax.monitoring.register_event_listener(_on_event)
    _listening = True
    atexit.register(write_stats)
