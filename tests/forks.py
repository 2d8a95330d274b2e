"""`jaxcl` commands of the tests in forks of a process that imported jaxcl.

A new interpreter spends seconds importing jax, orbax, flax and TFDS before
a command does anything; a test run starts about a hundred commands. Each
xdist worker keeps one `Server` per environment (the device count is part
of it): a process that imported every command's modules once, without
starting a jax backend (tests/test_layout.py checks that importing jaxcl
starts none), and forks a child per command. The child runs `jaxcl ARGV`
as `python -m jaxcl.cli ARGV` would: its own backend with the server's
XLA_FLAGS, stdin from /dev/null, stdout and stderr to files, the exit
handlers a process runs at its end. What the imports print (a real process
prints it too) comes before the child's own output. What it skips is the
interpreter's teardown (0.5 s a command).

Commands a test signals or runs as several processes of one job stay real
processes (helpers.start_job, helpers.run_until_checkpoint).
"""

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile

_SERVER = r'''
import atexit, json, os, sys, tempfile, time, traceback
# What the imports print goes to a file: a real process would print it
# before the command's output, so each reply carries it.
preamble = tempfile.TemporaryFile()
replies = os.fdopen(os.dup(1), 'w')
saved = os.dup(1), os.dup(2)
os.dup2(preamble.fileno(), 1)
os.dup2(preamble.fileno(), 2)
import jax  # imported, not initialized: every child initializes its own backend
# Every command's modules, imported once here and not in each child.
from jaxcl import cli, config, export, halving, report, sweep, train  # noqa: F401
from jaxcl.trainer import distributed  # noqa: F401
from jaxcl.data import shard_writer  # noqa: F401
from jaxcl.hub import importer  # noqa: F401
sys.stdout.flush()
sys.stderr.flush()
os.dup2(saved[0], 1)
os.dup2(saved[1], 2)
os.close(saved[0])
os.close(saved[1])
preamble.seek(0)
replies.write(json.dumps(preamble.read().decode(errors='replace')) + '\n')
replies.flush()


def child(request):
  replies.close()  # the server's: a command's own processes must not hold it
  os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
  os.dup2(os.open(request['err'], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
  os.dup2(os.open(request['out'], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 1)
  os.environ.clear()
  os.environ.update(request['env'])
  argv = request['argv']
  sys.argv = ['jaxcl'] + argv  # config_flags reads the overrides from sys.argv
  code = 1
  try:
    if request['config']:  # parse only: the command line as `jaxcl` reads it
      try:
        cli._parse(argv[0], argv[1:])
      except cli.UsageError as e:
        print(f'jaxcl: error: {e}', file=sys.stderr)
        sys.exit(2)
      with open(request['config'], 'w') as f:
        json.dump(config.flat_config(cli._CONFIG.value), f)
      code = 0
    else:
      cli.main(sys.argv)
      code = 0
  except SystemExit as e:
    code = e.code if isinstance(e.code, int) else 1
  except BaseException:  # a traceback, as the interpreter would print it
    traceback.print_exc()
  atexit._run_exitfuncs()  # no public way
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


for line in sys.stdin:
  request = json.loads(line)
  pid = os.fork()
  if pid == 0:
    child(request)
  deadline, timed_out = time.monotonic() + request['timeout'], False
  while True:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
      break
    if time.monotonic() > deadline:
      os.kill(pid, 9)
      _, status = os.waitpid(pid, 0)
      timed_out = True
      break
    time.sleep(0.01)
  replies.write(json.dumps({'code': os.waitstatus_to_exitcode(status),
                            'timed_out': timed_out}) + '\n')
  replies.flush()
'''


class Server:
  """A process that imported jaxcl under `env` and forks one child per command."""

  def __init__(self, env: dict, cwd: str):
    self._folder = tempfile.mkdtemp(prefix='jaxcl-forks-')
    self._proc = subprocess.Popen([sys.executable, '-c', _SERVER], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, env=env, cwd=cwd, text=True)
    self._preamble = json.loads(self._proc.stdout.readline())

  def run(self, argv, env: dict, *, timeout: float, parse_only: bool = False) -> dict:
    """{'code', 'stdout', 'stderr', 'timed_out', 'config'} of `jaxcl ARGV` with
    the environment `env` (as the server's but for PER_TEST), killed
    (code -9) after `timeout` seconds. parse_only: the command line is parsed
    as `jaxcl` parses it and nothing runs; 'config' is the config it read,
    flattened ({dotted key: value}, as config.json holds it), or None."""
    paths = {name: os.path.join(self._folder, name) for name in ('out', 'err', 'config.json')}
    if os.path.exists(paths['config.json']):
      os.remove(paths['config.json'])
    request = {'argv': list(argv), 'env': env, 'out': paths['out'], 'err': paths['err'],
               'timeout': timeout, 'config': paths['config.json'] if parse_only else None}
    self._proc.stdin.write(json.dumps(request) + '\n')
    self._proc.stdin.flush()
    reply = json.loads(self._proc.stdout.readline())
    with open(paths['out'], errors='replace') as out, open(paths['err'], errors='replace') as err:
      reply['stdout'], reply['stderr'] = out.read(), self._preamble + err.read()
    reply['config'] = None
    if os.path.exists(paths['config.json']):
      with open(paths['config.json']) as f:
        reply['config'] = json.load(f)
    return reply

  def close(self) -> None:
    self._proc.stdin.close()
    self._proc.wait()
    shutil.rmtree(self._folder, ignore_errors=True)


# Set by pytest for each test: a child gets it, the choice of server ignores it.
PER_TEST = ('PYTEST_CURRENT_TEST',)

_servers: dict = {}


def run(argv, env: dict, cwd: str, **options) -> dict:
  """Server.run on the worker's server for `env` and `cwd` (started the first
  time it is asked for: variables read at import are the server's)."""
  key = (cwd, tuple(sorted((k, v) for k, v in env.items() if k not in PER_TEST)))
  if key not in _servers:
    _servers[key] = Server(env, cwd)
  return _servers[key].run(argv, env, **options)


@atexit.register
def _close_all():
  for s in _servers.values():
    s.close()
