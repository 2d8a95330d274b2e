"""Makes the lists in the docs that mirror the code, so they cannot drift:

- README.md, "What a run writes": jaxcl.files.WORKDIR_CONTENTS;
- README.md, the configs table: the first line of each configs/*.py docstring;
- docs/config.md: every key of `base_config()` with its default and the
  comment beside it in jaxcl/config/defaults.py;
- the measured tables of docs/results.md, naflex.md, temperature.md and
  siglip2_recipe.md: docs/tables.py, from the rows benchmarks/seeds.py and
  the other benchmarks wrote (benchmarks/*.json).

  python docs/generate.py          # rewrites what is out of date
  python docs/generate.py --check  # exit 1 naming what is (tests/test_docs.py)

A generated part of a page sits between `<!-- generated: NAME -->` and
`<!-- end: NAME -->`; docs/config.md is generated whole.
"""

from __future__ import annotations

import argparse
import ast
import io
import pathlib
import re
import sys
import tokenize

from jaxcl import config as config_lib, files

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # docs/tables.py, beside this
import tables  # noqa: E402  (a script's sibling module: importable once its folder is on the path)

REPO = pathlib.Path(__file__).resolve().parent.parent
DEFAULTS = REPO / 'jaxcl' / 'config' / 'defaults.py'


def workdir_contents() -> str:
  return '\n'.join(f'- `{name}`: {what}.' for name, what in files.WORKDIR_CONTENTS)


def configs_table() -> str:
  rows = ['| config | what it trains |', '|---|---|']
  for path in sorted((REPO / 'configs').glob('*.py')):
    doc = ast.get_docstring(ast.parse(path.read_text())) or ''
    first = ' '.join(doc.split('\n\n')[0].split())
    rows.append(f'| [`{path.name}`](configs/{path.name}) | {first} |')
  return '\n'.join(rows)


def _comments(source: str) -> dict:
  """{line number: comment text} for every comment in `source`."""
  found = {}
  for tok in tokenize.generate_tokens(io.StringIO(source).readline):
    if tok.type == tokenize.COMMENT:
      found[tok.start[0]] = tok.string.lstrip('#').strip()
  return found


def _comment_for(line: int, lines: list, comments: dict) -> str:
  """The comment on `line`, after the comment lines right above it."""
  above, at = [], line - 1
  while at >= 1 and lines[at - 1].lstrip().startswith('#'):
    above.insert(0, comments[at])
    at -= 1
  if line in comments and not lines[line - 1].lstrip().startswith('#'):
    above.append(comments[line])
  return ' '.join(c for c in above if not set(c) <= set('-'))


def _keys_with_lines(node, prefix: str):
  """(dotted key, line) for a ConfigDict(dict(k=v, ...)) or ConfigDict({...})."""
  if not (isinstance(node, ast.Call) and ast.unparse(node.func).endswith('ConfigDict')):
    return
  arg = node.args[0] if node.args else None
  if isinstance(arg, ast.Call) and ast.unparse(arg.func) == 'dict':
    pairs = [(kw.arg, kw.value, kw.lineno) for kw in arg.keywords]
  elif isinstance(arg, ast.Dict):
    pairs = [(k.value, v, k.lineno) for k, v in zip(arg.keys, arg.values)]
  else:
    return
  for name, value, line in pairs:
    yield f'{prefix}.{name}', line
    yield from _keys_with_lines(value, f'{prefix}.{name}')


def key_comments() -> dict:
  """{dotted key or group: comment} from base_config's source; a key written
  on its group's line has none of its own."""
  source = DEFAULTS.read_text()
  lines, comments = source.splitlines(), _comments(source)
  function = next(n for n in ast.walk(ast.parse(source))
                  if isinstance(n, ast.FunctionDef) and n.name == 'base_config')
  found, line_of = {}, {}
  for statement in ast.walk(function):
    if not (isinstance(statement, ast.Assign) and len(statement.targets) == 1):
      continue
    target = ast.unparse(statement.targets[0])
    if not target.startswith('config.'):
      continue
    key = target[len('config.'):]
    found[key], line_of[key] = _comment_for(statement.lineno, lines, comments), statement.lineno
    for sub, line in _keys_with_lines(statement.value, key):
      line_of[sub] = line
      same_line = line == line_of[sub.rpartition('.')[0]]
      found[sub] = '' if same_line else _comment_for(line, lines, comments)
  return found


def config_page() -> str:
  flat = config_lib.flat_config(config_lib.base_config())
  notes = key_comments()
  out = ['# Every config key', '',
         '<!-- generated whole by docs/generate.py from jaxcl/config/defaults.py -->', '',
         'Every key a config may set, with its default: `base_config()` in',
         '[jaxcl/config/defaults.py](../jaxcl/config/defaults.py), the defaults of the',
         'digits run. Config files start from it and override what their recipe',
         'changes; any key can be set on the command line (`--config.KEY=VALUE`).', '']
  group, groups_shown = None, set()
  for key, value in flat.items():
    top = key.split('.')[0] if '.' in key else ''
    if top != group:
      group = top
      out += ['', f'## {group or "top level"}', '']
      if notes.get(group):
        out += [notes[group], '']
      out += ['| key | default | meaning |', '|---|---|---|']
    parent = key.rpartition('.')[0]
    if parent.count('.') and parent not in groups_shown:  # a group inside a group
      groups_shown.add(parent)
      out.append(f'| `{parent}.*` | | {_cell(notes.get(parent, ""))} |')
    out.append(f'| `{key}` | `{value!r}` | {_cell(notes.get(key, ""))} |')
  return '\n'.join(out) + '\n'


def _cell(text: str) -> str:
  return text.replace('|', '\\|')


BLOCKS = {'what-a-run-writes': workdir_contents, 'configs': configs_table, **tables.TABLES}


def _with_blocks(text: str) -> str:
  for name, make in BLOCKS.items():
    pattern = re.compile(rf'(<!-- generated: {name} -->\n)(?:.*?\n)?(<!-- end: {name} -->)', re.S)
    text = pattern.sub(lambda m, make=make: m.group(1) + make() + '\n' + m.group(2), text)
  return text


def pages() -> dict:
  """{path: the text it should have}."""
  edited = {path: _with_blocks(path.read_text())
           for path in (REPO / 'README.md', *(REPO / 'docs' / f'{name}.md'
                                              for name in ('results', 'naflex', 'temperature',
                                                           'siglip2_recipe')))}
  return {**edited, REPO / 'docs' / 'config.md': config_page()}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--check', action='store_true', help='only say what is out of date')
  args = parser.parse_args(argv)
  stale = [path for path, text in pages().items()
           if not path.exists() or path.read_text() != text]
  if args.check:
    for path in stale:
      print(f'{path.relative_to(REPO)} is out of date: run python docs/generate.py')
    return 1 if stale else 0
  for path in stale:
    path.write_text(pages()[path])
    print(f'wrote {path.relative_to(REPO)}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
