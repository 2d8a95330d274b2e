"""Regular expressions over parameter names, as plain functions of strings:
the groups that optimizer.frozen, optimizer.lr_multipliers and init.load
select. A name is a '/'-joined path such as
'image_encoder/blocks/0/attention/qkv/kernel' (jaxcl.models.param_groups
makes them from a tree of parameters).

A pattern matches a name when it matches the whole name (re.fullmatch), as
big_vision's and open_clip's freezing options do: 'image_encoder/.*' is the
image tower, 'text_encoder/blocks/(0|1)/.*' its first two blocks. A leaf:
config validation checks patterns with it before jax is imported.
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence


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


def matching(all_names: Sequence[str], patterns: Sequence[str]) -> set[str]:
  """The names some pattern matches."""
  compiled = [re.compile(p) for p in patterns]
  return {n for n in all_names if any(p.fullmatch(n) for p in compiled)}


def unmatched(all_names: Sequence[str], patterns: Sequence[str]) -> list[str]:
  """The patterns that match no name (a typo freezes nothing: an error)."""
  return [p for p in patterns if not matching(all_names, [p])]
