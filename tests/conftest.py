"""Test set-up: 8 simulated CPU devices, set before anything imports jax,
and one persistent compilation cache for the whole test run."""

import atexit
import json
import os
import shutil
import tempfile

import helpers  # no jax: it sets nothing

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + helpers.xla_flags(8)).strip()
# Every program is compiled once per test run: this process, pytest-xdist's
# workers and every jaxcl process a test starts inherit the variables (jax
# reads them at import; jaxcl.compilation_cache honours them). The folder is
# new for each run, so a fresh clone's run starts cold, as CI's does.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:  # the run's first process: it owns the folder
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='jaxcl-xla-cache-')
  atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)
  os.environ['JAXCL_COMPILATION_STATS_DIR'] = tempfile.mkdtemp(prefix='jaxcl-xla-stats-')
  atexit.register(shutil.rmtree, os.environ['JAXCL_COMPILATION_STATS_DIR'], ignore_errors=True)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.1')

import jax  # noqa: E402  (must come after the flags)

jax.config.update('jax_enable_x64', False)

from jaxcl import compilation_cache  # noqa: E402

compilation_cache.listen()

# The embedded datasets are prepared once per test run, here.
if 'TFDS_DATA_DIR' not in os.environ:
  os.environ['TFDS_DATA_DIR'] = tempfile.mkdtemp(prefix='jaxcl-tfds-')
  atexit.register(shutil.rmtree, os.environ['TFDS_DATA_DIR'], ignore_errors=True)

import pytest  # noqa: E402


@pytest.fixture(scope='session')
def uninterrupted(tmp_path_factory):
  """The reference run: helpers.RUN on 2 devices, never interrupted."""
  from helpers import DIGITS_CONFIG, RUN, jaxcl, tiny_overrides  # pylint: disable=g-import-not-at-top
  workdir = tmp_path_factory.mktemp('uninterrupted')
  jaxcl('train', '--config', DIGITS_CONFIG, '--workdir', str(workdir), *tiny_overrides(), *RUN,
        devices=2)
  return workdir


@pytest.fixture(scope='session')
def gcs_bucket(tmp_path_factory):
  """A local GCS server (tests/gcs_server.py) for the session, every gs://
  client of jaxcl pointed at it (this process and the ones it starts);
  yields its bucket, 'gs://jaxcl-test'. A server that does not start fails
  the tests that need it, with its log."""
  import gcs_server  # pylint: disable=g-import-not-at-top
  from helpers import free_port  # pylint: disable=g-import-not-at-top
  port = free_port()
  server = gcs_server.start(port, tmp_path_factory.mktemp('gcs') / 'server.log')
  os.environ.update(gcs_server.environment(port))
  yield f'gs://{gcs_server.BUCKET}'
  server.kill()
  server.wait()


@pytest.fixture
def gcs_dir(gcs_bucket, request):
  """A gs:// folder of its own for one test (an etils epath.Path)."""
  import uuid  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top
  return epath.Path(gcs_bucket) / f'{request.node.name[:40]}-{uuid.uuid4().hex[:8]}'


def pytest_sessionfinish(session):
  del session
  compilation_cache.write_stats()


def pytest_terminal_summary(terminalreporter, config):
  """The test run's compilation-cache hit rate, over every process that compiled."""
  stats_dir = os.environ.get('JAXCL_COMPILATION_STATS_DIR')
  if hasattr(config, 'workerinput') or not stats_dir:  # an xdist worker: the controller reports
    return
  compilation_cache.write_stats()
  counts = [json.loads(open(os.path.join(stats_dir, name), encoding='utf-8').read())
            for name in os.listdir(stats_dir)]
  requests, hits = sum(c['requests'] for c in counts), sum(c['hits'] for c in counts)
  stored = len(os.listdir(os.environ['JAX_COMPILATION_CACHE_DIR']))
  terminalreporter.write_line(
      f'compilation cache: {hits} of {requests} compiles loaded from it '
      f'({100 * hits / max(requests, 1):.0f}%) in {len(counts)} processes; {stored} files stored')
