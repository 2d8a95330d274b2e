"""Parameters by name: '/'-joined paths such as
'image_encoder/blocks/0/attention/qkv/kernel', and trees of what the
patterns of jaxcl.name_patterns select (frozen parameters, learning-rate
multipliers).
"""

from __future__ import annotations

import re
from typing import Sequence

import jax

from jaxcl.name_patterns import compile_patterns


def path_name(key_path) -> str:
  """The '/'-joined name of a jax key path into an nnx.State of parameters
  (the trailing `.value` of each variable left out)."""
  parts = [str(getattr(k, 'key', getattr(k, 'idx', ''))) for k in key_path
           if not isinstance(k, jax.tree_util.GetAttrKey)]
  return '/'.join(parts)


def names(params) -> list[str]:
  """Every parameter's name, in the tree's order."""
  return [path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def selected(params, patterns: Sequence[str]):
  """A tree of bools like `params`: True where a pattern matches the name."""
  compiled = compile_patterns(patterns, 'patterns')
  return jax.tree_util.tree_map_with_path(
      lambda path, _: any(p.fullmatch(path_name(path)) for p in compiled), params)


def multipliers(params, rules: Sequence[tuple[str, float]]):
  """A tree of floats like `params`: the factor of the first rule whose
  pattern matches the name, else 1."""
  compiled = [(re.compile(p), f) for p, f in rules]

  def factor(path, _):
    name = path_name(path)
    return next((f for p, f in compiled if p.fullmatch(name)), 1.0)
  return jax.tree_util.tree_map_with_path(factor, params)
