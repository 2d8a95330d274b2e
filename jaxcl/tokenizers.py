"""Text tokenizers for the CLIP/SigLIP text tower: strings to fixed-length id rows.

Every encoded row has the same layout, whichever tokenizer made it:

  content tokens, exactly one end-of-text token (``eot_id``), then ``pad_id``
  up to ``max_length``.

The text model pools at the first ``eot_id`` of each row and masks everything
after it, so the EOT must be in every row, the empty string included.
Truncation therefore keeps the first ``max_length - 1`` content tokens (CLIP's
rule), and the pad value only has to be a valid id: it is never attended to.

Tokenizers:
  bytes: dependency-free default. UTF-8 bytes, byte b -> b + 2, pad 0, EOT 1,
    258 ids. Content can never produce an EOT.
  sentencepiece: a trained SentencePiece model; EOT is the model's EOS (never
    produced from text, as it is a control symbol), pad is its pad id, or 0.

``save(directory)`` writes ``tokenizer.json`` (the ``spec()``) and any file the
tokenizer needs, and ``load_tokenizer(directory)`` rebuilds it, so a workdir or
an export carries the exact tokenizer its model was trained with and the same
ids come out later. The SentencePiece spec includes the model's SHA-256 so a
swapped model file is caught rather than silently giving different ids.
"""

from __future__ import annotations

import abc
import functools
import hashlib
import itertools
import json
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from etils import epath

from jaxcl import files, presets

TOKENIZERS = presets.TOKENIZERS
SPEC_FILE = files.TOKENIZER_FILE
SENTENCEPIECE_FILE = files.SENTENCEPIECE_FILE


class Tokenizer(abc.ABC):
  """Maps strings to int32 rows [n, max_length] laid out as the module docstring says."""

  vocab_size: int
  max_length: int
  pad_id: int
  eot_id: int

  @abc.abstractmethod
  def encode(self, texts: Sequence[str]) -> np.ndarray:
    """Encodes `texts` (n strings) into int32 ids [n, max_length]."""

  @abc.abstractmethod
  def decode(self, ids: Any) -> list[str]:
    """Decodes ids [n, L] into n strings (a row [L] into one), each up to its first EOT."""

  @abc.abstractmethod
  def spec(self) -> dict[str, Any]:
    """A JSON-serializable description that, with save()'s files, rebuilds this tokenizer."""

  def save(self, directory: str | epath.PathLike) -> dict[str, Any]:
    """Writes `directory/tokenizer.json` and any files the spec names; returns the spec."""
    directory = epath.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    self._save_files(directory)
    spec = self.spec()
    files.write_atomically(directory / SPEC_FILE, json.dumps(spec, indent=2, sort_keys=True) + '\n')
    return spec

  def _save_files(self, directory: epath.Path) -> None:
    """Writes the files other than tokenizer.json that the spec refers to (default: none)."""
    del directory


class ByteTokenizer(Tokenizer):
  """UTF-8 bytes as ids: byte b -> b + 2, pad 0, EOT 1."""

  byte_offset = 2

  def __init__(self, max_length: int):
    self.max_length = _check_max_length(max_length)
    self.pad_id = 0
    self.eot_id = 1
    self.vocab_size = 256 + self.byte_offset

  def encode(self, texts: Sequence[str]) -> np.ndarray:
    data = [t.encode('utf-8')[:self.max_length - 1] for t in _check_texts(texts)]
    content = np.frombuffer(b''.join(data), np.uint8).astype(np.int32) + self.byte_offset
    return _pack(content, [len(d) for d in data], self.max_length, self.pad_id, self.eot_id)

  def decode(self, ids: Any) -> list[str]:
    out = []
    for row in _rows_up_to_eot(ids, self.eot_id):
      row = row[(row >= self.byte_offset) & (row < self.vocab_size)]  # drop pads, if any
      # A truncated row can end inside a multibyte character.
      out.append((row - self.byte_offset).astype(np.uint8).tobytes().decode('utf-8', 'replace'))
    return out

  def spec(self) -> dict[str, Any]:
    return {'type': 'bytes', 'max_length': self.max_length, 'pad_id': self.pad_id,
            'eot_id': self.eot_id, 'byte_offset': self.byte_offset,
            'vocab_size': self.vocab_size}


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece model; EOT is its EOS id, pad its pad id (or 0 if it has none)."""

  def __init__(self, model_file: str | epath.PathLike, max_length: int):
    import sentencepiece  # Optional dependency: only this tokenizer needs it.

    self.max_length = _check_max_length(max_length)
    # Kept so save() can copy the model wherever the tokenizer goes.
    self.model_bytes = epath.Path(model_file).read_bytes()
    self._sp = sentencepiece.SentencePieceProcessor(model_proto=self.model_bytes)
    if self._sp.eos_id() < 0:
      raise ValueError(f'SentencePiece model {model_file} has no EOS id, which the text model '
                       'needs as its end-of-text token; train it with eos_id >= 0')
    self.eot_id = self._sp.eos_id()
    # Pads are never attended to, so any valid id will do; 0 unless that is the EOT, whose
    # first occurrence must stay the one after the content.
    self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else int(self.eot_id == 0)
    self.vocab_size = self._sp.get_piece_size()

  def encode(self, texts: Sequence[str]) -> np.ndarray:
    pieces = [p[:self.max_length - 1]
              for p in self._sp.encode(list(_check_texts(texts)), out_type=int)]
    content = np.fromiter(itertools.chain.from_iterable(pieces), np.int32)
    return _pack(content, [len(p) for p in pieces], self.max_length, self.pad_id, self.eot_id)

  def decode(self, ids: Any) -> list[str]:
    return self._sp.decode([row.tolist() for row in _rows_up_to_eot(ids, self.eot_id)])

  def spec(self) -> dict[str, Any]:
    # model_file is relative to the directory save() writes.
    return {'type': 'sentencepiece', 'model_file': SENTENCEPIECE_FILE,
            'sha256': hashlib.sha256(self.model_bytes).hexdigest(),
            'max_length': self.max_length, 'pad_id': self.pad_id, 'eot_id': self.eot_id,
            'vocab_size': self.vocab_size}

  def _save_files(self, directory: epath.Path) -> None:
    files.write_atomically(directory / SENTENCEPIECE_FILE, self.model_bytes)


def build_tokenizer(text_cfg: Any) -> Tokenizer:
  """The tokenizer `text_cfg` names (fields tokenizer, sentencepiece_model, max_length)."""
  name = text_cfg.tokenizer
  if name == 'bytes':
    return ByteTokenizer(text_cfg.max_length)
  if name == 'sentencepiece':
    model = getattr(text_cfg, 'sentencepiece_model', None)
    if not model:
      raise ValueError('text.tokenizer=sentencepiece needs text.sentencepiece_model (a path)')
    if not epath.Path(model).is_file():
      raise ValueError(f'text.sentencepiece_model {model} does not exist')
    # Validation and set-up both build it: the model file is read once.
    stat = epath.Path(model).stat()
    return _sentencepiece(str(model), text_cfg.max_length, (stat.mtime, stat.length))
  raise ValueError(f'text.tokenizer must be one of {TOKENIZERS}, got {name!r}')


@functools.lru_cache(maxsize=4)
def _sentencepiece(model: str, max_length: int, version) -> SentencePieceTokenizer:
  del version  # (mtime, size), in the cache key: a model file rewritten is read again
  return SentencePieceTokenizer(model, max_length)


def load_tokenizer(directory: str | epath.PathLike) -> Tokenizer:
  """Rebuilds the tokenizer that `save(directory)` wrote."""
  directory = epath.Path(directory)
  spec = json.loads((directory / SPEC_FILE).read_text())
  if spec.get('type') == 'bytes':
    tokenizer = ByteTokenizer(spec['max_length'])
  elif spec.get('type') == 'sentencepiece':
    tokenizer = SentencePieceTokenizer(directory / spec['model_file'], spec['max_length'])
  else:
    raise ValueError(f'{directory / SPEC_FILE}: unknown tokenizer type {spec.get("type")!r}')
  # Same ids later or an error: the rebuilt tokenizer must describe itself identically.
  if tokenizer.spec() != spec:
    raise ValueError(f'{directory / SPEC_FILE} does not match the tokenizer rebuilt from it: '
                     f'{spec} vs {tokenizer.spec()}')
  return tokenizer


def _check_max_length(max_length: int) -> int:
  if int(max_length) != max_length or max_length < 2:
    raise ValueError(f'text.max_length must be an integer >= 2 (content + EOT), got {max_length}')
  return int(max_length)


def _check_texts(texts: Sequence[str]) -> Sequence[str]:
  # A lone string is a Sequence[str] too, of characters: almost surely a mistake.
  if isinstance(texts, str):
    raise TypeError('encode() takes a sequence of strings, not one string')
  return texts


def _pack(content: np.ndarray, lengths: Sequence[int], max_length: int, pad_id: int,
          eot_id: int) -> np.ndarray:
  """Lays out rows: content [sum(lengths)] (already truncated) -> int32 [n, max_length]."""
  lengths = np.asarray(lengths, np.int64)
  out = np.full((len(lengths), max_length), pad_id, np.int32)
  # Boolean indexing fills row-major, i.e. each row's content in order.
  out[np.arange(max_length) < lengths[:, None]] = content
  out[np.arange(len(lengths)), lengths] = eot_id
  return out


def _rows_up_to_eot(ids: Any, eot_id: int) -> Iterable[np.ndarray]:
  """Each row of ids [n, L] or [L] cut before its first EOT (whole if it has none)."""
  ids = np.atleast_2d(np.asarray(ids))
  if ids.ndim != 2:
    raise ValueError(f'decode() takes ids [n, L] or [L], got shape {ids.shape}')
  for row in ids:
    eot = np.flatnonzero(row == eot_id)
    yield row[:eot[0]] if eot.size else row
