"""Test set-up: 8 simulated CPU devices, set before anything imports jax,
and one persistent compilation cache for the whole test run."""

import os
import tempfile

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
# Every program is compiled once per test run: this process, pytest-xdist's
# workers and every jaxcl process a test starts inherit the variables (jax
# reads them at import; jaxcl.compilation_cache honours them). The folder is
# new for each run, so a fresh clone's run starts cold, as CI's does.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', tempfile.mkdtemp(prefix='jaxcl-xla-cache-'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.1')

import jax  # noqa: E402  (must come after the flags)

jax.config.update('jax_enable_x64', False)

# The embedded digits dataset is prepared once per test session, here.
os.environ.setdefault('TFDS_DATA_DIR', tempfile.mkdtemp(prefix='jaxcl-tfds-'))

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
