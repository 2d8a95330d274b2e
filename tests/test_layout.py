"""The shape of the package: layers that point one way, no module too big,
the config importable without the runtime, and one place (the methods'
registry) that knows which method is which."""

import ast
import os
import pathlib
import subprocess
import sys

import pytest

from jaxcl import methods

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / 'jaxcl'
MAX_LINES = 400


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
  return set(methods._MODULES.values())


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


# The layers, bottom up: a module imports only modules of lower layers and of
# its own package (the commands, one layer, import each other without a
# cycle). A name is a package (jaxcl/NAME/) or a top-level module.
LAYERS = (
    # leaves: errors and how they read; names and sizes as data; parameter-name patterns
    ('errors', 'presets', 'name_patterns'),
    ('files', 'parallel'),  # a workdir's file names and how they are written; the mesh
    ('config', 'text', 'losses'),  # plain configs; tokenizers; losses as pure functions
    ('models', 'data'),
    ('workdir', 'evaluation'),  # a run's files; probes and zero-shot on frozen embeddings
    ('methods',),  # what differs between SimCLR, CLIP and SigLIP, one object each
    ('trainer',),  # set-up, the step, checkpoints, evaluation during a run
    ('hub',),  # published weights in and out
    ('train', 'export', 'report', 'search_records', 'sweep', 'halving', 'recipes', 'cli'),
)
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def _part(module: str) -> str:
  return module.split('.')[1] if '.' in module else module


def test_every_module_has_a_layer():
  assert {_part(m) for m in MODULES if m != 'jaxcl'} == set(LAYER)


@pytest.mark.parametrize('name', sorted(m for m in MODULES if m != 'jaxcl'))
def test_imports_point_down(name):
  part, top = _part(name), len(LAYERS) - 1
  up = sorted(d for d in GRAPH[name] if _part(d) != part and LAYER[_part(d)] >= LAYER[part]
              and not LAYER[part] == LAYER[_part(d)] == top)
  assert not up, f'{name} (layer {LAYERS[LAYER[part]]}) imports {up}'


@pytest.mark.parametrize('lower, higher', [
    ('jaxcl.models.temperature', 'jaxcl.models.towers'),
    ('jaxcl.methods.base', 'jaxcl.trainer.experiment'), ('jaxcl.train', 'jaxcl.cli'),
])
def test_within_a_package_or_layer_too(lower, higher):
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
  for name in ('jaxcl.export', 'jaxcl.report', 'jaxcl.trainer.trained'):
    assert 'jaxcl.train' not in GRAPH[name], name
  tree = ast.parse(MODULES['jaxcl.sweep'].read_text())
  used = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
          and isinstance(node.value, ast.Name) and node.value.id == 'train'}
  assert used == {'train_and_evaluate'}, used


def test_config_imports_no_runtime():
  code = ('import sys; import jaxcl.config, jaxcl.config.recipes, jaxcl.recipes, jaxcl.methods; '
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
