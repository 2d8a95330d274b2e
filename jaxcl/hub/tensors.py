"""Reading a checkpoint's tensors one at a time, and the rules that turn
them into jaxcl parameters.

Safetensors are read with the `safetensors` package as numpy arrays, never
through pickle, and lazily: a tensor is read when its rule asks for it, so
importing holds the converted parameters and one source tensor at a time.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np
from etils import epath

from jaxcl import errors

TORCH_FILES = ('.bin', '.pt', '.pth', '.ckpt')


class SourceError(errors.ConfigError):
  """A checkpoint that does not have the layout its config describes."""


class Tensors:
  """The named tensors of a .safetensors or .npz file, read on demand."""

  def __init__(self, path):
    self.path = epath.Path(path)
    if self.path.suffix in TORCH_FILES:
      raise SourceError(torch_file_message(self.path))
    if self.path.suffix == '.npz':
      self._npz = np.load(self.path, allow_pickle=False)
      self.shapes = {k: None for k in self._npz.files}
    else:
      from safetensors import safe_open  # pylint: disable=g-import-not-at-top
      self._file = safe_open(str(self.path), framework='numpy')
      self.shapes = {k: tuple(self._file.get_slice(k).get_shape()) for k in self._file.keys()}
    self.used: set[str] = set()

  def keys(self):
    return self.shapes.keys()

  def __contains__(self, key):
    return key in self.shapes

  def __getitem__(self, key) -> np.ndarray:
    if key not in self.shapes:
      raise SourceError(f'{self.path.name} has no tensor {key!r}, which its config implies')
    self.used.add(key)
    array = self._npz[key] if hasattr(self, '_npz') else self._file.get_tensor(key)
    return np.asarray(array, np.float32)


def torch_file_message(path) -> str:
  return (f'{path} is a pickled torch checkpoint, which jaxcl does not read; convert it '
          f'to safetensors first: python -c "import torch, safetensors.torch as st; '
          f'st.save_file(torch.load(\'{path}\', map_location=\'cpu\'), \'model.safetensors\')"')


@dataclasses.dataclass(frozen=True)
class Rule:
  """The parameter `target` (a '/'-joined path of jaxcl's model) made from
  the source tensors `sources` by `convert`."""
  target: str
  sources: tuple[str, ...]
  convert: Callable[..., np.ndarray]


# torch layouts -> Flax layouts.
def linear(w):  # [out, in] -> kernel [in, out]
  return w.T


def fused_linear(*ws):  # q, k, v weights [out, in] each -> kernel [in, 3 out]
  return np.concatenate([w.T for w in ws], axis=1)


def concat(*bs):
  return np.concatenate(bs, axis=0)


def conv(w):  # [out, in, kh, kw] -> [kh, kw, in, out]
  return w.transpose(2, 3, 1, 0)


def same(x):
  return x


def leading_one(x):  # [n, d] or [d] -> [1, n, d] or [1, 1, d]
  return x.reshape(1, *([1] if x.ndim == 1 else []), *x.shape)


def negated_scalar(x):  # logit scale s = log(1/τ) -> log τ
  return -x.reshape(())


def scalar(x):
  return x.reshape(())


def rule(target, sources: str | Sequence[str], convert=same) -> Rule:
  return Rule(target, (sources,) if isinstance(sources, str) else tuple(sources), convert)


def norm(target, source, scale='weight', bias='bias') -> list[Rule]:
  return [rule(f'{target}/scale', f'{source}.{scale}'), rule(f'{target}/bias', f'{source}.{bias}')]


def dense(target, source, bias=True, convert=linear) -> list[Rule]:
  rules = [rule(f'{target}/kernel', f'{source}.weight', convert)]
  return rules + ([rule(f'{target}/bias', f'{source}.bias')] if bias else [])


def block(target, source, names: dict) -> list[Rule]:
  """A pre-LN Transformer block. names: the source's sub-module names for
  norm1, norm2, out, mlp_in, mlp_out, and either qkv (one fused
  [3 width, width] weight, with 'qkv_weight'/'qkv_bias' as its tensor names)
  or q, k, v (three linears)."""
  rules = (norm(f'{target}/norm1', f'{source}.{names["norm1"]}')
           + norm(f'{target}/norm2', f'{source}.{names["norm2"]}')
           + dense(f'{target}/attention/out', f'{source}.{names["out"]}')
           + dense(f'{target}/mlp_in', f'{source}.{names["mlp_in"]}')
           + dense(f'{target}/mlp_out', f'{source}.{names["mlp_out"]}'))
  if 'qkv' in names:
    weight, bias = names.get('qkv_weight', 'weight'), names.get('qkv_bias', 'bias')
    rules += [rule(f'{target}/attention/qkv/kernel', f'{source}.{names["qkv"]}{weight}', linear),
              rule(f'{target}/attention/qkv/bias', f'{source}.{names["qkv"]}{bias}')]
  else:
    qkv = [f'{source}.{names[x]}' for x in 'qkv']
    rules += [rule(f'{target}/attention/qkv/kernel', [f'{s}.weight' for s in qkv], fused_linear),
              rule(f'{target}/attention/qkv/bias', [f'{s}.bias' for s in qkv], concat)]
  return rules


def count_blocks(keys, prefix: str) -> int:
  """How many numbered blocks `prefix{i}.` the keys hold."""
  found = {int(k[len(prefix):].split('.')[0]) for k in keys
           if k.startswith(prefix) and k[len(prefix):].split('.')[0].isdigit()}
  if found != set(range(len(found))):
    raise SourceError(f'the blocks {prefix}N are not numbered 0..{len(found) - 1}')
  return len(found)
