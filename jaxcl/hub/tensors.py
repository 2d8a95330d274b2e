"""Reading a checkpoint's tensors one at a time, the rules that turn them
into jaxcl parameters, and (export) their inverses and a streaming writer.

Safetensors are read with the `safetensors` package as numpy arrays, never
through pickle, and lazily: a tensor is read when its rule asks for it, so
importing holds the converted parameters and one source tensor at a time.
`write_safetensors` writes the header first and then one tensor at a time.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import struct
import zipfile
from typing import Callable, Sequence

import ml_dtypes
import numpy as np
from etils import epath
from safetensors import safe_open

from jaxcl import errors

TORCH_FILES = ('.bin', '.pt', '.pth', '.ckpt')
FLOAT_DTYPES = ('float16', 'bfloat16', 'float32', 'float64')
SAFETENSORS_DTYPES = {'F16': 'float16', 'BF16': 'bfloat16', 'F32': 'float32', 'F64': 'float64',
                      'I8': 'int8', 'I16': 'int16', 'I32': 'int32', 'I64': 'int64',
                      'U8': 'uint8', 'U16': 'uint16', 'U32': 'uint32', 'U64': 'uint64',
                      'BOOL': 'bool'}


class SourceError(errors.ConfigError):
  """A checkpoint that does not have the layout its config describes."""


class Tensors:
  """The named tensors of a .safetensors or .npz file, read on demand."""

  def __init__(self, path):
    self.path = epath.Path(path)
    if self.path.suffix in TORCH_FILES:
      raise SourceError(torch_file_message(self.path))
    if self.path.suffix == '.npz':
      with self.path.open('rb') as f:
        if not zipfile.is_zipfile(f):  # np.load would call it pickled data
          raise SourceError(f'{self.path} is not an npz file (a zip archive of .npy arrays)')
      self._npz = np.load(self.path, allow_pickle=False)
      self.shapes, self.dtypes = _npz_headers(self.path)
    else:
      self._file = safe_open(str(self.path), framework='numpy')
      slices = {k: self._file.get_slice(k) for k in self._file.keys()}
      self.shapes = {k: tuple(s.get_shape()) for k, s in slices.items()}
      self.dtypes = {k: SAFETENSORS_DTYPES.get(s.get_dtype(), s.get_dtype())
                     for k, s in slices.items()}
    self.used: set[str] = set()

  def keys(self):
    return self.shapes.keys()

  def __contains__(self, key):
    return key in self.shapes

  def __getitem__(self, key) -> np.ndarray:
    if key not in self.shapes:
      raise SourceError(f'{self.path.name} has no tensor {key!r}, which its config implies')
    if self.dtypes[key] not in FLOAT_DTYPES:  # an id table or a mask, say: never a weight
      raise SourceError(f'tensor {key} holds {self.dtypes[key]} values; a parameter is '
                        f'floating point ({", ".join(FLOAT_DTYPES)})')
    self.used.add(key)
    if hasattr(self, '_npz'):
      array = self._npz[key]
    elif self.dtypes[key] == 'bfloat16':  # numpy has no bfloat16
      array = _read_bfloat16(self.path, key)
    else:
      array = self._file.get_tensor(key)
    return np.asarray(array, np.float32)


def _read_bfloat16(path, key) -> np.ndarray:
  """A BF16 tensor of a .safetensors file, read from the offsets its header
  gives (the format: 8-byte header size, JSON header, raw little-endian data)."""
  with epath.Path(path).open('rb') as f:
    size = struct.unpack('<Q', f.read(8))[0]
    entry = json.loads(f.read(size))[key]
    start, end = entry['data_offsets']
    f.seek(8 + size + start)
    raw = f.read(end - start)
  return np.frombuffer(raw, ml_dtypes.bfloat16).reshape(entry['shape'])


def _npz_headers(path) -> tuple[dict, dict]:
  """({name: shape}, {name: dtype name}) of an .npz from its members' .npy
  headers, no array read."""
  shapes, dtypes = {}, {}
  with zipfile.ZipFile(epath.Path(path).open('rb')) as archive:
    for member in archive.namelist():
      with archive.open(member) as f:
        version = np.lib.format.read_magic(f)
        read = {(1, 0): np.lib.format.read_array_header_1_0,
                (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        shape, _, dtype = read(f) if read else _shape_and_dtype(np.lib.format.read_array(f))
      name = member.removesuffix('.npy')
      shapes[name], dtypes[name] = tuple(shape), np.dtype(dtype).name
  return shapes, dtypes


def _shape_and_dtype(array) -> tuple:
  return array.shape, None, array.dtype


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


def patch_kernel(patch: int):
  """A linear patch embedding [p p C, width] over (row, column, channel)-
  flattened patches (NaFlex's) -> the convolution kernel [p, p, C, width]
  whose flattening jaxcl's ViT applies to the same patches."""
  def convert(w):
    return w.reshape(patch, patch, -1, w.shape[1])
  return convert


def same(x):
  return x


def leading_one(x):  # [n, d] or [d] -> [1, n, d] or [1, 1, d]
  return x.reshape(1, *([1] if x.ndim == 1 else []), *x.shape)


def negated_scalar(x):  # logit scale s = log(1/τ) -> log τ
  return -x.reshape(())


def scalar(x):
  return x.reshape(())


# Flax layouts -> torch layouts (jaxcl export --format open_clip): each one-source
# conversion's inverse. They use only array methods, so jax.eval_shape gives the shapes.
def _drop_leading_ones(x):  # [1, 1, d] -> [d], [1, n, d] -> [n, d] (n > 1)
  return x.reshape(x.shape[2:] if x.shape[1] == 1 else x.shape[1:])


INVERSES = {
    linear: lambda kernel: kernel.T,
    conv: lambda kernel: kernel.transpose(3, 2, 0, 1),
    same: same,
    leading_one: _drop_leading_ones,
    negated_scalar: lambda log_tau: -log_tau,  # a 0-d logit scale, open_clip's own shape
    scalar: same,
}


def inverse(r: Rule) -> Callable[[np.ndarray], np.ndarray]:
  """The function from a jaxcl parameter back to the one tensor of `r`."""
  if len(r.sources) != 1 or r.convert not in INVERSES:
    raise ValueError(f'{r.target} comes from {len(r.sources)} tensors by {r.convert.__name__}, '
                     f'which has no inverse here')
  return INVERSES[r.convert]


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


def shape_of(shapes: dict, key: str, where: str) -> tuple:
  """The shape of tensor `key`, or SourceError naming it and `where` it was expected."""
  if key not in shapes:
    raise SourceError(f'{where} has no tensor {key!r}, which its architecture implies')
  return shapes[key]


def json_object(path) -> dict:
  """The JSON object in the file `path`; SourceError saying what it holds
  instead (malformed JSON raises json's own ValueError)."""
  value = json.loads(epath.Path(path).read_text())
  if not isinstance(value, dict):
    raise SourceError(f'{path} holds {json_kind(value)}, not a JSON object')
  return value


def section(parent: dict, key: str, where: str, null_is_empty: bool = False) -> dict:
  """parent[key], which must be a JSON object: {} if absent (or null, where
  the source's framework reads null as its defaults); SourceError naming
  `where` + key if it is anything else."""
  value = parent.get(key, {})
  if value is None and null_is_empty:
    return {}
  if not isinstance(value, dict):
    raise SourceError(f'{where}{key} is {json_kind(value)}, not an object')
  return value


def json_kind(value) -> str:
  """'a list', 'a number', 'null'...: what a JSON value is, for a message."""
  if value is None:
    return 'null'
  kinds = ((bool, 'a boolean'), (str, 'a string'), ((int, float), 'a number'), (list, 'a list'),
           (dict, 'an object'))
  return next(name for kind, name in kinds if isinstance(value, kind))


def count_blocks(keys, prefix: str) -> int:
  """How many numbered blocks `prefix{i}.` (or `prefix{i}/`) the keys hold."""
  number = lambda k: re.split(r'[./]', k[len(prefix):])[0]
  found = {int(number(k)) for k in keys if k.startswith(prefix) and number(k).isdigit()}
  if found != set(range(len(found))):
    raise SourceError(f'the blocks {prefix}N are not numbered 0..{len(found) - 1}')
  return len(found)


def write_safetensors(path, entries, metadata: dict | None = None) -> None:
  """Writes a .safetensors file of float32 tensors from `entries`, a list of
  (name, shape, fetch) where fetch() returns that tensor: the header first
  (names, shapes, offsets), then each tensor as it is fetched, so that at
  most one of them is in memory."""
  header, offset = {}, 0
  for name, shape, _ in entries:
    size = 4 * math.prod(shape)
    header[name] = {'dtype': 'F32', 'shape': list(shape), 'data_offsets': [offset, offset + size]}
    offset += size
  if metadata:
    header['__metadata__'] = metadata
  raw = json.dumps(header, separators=(',', ':')).encode()
  raw += b' ' * (-len(raw) % 8)  # the data starts 8-byte aligned
  with epath.Path(path).open('wb') as f:
    f.write(struct.pack('<Q', len(raw)))
    f.write(raw)
    for name, shape, fetch in entries:
      value = np.ascontiguousarray(fetch(), dtype='<f4')
      if value.size != math.prod(shape):
        raise ValueError(f'tensor {name} has shape {value.shape}, its header says {tuple(shape)}')
      f.write(value.tobytes())
