"""Test set-up: 8 simulated CPU devices, set before anything imports jax,
and one persistent compilation cache for the whole test run."""

import atexit
import fcntl
import json
import os
import shutil
import tempfile
import uuid

import pytest
from etils import epath

import gcs_server  # no jax
import helpers  # no jax: it sets nothing

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# This process's own programs (the in-process checks: formulas, sharded
# against one device) compile with LLVM at -O0: the same XLA program, its
# machine code less optimized, in about half the time (test_grad_cache.py
# 225 -> 138 s, test_finetune.py 184 -> 72 s on 2 cores). The whole runs that
# the tests start as new processes (helpers.jaxcl, helpers.start_job) get only
# helpers.xla_flags: they compile as users' runs do. (-O0 for those too moved
# a cross-mesh resume past its measured tolerance; see the README.)
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + helpers.xla_flags(8)
                           + ' ' + helpers.IN_PROCESS_XLA_FLAGS).strip()
# Every program is compiled once per test run: this process, pytest-xdist's
# workers and every jaxcl process a test starts inherit the variables (jax
# reads them at import; jaxcl.trainer.compilation_cache honours them). The folder is
# new for each run, so a fresh clone's run starts cold, as CI's does.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:  # the run's first process: it owns the folder
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='jaxcl-xla-cache-')
  atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)
  os.environ['JAXCL_COMPILATION_STATS_DIR'] = tempfile.mkdtemp(prefix='jaxcl-xla-stats-')
  atexit.register(shutil.rmtree, os.environ['JAXCL_COMPILATION_STATS_DIR'], ignore_errors=True)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.1')

import jax  # this and jaxcl after the flags above

from jaxcl.trainer import compilation_cache

jax.config.update('jax_enable_x64', False)
compilation_cache.listen()

# The embedded datasets are prepared once per test run, here.
if 'TFDS_DATA_DIR' not in os.environ:
  os.environ['TFDS_DATA_DIR'] = tempfile.mkdtemp(prefix='jaxcl-tfds-')
  atexit.register(shutil.rmtree, os.environ['TFDS_DATA_DIR'], ignore_errors=True)


def trained_once(tmp_path_factory, name: str, *args, devices: int = 1):
  """WORKDIR of `jaxcl train --workdir WORKDIR ARGS`, trained once per test
  run: the first test (of any pytest-xdist worker) that asks trains it, the
  others wait for it and share it. Tests read it; one that writes copies it."""
  root = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):  # the workers' folders sit side by side in the run's
    root = root.parent
  workdir, done = root / 'trained-once' / name, root / 'trained-once' / f'{name}.done'
  workdir.parent.mkdir(exist_ok=True)
  with open(root / 'trained-once' / f'{name}.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
    if not done.exists():
      shutil.rmtree(workdir, ignore_errors=True)  # a run that failed in another worker
      helpers.jaxcl('train', '--workdir', str(workdir), *args, devices=devices)
      done.touch()
  return workdir


@pytest.fixture(scope='session')
def uninterrupted(tmp_path_factory):
  """The reference run: helpers.RUN on 2 devices, never interrupted (trained_once)."""
  return trained_once(tmp_path_factory, 'uninterrupted', '--config', helpers.DIGITS_CONFIG,
                      *helpers.tiny_overrides(), *helpers.RUN, devices=2)


@pytest.fixture(scope='session')
def gcs_bucket(tmp_path_factory):
  """A local GCS server (tests/gcs_server.py) for the session, every gs://
  client of jaxcl pointed at it (this process and the ones it starts);
  yields its bucket, 'gs://jaxcl-test'. A server that does not start fails
  the tests that need it, with its log."""
  port = helpers.free_port()
  server = gcs_server.start(port, tmp_path_factory.mktemp('gcs') / 'server.log')
  os.environ.update(gcs_server.environment(port))
  yield f'gs://{gcs_server.BUCKET}'
  server.kill()
  server.wait()


@pytest.fixture
def gcs_dir(gcs_bucket, request):
  """A gs:// folder of its own for one test (an etils epath.Path)."""
  return epath.Path(gcs_bucket) / f'{request.node.name[:40]}-{uuid.uuid4().hex[:8]}'


# The quick loop (-m "not slow") has a budget of 3 minutes on 2 cores. A test
# not marked slow that takes longer than this (setup included) is named in
# the log: mark it slow or make it smaller.
QUICK_TEST_S = 10.0
_quick_seconds = {}  # nodeid: setup + call + teardown seconds, tests not marked slow


def pytest_runtest_logreport(report):
  if 'slow' not in report.keywords:  # the markers' names are among the keywords
    _quick_seconds[report.nodeid] = _quick_seconds.get(report.nodeid, 0.0) + report.duration


def pytest_sessionfinish(session):
  del session
  compilation_cache.write_stats()


def pytest_terminal_summary(terminalreporter, config):
  """Tests of the quick loop over their budget, and the test run's
  compilation-cache hit rate over every process that compiled."""
  if hasattr(config, 'workerinput'):  # an xdist worker: the controller reports
    return
  over = sorted(((s, name) for name, s in _quick_seconds.items() if s > QUICK_TEST_S),
                reverse=True)
  if over:
    terminalreporter.write_line(
        f'quick loop: {len(over)} tests not marked slow took over {QUICK_TEST_S:.0f} s '
        '(mark them slow or make them smaller): '
        + ', '.join(f'{name} {s:.0f} s' for s, name in over))
  stats_dir = os.environ.get('JAXCL_COMPILATION_STATS_DIR')
  if not stats_dir:  # the cache folder came from outside the test run: no counts
    return
  compilation_cache.write_stats()
  counts = [json.loads(open(os.path.join(stats_dir, name), encoding='utf-8').read())
            for name in os.listdir(stats_dir)]
  requests, hits = sum(c['requests'] for c in counts), sum(c['hits'] for c in counts)
  stored = len(os.listdir(os.environ['JAX_COMPILATION_CACHE_DIR']))
  terminalreporter.write_line(
      f'compilation cache: {hits} of {requests} compiles loaded from it '
      f'({100 * hits / max(requests, 1):.0f}%) in {len(counts)} processes; {stored} files stored')
