"""Guards over jaxcl's own source: loading never unpickles, and every path
the trainer reads or writes goes through etils.epath (so gs:// works)."""

import ast
import functools
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / 'jaxcl'
SOURCES = sorted(PACKAGE.rglob('*.py'))  # the subpackages (data, methods) too

# Calls that would run code from a file, or that bypass epath.
UNSAFE_MODULES = {'pickle', 'cPickle', 'dill', 'cloudpickle', 'marshal', 'shelve', 'joblib'}
BARE_FILE_CALLS = {'open'}
OS_PATH_ALLOWED = {
    # (file, function): why a plain os.path call is right there.
    ('pair_rows.py', 'normpath'): 'a local image path (remote ones take the epath branch)',
    ('pair_rows.py', 'join'): 'a local image path (remote ones take the epath branch)',
    ('pair_rows.py', 'expanduser'): 'a local image path (remote ones take the epath branch)',
    ('pair_rows.py', 'relpath'): 'a local image path (remote ones take the epath branch)',
}
OPEN_ALLOWED = {
    ('lock.py', "f'/proc/{pid}/stat'"): "this machine's /proc, not a user path",
    ('catalog.py', 'lock_file'):
        'flock needs a file descriptor; the branch is for local data_dirs only',
}


@functools.cache  # each source parsed once, for every test that reads it
def _tree(source: pathlib.Path) -> ast.Module:
  return ast.parse(source.read_text())


def _calls(tree):
  for node in ast.walk(tree):
    if isinstance(node, ast.Call):
      yield node


@pytest.mark.parametrize('source', SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_unpickling_or_code_loading(source):
  tree = _tree(source)
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      assert not {a.name.split('.')[0] for a in node.names} & UNSAFE_MODULES, source.name
    if isinstance(node, ast.ImportFrom):
      assert (node.module or '').split('.')[0] not in UNSAFE_MODULES, source.name
  for call in _calls(tree):
    name = call.func.attr if isinstance(call.func, ast.Attribute) else getattr(call.func, 'id', '')
    if isinstance(call.func, ast.Name):  # the builtins (model.eval() is a mode switch)
      assert name not in ('eval', 'exec'), f'{source.name}:{call.lineno}: {name}()'
    if name == 'load' and isinstance(call.func, ast.Attribute):  # np.load(allow_pickle=True)
      for kw in call.keywords:
        assert not (kw.arg == 'allow_pickle' and getattr(kw.value, 'value', False)), (
            f'{source.name}:{call.lineno}')


@pytest.mark.parametrize('source', SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_paths_go_through_epath(source):
  tree = _tree(source)
  for call in _calls(tree):
    func = call.func
    if isinstance(func, ast.Name) and func.id in BARE_FILE_CALLS:
      arg = ast.unparse(call.args[0]) if call.args else ''
      assert (source.name, arg) in OPEN_ALLOWED, f'{source.name}:{call.lineno}: open({arg})'
    if (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Attribute)
        and ast.unparse(func.value) == 'os.path'):
      assert (source.name, func.attr) in OS_PATH_ALLOWED, (
          f'{source.name}:{call.lineno}: os.path.{func.attr}')
    if isinstance(func, ast.Attribute) and ast.unparse(func.value) in ('os', 'shutil', 'glob'):
      # os._exit: a failed process of several leaves past jax's shutdown barrier (cli.py).
      # os.write: to stderr's descriptor from a signal handler (guards.py), not a path.
      # os.getppid: a grain worker watching for its training process (data/pipeline.py).
      # os.access: whether a local cache folder is writable (compilation_cache.py), no I/O.
      assert func.attr in ('environ', 'getpid', 'getppid', 'kill', 'fspath', 'getenv',
                           'cpu_count', '_exit', 'write', 'access'), (
          f'{source.name}:{call.lineno}: {ast.unparse(func)}')


def _allowed_calls_found() -> set:
  found = set()
  for source in SOURCES:
    for call in _calls(_tree(source)):
      func = call.func
      if isinstance(func, ast.Name) and func.id in BARE_FILE_CALLS and call.args:
        found.add((source.name, ast.unparse(call.args[0])))
      if isinstance(func, ast.Attribute) and ast.unparse(func.value) == 'os.path':
        found.add((source.name, func.attr))
  return found


def test_every_allowance_is_still_used():
  """An allowance for a call that is gone would let the next such call in
  unreviewed."""
  stale = (set(OS_PATH_ALLOWED) | set(OPEN_ALLOWED)) - _allowed_calls_found()
  assert not stale, f'allowances for calls that no longer exist: {sorted(stale)}'
