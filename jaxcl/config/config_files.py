"""Config files and their command-line overrides, checked before
ml_collections' config_flags reads them, so that every mistake is one line
naming the file or the flag.

A config file is Python that defines `get_config()` returning a ConfigDict
(`FILE:ARG` passes ARG to `get_config`). It is executed: only run config
files you trust.
"""

from __future__ import annotations

import difflib
import importlib.util

import ml_collections
from etils import epath

from jaxcl import errors

ConfigFileError = errors.ConfigFileError

# Keys renamed since a release, old dotted name -> new. Config files and saved
# config.json files may still use the old name; the command line names the new
# one (`init.from` could never be set there: config_flags parses a dotted key as
# a Python expression, and `from` is a keyword).
RENAMED_KEYS = {'init.from': 'init.source'}
# Keys whose default, None, means unset (dataset.data_dir: TFDS's own folder).
# A flag can only give them a string: '' unsets them, as it does every other
# path key, where TFDS would read '' as the current directory.
UNSET_BY_EMPTY = ('dataset.data_dir',)


def load(spec: str) -> ml_collections.ConfigDict:
  """The ConfigDict of config file `spec` ('path.py' or 'path.py:arg')."""
  path, arg = spec, None
  if not epath.Path(spec).is_file() and ':' in spec:
    path, arg = spec.rsplit(':', 1)
  if not epath.Path(path).is_file():
    raise ConfigFileError(f'config file {path} does not exist')
  try:
    module_spec = importlib.util.spec_from_file_location('jaxcl_config_file', path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
  except SystemExit as e:
    raise ConfigFileError(f'config file {path} called sys.exit({e.code}) while loading'
                          ) from None
  except Exception as e:  # the file's own error, reported
    raise ConfigFileError(f'config file {path} fails to load: {_describe(e)}') from None
  get_config = getattr(module, 'get_config', None)
  if not callable(get_config):
    raise ConfigFileError(f'config file {path} has no get_config() function')
  try:
    config = get_config() if arg is None else get_config(arg)
  except SystemExit as e:
    raise ConfigFileError(f'config file {path}: get_config() called sys.exit({e.code})'
                          ) from None
  except Exception as e:
    raise ConfigFileError(f'config file {path}: get_config() raised {_describe(e)}') from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigFileError(f'config file {path}: get_config() returned '
                          f'{type(config).__name__}, not an ml_collections.ConfigDict')
  settle(config)
  return config


def settle(config) -> None:
  """A loaded config (a file's, with its overrides) as the rest of jaxcl
  reads it, in place: old key names moved to the new ones, '' in
  UNSET_BY_EMPTY's keys as None."""
  use_new_names(config)
  for key in UNSET_BY_EMPTY:
    *group_path, leaf = key.split('.')
    group = _group(config, group_path)
    if group is not None and group.get(leaf) == '':
      group[leaf] = None


def _group(config, path):
  """The group of keys at `path` (a list of names) in `config`, or None."""
  for part in path:
    config = config.get(part) if isinstance(config, ml_collections.ConfigDict) else None
  return config if isinstance(config, ml_collections.ConfigDict) else None


def use_new_names(config) -> None:
  """Moves the values a config file set under an old name (RENAMED_KEYS) to
  the new one, in place (a locked config too), so that the rest of jaxcl,
  and the config.json a run saves, see the new name only. A new name that is
  set too wins: `--config.init.source=DIR` over an old file's init.from."""
  for old, new in RENAMED_KEYS.items():
    *group_path, old_leaf = old.split('.')
    new_leaf = new.rsplit('.', 1)[-1]  # a rename within its group
    group = _group(config, group_path)
    if group is None or old_leaf not in group:
      continue
    with group.unlocked():
      value = group[old_leaf]
      del group[old_leaf]
      if group.get(new_leaf, '') in ('', None):
        group[new_leaf] = value


def with_new_names(flat: dict, where: str) -> dict:
  """A flattened config ({dotted key: value}) with RENAMED_KEYS' old names
  replaced by the new ones."""
  both = [old for old, new in RENAMED_KEYS.items() if old in flat and new in flat]
  if both:
    raise ConfigFileError(f'{where} has both {both[0]} and {RENAMED_KEYS[both[0]]} '
                          f'(its new name)')
  return {RENAMED_KEYS.get(key, key): value for key, value in flat.items()}


def _describe(e: BaseException) -> str:
  if isinstance(e, SyntaxError) and e.lineno:
    return f'SyntaxError: {e.msg} (line {e.lineno})'
  return f'{type(e).__name__}: {errors.first_line(e, "")}'.rstrip(': ')


def overrides(args: list[str]) -> list[tuple[str, str | None]]:
  """(dotted key, value or None) of every --config.KEY[=VALUE] in `args`,
  and (KEY, None) of every --noconfig.KEY (a boolean's False, which config_flags
  reads too)."""
  out = []
  for i, arg in enumerate(args):
    flag = arg.lstrip('-')
    if arg.startswith('-') and flag.startswith('noconfig.'):
      out.append((flag[len('noconfig.'):].partition('=')[0], None))
    elif arg.startswith('-') and flag.startswith('config.'):
      key, eq, value = flag[len('config.'):].partition('=')
      if not eq:
        value = args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith('-') else None
      out.append((key, value))
  return out


def closest(name: str, candidates) -> str | None:
  """The candidate a mistyped `name` most likely meant: a close spelling,
  else one that starts like it or abbreviates it ('lr' ->
  'learning_rate'); None when nothing comes near."""
  candidates = sorted(candidates)
  match = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
  if match:
    return match[0]
  for c in candidates:
    if c.startswith(name) or name.startswith(c):
      return c
  for c in candidates:  # initials: 'lr' -> 'learning_rate'
    if len(name) > 1 and ''.join(word[:1] for word in c.split('_')) == name:
      return c
  for c in candidates:
    if name and c[0] == name[0] and _is_subsequence(name.replace('_', ''), c):
      return c
  return None


def _is_subsequence(short: str, long: str) -> bool:
  it = iter(long)
  return all(ch in it for ch in short)


def check_overrides(config, args: list[str]) -> None:
  """ConfigFileError for the first override that names no key of `config`,
  names a key by its old name or a whole group of keys, or gives a tuple
  field a value not written as a tuple."""
  for key, value in overrides(args):
    _check_not_renamed(key, value)
    node, path, parts = config, [], key.split('.')
    for depth, part in enumerate(parts):
      if not isinstance(node, ml_collections.ConfigDict):
        raise ConfigFileError(f'unknown config key {part!r} in --config.{key} '
                              f'({".".join(path)} is a value, not a group of keys)')
      if part not in node:
        suggestion = closest(part, node.keys())
        if depth == len(parts) - 1:  # a dropped dot: 'datasettext_key' -> 'dataset.text_key'
          dotted = [k for k in _dotted_keys(node) if '.' in k]
          match = difflib.get_close_matches(part, [k.replace('.', '') for k in dotted], n=1,
                                            cutoff=0.9)
          if match:
            suggestion = next(k for k in dotted if k.replace('.', '') == match[0])
        where = f'{".".join(path)}: ' if path else ''
        raise ConfigFileError(
            f'unknown config key {part!r} in --config.{key} ('
            + (f'did you mean {suggestion!r}?)' if suggestion else
               f'{where}the keys are {", ".join(sorted(node.keys()))})'))
      node = node[part]
      path.append(part)
    # config_flags would replace the whole group with a dict's keys (those of
    # `--config.init={'source': X}` lose init.load), unchecked.
    if isinstance(node, ml_collections.ConfigDict):
      raise ConfigFileError(f'--config.{key} names a group of keys ({", ".join(sorted(node))}): '
                            f'set each one, --config.{key}.KEY=VALUE')
    # config_flags would read `--config.names=abc` for a tuple as ('a', 'b', 'c').
    if isinstance(node, (tuple, list)) and value is not None and not value.strip().startswith(
        ('(', '[')):
      raise ConfigFileError(f'--config.{key} takes a tuple, written (a, b) or [a, b]; '
                            f'got {value!r}')


def _check_not_renamed(key: str, value: str | None) -> None:
  """An override naming a key by its old name (RENAMED_KEYS): one line with
  the flag to type instead."""
  for old, new in RENAMED_KEYS.items():
    if key == old or key.startswith(old + '.'):
      raise ConfigFileError(f'--config.{key}: {old} is now called {new}; use '
                            f'--config.{new}{key[len(old):]}'
                            + ('' if value is None else f'={value}'))


def _dotted_keys(node, prefix=''):
  for key, value in node.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from _dotted_keys(value, f'{prefix}{key}.')
    else:
      yield f'{prefix}{key}'


_TYPE_NAMES = ((bool, 'True or False'), (int, 'an integer'), (float, 'a number'),
               (str, 'a string'), (tuple, 'a tuple'), (list, 'a list'),
               (type(None), 'a string or null'))


def kind_of(default) -> str | None:
  """How a message names the type of a config key's default ('an integer')."""
  return next((name for t, name in _TYPE_NAMES if isinstance(default, t)), None)


def value_error_message(config, args: list[str], message: str) -> str:
  """config_flags' error for an override value ('flag --config.k=v: invalid
  literal for int() ...') as 'KEY takes an integer, got V'; other flag
  errors as they are, without absl's 'flag' prefix."""
  # The override the message names (a key given twice: the value that failed).
  for key, value in overrides(args) if config is not None else ():
    if message.startswith(f'flag --config.{key}={value}:'):
      node = config
      for part in key.split('.'):
        node = node[part]
      kind = kind_of(node)
      if kind is not None and node is not None:
        return f'--config.{key} takes {kind}, got {value!r}'
  return message[len('flag '):] if message.startswith('flag --') else message
