"""One run per workdir: `jaxcl train` holds WORKDIR/jaxcl.lock while it runs.

The lock is a directory, because creating a directory is atomic on local
and network file systems (two runs racing for a workdir: exactly one wins).
Inside, holder.json names the holder (host, pid, process start time, start
and heartbeat times); a daemon thread refreshes the heartbeat every
HEARTBEAT_S seconds while the run lives.

A lock is stale, and the next run takes it over, when
- its holder ran on this host and that process is gone (or the pid now
  belongs to another process: the start times differ), or
- its holder ran on another host and its heartbeat is older than STALE_S
  (a killed host cannot refresh it).
On object stores (gs://), where directory creation is not exclusive, the
lock still stops a second run started after the first; two runs started in
the same second are not excluded.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid

from etils import epath

from jaxcl import errors, files

LOCK_DIR = files.LOCK_DIR
HOLDER_FILE = 'holder.json'
HEARTBEAT_S = 30.0
STALE_S = 300.0


WorkdirLocked = errors.WorkdirLocked


def _process_start(pid: int) -> str | None:
  """The kernel's start time of process `pid` (Linux), None if unknown or gone."""
  try:
    with open(f'/proc/{pid}/stat') as f:  # the local /proc, not a workdir path
      return f.read().rsplit(')', 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by someone else
    return True
  return True


def describe(holder: dict) -> str:
  if not holder:
    return 'a run whose record is unreadable'
  started = time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder.get('started', 0)))
  return f'pid {holder.get("pid")} on host {holder.get("host")} (started {started})'


def _read_holder(lock_dir) -> dict | None:
  try:
    return json.loads((lock_dir / HOLDER_FILE).read_text())
  except FileNotFoundError:
    return None
  except (OSError, ValueError):
    return {}


class WorkdirLock:
  """acquire() / release(); a context manager. `took_over` is the holder
  record of a stale lock this run replaced, if any."""

  def __init__(self, workdir):
    self.path = epath.Path(workdir) / LOCK_DIR
    self.token = uuid.uuid4().hex
    self.took_over: dict | None = None
    self.lost: dict | None = None  # the run that took the lock over while this one stalled
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  # ---------------------------------------------------------------- holder ---
  def _record(self) -> dict:
    now = time.time()
    return {'host': socket.gethostname(), 'pid': os.getpid(),
            'process_start': _process_start(os.getpid()), 'started': now, 'heartbeat': now,
            'token': self.token}

  def holder(self) -> dict | None:
    """The current holder's record; {} for a lock whose record is unreadable
    (being written, or a killed writer); None when unlocked."""
    record = _read_holder(self.path)
    if record is None and self.path.exists():
      return {}
    return record

  def _stale(self, holder: dict) -> bool:
    if not holder:  # no readable record: stale once nothing touched the lock for STALE_S
      try:
        return time.time() - self.path.stat().mtime > STALE_S
      except OSError:
        return True
    if holder.get('host') == socket.gethostname():
      pid = int(holder.get('pid', -1))
      if not _alive(pid):
        return True
      start, start_now = holder.get('process_start'), _process_start(pid)
      if start is None or start_now is None:  # no /proc: our own pid can only be a reuse
        return pid == os.getpid()
      return start != start_now  # the pid was reused (containers restart with small pids)
    return time.time() - float(holder.get('heartbeat', 0)) > STALE_S

  def _write(self, record: dict) -> None:
    tmp = self.path / f'{HOLDER_FILE}.{self.token}.tmp'
    tmp.write_text(json.dumps(record))
    tmp.replace(self.path / HOLDER_FILE)  # readers never see half a record

  def _in_use(self, holder: dict) -> WorkdirLocked:
    return WorkdirLocked(
        f'{self.path.parent} is in use by a live jaxcl run: {describe(holder)}'
        f'{"" if holder else " (holder unknown)"}; wait for it, stop it, or use another '
        f'--workdir')

  def check_free(self) -> None:
    """Raises WorkdirLocked now if a live run holds the lock: a cheap look
    before expensive set-up (compiling the step); acquire() decides for good."""
    holder = self.holder()
    if holder is not None and not self._stale(holder):
      raise self._in_use(holder)

  # ------------------------------------------------------------ acquire ----
  def acquire(self) -> WorkdirLock:
    for _ in range(3):  # a race with another run taking over the same stale lock
      try:
        self.path.mkdir(parents=True, exist_ok=False)
      except FileExistsError:
        holder = self.holder()
        if holder is None:
          continue  # released meanwhile
        if not self._stale(holder):
          raise self._in_use(holder) from None
        stale = self.path.parent / f'{LOCK_DIR}.stale-{self.token}'
        try:
          self.path.rename(stale)
        except OSError:  # another run moved it first
          continue
        moved = _read_holder(stale)
        if moved != holder:  # another run took it over meanwhile: ours is not to move
          try:
            stale.rename(self.path)
          except OSError:
            pass
          raise WorkdirLocked(f'{self.path.parent} was just taken by another run: '
                              f'{describe(moved or {})}')
        stale.rmtree(missing_ok=True)
        self.took_over = holder
        continue
      record = self._record()
      try:
        self._write(record)
      except OSError:  # a full disk: no half-made lock may block the next run
        self.path.rmtree(missing_ok=True)
        raise
      if self.holder().get('token') != self.token:  # object stores: someone else wrote last
        raise WorkdirLocked(f'{self.path.parent} was taken by another run that started at '
                            f'the same time: {describe(self.holder())}')
      self._thread = threading.Thread(target=self._heartbeat, args=(record,), daemon=True,
                                      name='jaxcl-lock-heartbeat')
      self._thread.start()
      return self
    raise WorkdirLocked(f'{self.path.parent}: could not take its lock {self.path}')

  def _heartbeat(self, record: dict) -> None:
    while not self._stop.wait(HEARTBEAT_S):
      current = self.holder()
      if current and current.get('token') != self.token:  # stalled past STALE_S, taken over
        self.lost = current
        return
      record['heartbeat'] = time.time()
      try:
        self._write(record)
      except OSError:  # a full disk or a network blip: the next beat retries
        pass

  def release(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None
      holder = self.holder()
      if holder and holder.get('token') == self.token:
        try:
          self.path.rmtree(missing_ok=True)
        except OSError:  # a lost mount: the lock goes stale and is taken over
          pass

  def __enter__(self) -> WorkdirLock:
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()
