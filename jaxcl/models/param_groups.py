"""Parameters by name: '/'-joined paths such as
'image_encoder/blocks/0/attention/qkv/kernel', and the groups that regular
expressions over them select (frozen parameters, learning-rate multipliers,
the towers `init.load` names).

A pattern matches a path when it matches the whole path (re.fullmatch), as
big_vision's and open_clip's freezing options do: 'image_encoder/.*' is the
image tower, 'text_encoder/blocks/(0|1)/.*' its first two blocks.

Config validation checks patterns without jax; the tree functions import it.
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence

import jax


def path_name(key_path) -> str:
  """The '/'-joined name of a jax key path into an nnx.State of parameters
  (the trailing `.value` of each variable left out)."""
  parts = [str(getattr(k, 'key', getattr(k, 'idx', ''))) for k in key_path
           if not isinstance(k, jax.tree_util.GetAttrKey)]
  return '/'.join(parts)


def names(params) -> list[str]:
  """Every parameter's name, in the tree's order."""
  return [path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def as_patterns(value) -> tuple[str, ...]:
  """A config value (one pattern, or a list of them; '' or () for none) as a tuple."""
  if isinstance(value, str):
    return (value,) if value else ()
  return tuple(value or ())


def compile_patterns(patterns: Iterable[str], key: str) -> list[re.Pattern]:
  """ValueError naming `key` for a pattern that is not a regular expression."""
  out = []
  for p in patterns:
    try:
      out.append(re.compile(p))
    except re.error as e:
      raise ValueError(f'{key}: {p!r} is not a regular expression ({e})') from None
  return out


def selected(params, patterns: Sequence[str]):
  """A tree of bools like `params`: True where a pattern matches the name."""
  compiled = compile_patterns(patterns, 'patterns')
  return jax.tree_util.tree_map_with_path(
      lambda path, _: any(p.fullmatch(path_name(path)) for p in compiled), params)


def parse_multipliers(values: Sequence[str], key: str) -> list[tuple[str, float]]:
  """'PATTERN=FACTOR' strings -> [(pattern, factor)]; ValueError naming `key`."""
  out = []
  for value in values:
    pattern, sep, factor = str(value).rpartition('=')
    try:
      number = float(factor)
    except ValueError:
      number = None
    if not sep or not pattern or number is None or not number >= 0:
      raise ValueError(f"{key}: {value!r} is not 'PATTERN=FACTOR' with a factor >= 0, e.g. "
                       f"'text_encoder/.*=0.1'")
    compile_patterns([pattern], key)
    out.append((pattern, number))
  return out


def multipliers(params, rules: Sequence[tuple[str, float]]):
  """A tree of floats like `params`: the factor of the first rule whose
  pattern matches the name, else 1."""
  compiled = [(re.compile(p), f) for p, f in rules]

  def factor(path, _):
    name = path_name(path)
    return next((f for p, f in compiled if p.fullmatch(name)), 1.0)
  return jax.tree_util.tree_map_with_path(factor, params)


def matching(all_names: Sequence[str], patterns: Sequence[str]) -> set[str]:
  """The names some pattern matches."""
  compiled = [re.compile(p) for p in patterns]
  return {n for n in all_names if any(p.fullmatch(n) for p in compiled)}


def unmatched(all_names: Sequence[str], patterns: Sequence[str]) -> list[str]:
  """The patterns that match no name (a typo freezes nothing: an error)."""
  return [p for p in patterns if not matching(all_names, [p])]
