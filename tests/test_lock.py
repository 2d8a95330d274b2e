"""The workdir lock (jaxcl.lock) on a local disk and on a real local GCS
server (tests/gcs_server.py): live holders refused, dead ones taken over, a
takeover noticed, and of processes racing for one workdir exactly one wins."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from etils import epath

from jaxcl.workdir import lock as lock_lib


@pytest.fixture(params=['local', 'gcs'])
def workdir(request, tmp_path):
  """A new workdir on the local disk or on the GCS server."""
  if request.param == 'local':
    return epath.Path(tmp_path)
  return request.getfixturevalue('gcs_dir')


def _within(seconds, condition) -> bool:
  """Whether condition() turns true within `seconds` (polled)."""
  deadline = time.monotonic() + seconds
  while not condition():
    if time.monotonic() > deadline:
      return False
    time.sleep(0.01)
  return True


def _write_holder(workdir, **record):
  path = workdir / lock_lib.LOCK_DIR
  path.mkdir(parents=True, exist_ok=True)
  (path / lock_lib.HOLDER_FILE).write_text(json.dumps(record))


def test_lock_refuses_a_live_holder_and_releases(workdir):
  first = lock_lib.WorkdirLock(workdir).acquire()
  with pytest.raises(lock_lib.WorkdirLocked, match=f'pid {os.getpid()} on host '):
    lock_lib.WorkdirLock(workdir).acquire()
  first.release()
  assert not (workdir / lock_lib.LOCK_DIR).exists()
  with lock_lib.WorkdirLock(workdir) as second:
    assert second.took_over is None


def test_lock_of_a_dead_process_is_taken_over(workdir):
  # A pid past the kernel's largest is never alive (a finished child's pid can
  # be reused at once on a busy machine: threads take pids too).
  with open('/proc/sys/kernel/pid_max') as f:
    gone = int(f.read()) + 1
  _write_holder(workdir, host=socket.gethostname(), pid=gone, started=0, heartbeat=0)
  with lock_lib.WorkdirLock(workdir) as lock:
    assert lock.took_over['pid'] == gone
    assert json.loads((workdir / lock_lib.LOCK_DIR / lock_lib.HOLDER_FILE).read_text())[
        'pid'] == os.getpid()


def test_lock_of_a_reused_pid_is_taken_over(workdir):
  # The recorded pid is alive but is another process than the one that locked.
  _write_holder(workdir, host=socket.gethostname(), pid=os.getppid(), process_start='1',
                started=0, heartbeat=time.time())
  with lock_lib.WorkdirLock(workdir) as lock:
    assert lock.took_over['pid'] == os.getppid()


def test_lock_of_another_host_is_stale_only_without_heartbeat(workdir, monkeypatch):
  _write_holder(workdir, host='elsewhere', pid=1, started=0, heartbeat=time.time() - 10)
  with pytest.raises(lock_lib.WorkdirLocked, match='pid 1 on host elsewhere'):
    lock_lib.WorkdirLock(workdir).acquire()
  _write_holder(workdir, host='elsewhere', pid=1, started=0,
                heartbeat=time.time() - lock_lib.STALE_S - 1)
  monkeypatch.setattr(lock_lib, 'HEARTBEAT_S', 0.05)
  with lock_lib.WorkdirLock(workdir) as lock:
    assert lock.took_over['host'] == 'elsewhere'
    first = lock.holder()['heartbeat']
    # The live run keeps its lock fresh: a beat every 0.05 s, waited for up to
    # 600 beats (a thread can be held up on a busy machine).
    assert _within(30, lambda: lock.holder().get('heartbeat', first) > first)


def test_a_lock_taken_over_is_noticed_and_not_overwritten(workdir, monkeypatch):
  monkeypatch.setattr(lock_lib, 'HEARTBEAT_S', 0.05)
  lock = lock_lib.WorkdirLock(workdir).acquire()
  other = {'host': 'elsewhere', 'pid': 7, 'started': 0, 'heartbeat': time.time(), 'token': 'x'}
  (workdir / lock_lib.LOCK_DIR / lock_lib.HOLDER_FILE).write_text(json.dumps(other))
  assert _within(30, lambda: lock.lost is not None)  # its next beat notices (every 0.05 s)
  assert lock.lost == other
  time.sleep(0.25)  # beats that would have come meanwhile
  assert lock.holder() == other  # the stalled run's heartbeat left the new record alone
  lock.release()
  assert (workdir / lock_lib.LOCK_DIR).exists()  # not ours to remove


# Each racer waits for the start time, tries the lock of every round's workdir
# once, and prints 1 (took it) or 0 (refused) per round; it holds what it took
# until all racers are done, so that a late racer cannot take a released lock.
_RACER = '''
import sys, time
from jaxcl.workdir import lock as lock_lib
base, rounds, start = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
held, won = [], []
for r in range(rounds):
  while time.time() < start + r * 0.5:
    time.sleep(0.001)
  try:
    held.append(lock_lib.WorkdirLock(f'{base}/round-{r}').acquire())
    won.append('1')
  except lock_lib.WorkdirLocked:
    won.append('0')
print(''.join(won), flush=True)
sys.stdin.read()  # until the test says all are done
for lock in held:
  lock.release()
'''


@pytest.mark.slow  # too long for the quick loop (conftest.py: QUICK_TEST_S)
def test_of_racing_processes_exactly_one_takes_the_lock(workdir):
  racers, rounds = 3, 12
  start = time.time() + 8  # every racer imported and waiting by then
  procs = [subprocess.Popen([sys.executable, '-c', _RACER, str(workdir), str(rounds), str(start)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for _ in range(racers)]
  lines = [p.stdout.readline().strip() for p in procs]
  for p in procs:
    _, err = p.communicate('', timeout=120)
    assert p.returncode == 0, err[-2000:]
  assert all(len(line) == rounds for line in lines), lines
  winners = [sum(line[r] == '1' for line in lines) for r in range(rounds)]
  assert winners == [1] * rounds, lines
