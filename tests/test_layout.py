"""The shape of the package: layers that point one way, no module too big,
the config importable without the runtime, and one place (the methods'
registry) that knows which method is which."""

import ast
import os
import pathlib
import subprocess
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / 'jaxcl'
MAX_LINES = 420  # "about 400"


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob('*.py'))}


def _imports(name: str, path: pathlib.Path) -> set:
  """The jaxcl modules `name` imports, at its top or inside functions."""
  package = name if path.name == '__init__.py' else name.rpartition('.')[0]
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        parent = package.split('.')[:len(package.split('.')) - node.level + 1]
        base = '.'.join(parent + ([base] if base else []))
      found |= {f'{base}.{a.name}' if f'{base}.{a.name}' in MODULES else base
                for a in node.names}
  return {m for m in found if m in MODULES and m != name}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _lazy_registry_imports():
  """The registry imports its methods by name (importlib), which ast does not see."""
  from jaxcl import methods  # pylint: disable=g-import-not-at-top
  return set(methods._MODULES.values())  # pylint: disable=protected-access


def test_no_import_cycles():
  graph = {name: set(deps) for name, deps in GRAPH.items()}
  graph['jaxcl.methods'] |= _lazy_registry_imports()
  done, path = set(), []

  def visit(name):
    if name in path:
      pytest.fail('import cycle: ' + ' -> '.join(path[path.index(name):] + [name]))
    if name in done:
      return
    path.append(name)
    for dep in sorted(graph[name]):
      visit(dep)
    path.pop()
    done.add(name)

  for name in sorted(graph):
    visit(name)


@pytest.mark.parametrize('name', sorted(MODULES))
def test_module_size(name):
  lines = len(MODULES[name].read_text().splitlines())
  assert lines <= MAX_LINES, f'{MODULES[name]} has {lines} lines; split it by concern'


# The bottom layer imports no other part of jaxcl but these leaves.
LEAVES = {'jaxcl.errors', 'jaxcl.presets', 'jaxcl.files', 'jaxcl.zeroshot_lists'}


@pytest.mark.parametrize('name', sorted(LEAVES))
def test_leaves_import_no_jaxcl_module(name):
  assert GRAPH[name] <= LEAVES, f'{name} imports {sorted(GRAPH[name] - LEAVES)}'


@pytest.mark.parametrize('lower, higher', [
    ('jaxcl.losses', 'jaxcl.models'), ('jaxcl.temperature', 'jaxcl.models'),
    ('jaxcl.models', 'jaxcl.train'), ('jaxcl.data', 'jaxcl.train'),
    ('jaxcl.methods.base', 'jaxcl.experiment'), ('jaxcl.experiment', 'jaxcl.train'),
    ('jaxcl.config', 'jaxcl.train'), ('jaxcl.train', 'jaxcl.cli'),
])
def test_layers_point_down(lower, higher):
  """`lower` never reaches `higher`, directly or through other modules."""
  reached, todo = set(), [m for m in MODULES if m == lower or m.startswith(lower + '.')]
  while todo:
    name = todo.pop()
    for dep in GRAPH[name] - reached:
      reached.add(dep)
      todo.append(dep)
  assert not {m for m in reached if m == higher or m.startswith(higher + '.')}, (
      f'{lower} imports {higher}')


def test_export_sweep_report_use_no_trainer_internals():
  for name in ('jaxcl.export', 'jaxcl.report', 'jaxcl.trained'):
    assert 'jaxcl.train' not in GRAPH[name], name
  tree = ast.parse(MODULES['jaxcl.sweep'].read_text())
  used = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
          and isinstance(node.value, ast.Name) and node.value.id == 'train'}
  assert used == {'train_and_evaluate'}, used


def test_config_imports_no_runtime():
  code = ('import sys; import jaxcl.config, jaxcl.recipes, jaxcl.methods; '
          'print(sorted(m for m in ("jax", "flax", "tensorflow_datasets", "grain", "optax", '
          '"orbax") if m in sys.modules))')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == '[]', out.stdout


def _method_comparisons(tree):
  """Comparisons of something named `method` (config.method, a method
  variable) with a string or a tuple of strings."""
  for node in ast.walk(tree):
    if not isinstance(node, ast.Compare):
      continue
    sides = [node.left, *node.comparators]
    names = [ast.unparse(s) for s in sides]
    if not any(n == 'method' or n.endswith('.method') for n in names):
      continue
    literals = [s for s in sides if isinstance(s, ast.Constant) and isinstance(s.value, str)
                or isinstance(s, (ast.Tuple, ast.List, ast.Set))]
    if literals or any(isinstance(s, ast.Name) and s.id.isupper() for s in sides):
      yield node


@pytest.mark.parametrize('name', sorted(MODULES))
def test_only_the_registry_knows_method_names(name):
  if name.startswith('jaxcl.methods'):
    return
  found = [f'{MODULES[name].name}:{n.lineno}: {ast.unparse(n)}'
           for n in _method_comparisons(ast.parse(MODULES[name].read_text()))]
  assert not found, found


def test_importing_jaxcl_starts_no_jax_backend():
  """A multi-host job calls jax.distributed.initialize before any backend
  starts; a module that made a jnp array at import would start one first (and
  a fork driver that imported it could not fork)."""
  modules = ', '.join(sorted(MODULES))
  code = (f'import {modules}; from jax._src import xla_bridge; '
          'print(xla_bridge.backends_are_initialized())')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True,
                       env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert out.stdout.strip() == 'False', out.stdout
