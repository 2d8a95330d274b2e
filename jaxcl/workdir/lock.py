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
On Google Cloud Storage (gs://), where creating a directory is not
exclusive, the holder record is one object written with GCS's
preconditions: created only if absent (ifGenerationMatch=0), and replaced
(heartbeat, takeover) or deleted only if unchanged since it was read (its
generation), so of two runs racing for a workdir exactly one wins there too.
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


class _Lock:
  """What both kinds of lock share: the holder record, staleness, the
  heartbeat thread; acquire() / release(), a context manager. `took_over`
  is the holder record of a stale lock this run replaced, if any."""

  def __init__(self, workdir):
    self.path = epath.Path(workdir) / LOCK_DIR
    self.token = uuid.uuid4().hex
    self.took_over: dict | None = None
    self.lost: dict | None = None  # the run that took the lock over while this one stalled
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def _record(self) -> dict:
    now = time.time()
    return {'host': socket.gethostname(), 'pid': os.getpid(),
            'process_start': _process_start(os.getpid()), 'started': now, 'heartbeat': now,
            'token': self.token}

  def holder(self) -> dict | None:
    """The current holder's record; {} for a lock whose record is unreadable
    (being written, or a killed writer); None when unlocked."""
    raise NotImplementedError

  def _modified(self) -> float:
    """When the lock was last written (seconds since the epoch)."""
    raise NotImplementedError

  def _stale(self, holder: dict) -> bool:
    if not holder:  # no readable record: stale once nothing touched the lock for STALE_S
      try:
        return time.time() - self._modified() > STALE_S
      except (OSError, LookupError):
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

  def _take(self, record: dict) -> None:
    """Makes `record` the holder, taking over a stale lock; WorkdirLocked if
    a live run holds it or wins a race for it."""
    raise NotImplementedError

  def _beat(self, record: dict) -> bool:
    """Writes the refreshed `record`; False if another run took the lock."""
    raise NotImplementedError

  def _remove(self) -> None:
    """Removes the lock if this run still holds it."""
    raise NotImplementedError

  def acquire(self):
    record = self._record()
    self._take(record)
    self._thread = threading.Thread(target=self._heartbeat, args=(record,), daemon=True,
                                    name='jaxcl-lock-heartbeat')
    self._thread.start()
    return self

  def _heartbeat(self, record: dict) -> None:
    while not self._stop.wait(HEARTBEAT_S):
      record['heartbeat'] = time.time()
      try:
        if not self._beat(record):  # stalled past STALE_S, taken over
          self.lost = self.holder() or {}
          return
      except Exception:  # a full disk, a network blip: retried
        pass

  def release(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None
      try:
        self._remove()
      except Exception:  # a lost mount: it goes stale
        pass

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


class _DirectoryLock(_Lock):
  """Local and network file systems: the lock is a directory (mkdir is
  exclusive), holder.json inside it replaced by renames."""

  def holder(self) -> dict | None:
    record = _read_holder(self.path)
    if record is None and self.path.exists():
      return {}
    return record

  def _modified(self) -> float:
    return self.path.stat().mtime

  def _write(self, record: dict) -> None:
    tmp = self.path / f'{HOLDER_FILE}.{self.token}.tmp'
    tmp.write_text(json.dumps(record))
    tmp.replace(self.path / HOLDER_FILE)  # readers never see half a record

  def _take(self, record: dict) -> None:
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
      try:
        self._write(record)
      except OSError:  # a full disk: no half-made lock may block the next run
        self.path.rmtree(missing_ok=True)
        raise
      if self.holder().get('token') != self.token:  # someone else wrote last
        raise WorkdirLocked(f'{self.path.parent} was taken by another run that started at '
                            f'the same time: {describe(self.holder())}')
      return
    raise WorkdirLocked(f'{self.path.parent}: could not take its lock {self.path}')

  def _beat(self, record: dict) -> bool:
    current = self.holder()
    if current and current.get('token') != self.token:
      return False
    self._write(record)
    return True

  def _remove(self) -> None:
    holder = self.holder()
    if holder and holder.get('token') == self.token:
      self.path.rmtree(missing_ok=True)


class _GcsLock(_Lock):
  """gs://: LOCK_DIR/holder.json is one object, written only under a
  generation precondition (GCS's compare-and-swap)."""

  def __init__(self, workdir):
    super().__init__(workdir)
    self._bucket_name, _, prefix = str(self.path)[len('gs://'):].partition('/')
    self._name = f'{prefix}/{HOLDER_FILE}'
    self._bucket = None
    self._generation = None  # of our record, once written

  def _blob(self, reload: bool = False):
    from google.cloud import storage  # gcsfs brings it
    if self._bucket is None:
      self._bucket = storage.Client().bucket(self._bucket_name)
    return self._bucket.get_blob(self._name) if reload else self._bucket.blob(self._name)

  def _read(self) -> tuple[dict | None, int | None]:
    blob = self._blob(reload=True)
    if blob is None:
      return None, None
    try:
      record = json.loads(blob.download_as_bytes(if_generation_match=blob.generation))
    except ValueError:
      record = {}
    except Exception as e:
      if _status(e) == 404:  # released since listed
        return None, None
      if _status(e) == 412:  # rewritten since listed: read again
        return self._read()
      raise
    return (record if isinstance(record, dict) else {}), blob.generation

  def holder(self) -> dict | None:
    return self._read()[0]

  def _modified(self) -> float:
    blob = self._blob(reload=True)
    if blob is None:
      raise LookupError(self._name)
    return blob.updated.timestamp()

  def _put(self, record: dict, generation: int) -> bool:
    """Writes `record` if the object's generation is `generation` (0: absent)."""
    blob = self._blob()
    try:
      blob.upload_from_string(json.dumps(record), content_type='application/json',
                              if_generation_match=generation)
    except Exception as e:
      if _status(e) == 412:
        return False
      raise
    self._generation = blob.generation
    return True

  def _take(self, record: dict) -> None:
    for _ in range(3):
      if self._put(record, 0):
        return
      holder, generation = self._read()
      if holder is None:
        continue  # released meanwhile
      if not self._stale(holder):
        raise self._in_use(holder)
      if not self._put(record, generation):
        raise WorkdirLocked(f'{self.path.parent} was just taken by another run: '
                            f'{describe(self.holder() or {})}')
      self.took_over = holder
      return
    raise WorkdirLocked(f'{self.path.parent}: could not take its lock {self.path}')

  def _beat(self, record: dict) -> bool:
    return self._put(record, self._generation)

  def _remove(self) -> None:
    try:
      self._blob().delete(if_generation_match=self._generation)
    except Exception as e:
      if _status(e) != 412:  # taken over: not ours to remove
        raise


def _status(error: Exception) -> int | None:
  """The HTTP status of a google.api_core error (PreconditionFailed: 412)."""
  return getattr(error, 'code', None)


def WorkdirLock(workdir) -> _Lock:  # a class to its callers
  """The lock of `workdir`: an object under preconditions on gs://, a
  directory elsewhere."""
  if str(workdir).startswith('gs://'):
    return _GcsLock(workdir)
  return _DirectoryLock(workdir)
