"""Text tokenizers for the CLIP/SigLIP text tower: strings to fixed-length id rows.

Every encoded row has the same layout, whichever tokenizer made it:

  a start-of-text token (``sot_id``) if the tokenizer has one (else None),
  content tokens, one end-of-text token (``eot_id``), then ``pad_id`` up to
  ``max_length``.

The text model finds each row's end at its first ``eot_id``, so the EOT must be
in every row, the empty string included, and content never produces one.
Truncation therefore keeps the first ``max_length - 1`` content tokens
(``max_length - 2`` after a start token): open_clip's rule, big_vision's
"sticky" EOS. For the layout the pad value only has to be a valid id, but a
published model that attends to its pads (SigLIP, pooled at the last position)
needs its own: SigLIP pads with its EOS. The first EOT is then still the one
after the content.

Tokenizers:
  bytes: dependency-free default. UTF-8 bytes, byte b -> b + 2, pad 0, EOT 1,
    258 ids. Content can never produce an EOT.
  sentencepiece: a trained SentencePiece model; EOT is the model's EOS (never
    produced from text, as it is a control symbol), pad is its pad id, or 0.
    normalize='siglip' first canonicalizes text as transformers' SiglipTokenizer
    does; with pad_id=1 (the EOS of Google's c4_en model) the rows are
    SiglipTokenizer's (padding='max_length', truncation=True). The
    open_clip_* normalizations are open_clip's HFTokenizer cleanings, for
    open_clip's SigLIP models (`clean: canonicalize`). SigLIP 2's Gemma
    model with normalize='lower' and max_length=64 gives Siglip2Tokenizer's rows
    (no BOS, EOS 1, pad 0 on the right: the published tokenizer_config's).
  clip_bpe: CLIP's byte-level BPE (jaxcl.text.clip_bpe) from a vocabulary file, id
    for id as open_clip: SOT <|startoftext|>, EOT <|endoftext|> (49406, 49407),
    pad 0 (transformers' CLIPTokenizer pads with the EOT: pad_id=49407).

pad_id (-1: the tokenizer's own) sets the pad of sentencepiece and clip_bpe.

``save(directory)`` writes ``tokenizer.json`` (the ``spec()``) and any file the
tokenizer needs, and ``load_tokenizer(directory)`` rebuilds it, so a workdir or
an export carries the exact tokenizer its model was trained with and the same
ids come out later. The SentencePiece and CLIP BPE specs include their file's
SHA-256 so a swapped file is caught rather than silently giving different ids.
"""

from __future__ import annotations

import abc
import functools
import hashlib
import itertools
import json
import re
import string
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import sentencepiece
from etils import epath

from jaxcl import files, presets
from jaxcl.text import clip_bpe

TOKENIZERS = presets.TOKENIZERS
NORMALIZERS = presets.TEXT_NORMALIZERS
SPEC_FILE = files.TOKENIZER_FILE
SENTENCEPIECE_FILE = files.SENTENCEPIECE_FILE


class Tokenizer(abc.ABC):
  """Maps strings to int32 rows [n, max_length] laid out as the module docstring says."""

  vocab_size: int
  max_length: int
  pad_id: int
  eot_id: int
  sot_id: int | None = None

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

  def data_file(self) -> tuple[str, str, bytes] | None:
    """(spec key, file name, contents) of the file besides tokenizer.json that
    the spec refers to (a SentencePiece model, a BPE vocabulary), or None."""
    return None

  def _save_files(self, directory: epath.Path) -> None:
    if self.data_file() is not None:
      _, name, contents = self.data_file()
      files.write_atomically(directory / name, contents)


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
  """A SentencePiece model; EOT is its EOS id, pad its pad id (or 0 if it has none) unless
  `pad_id` >= 0; `normalize`: '' (text as it is), 'siglip' or 'lower'."""

  def __init__(self, model_file: str | epath.PathLike, max_length: int, pad_id: int = -1,
               normalize: str = ''):

    self.max_length = _check_max_length(max_length)
    if normalize not in NORMALIZERS:
      raise ValueError(f'text.normalize must be one of {NORMALIZERS}, got {normalize!r}')
    self.normalize = normalize
    # Kept so save() can copy the model wherever the tokenizer goes.
    self.model_bytes = epath.Path(model_file).read_bytes()
    self._sp = sentencepiece.SentencePieceProcessor(model_proto=self.model_bytes)
    if self._sp.eos_id() < 0:
      raise ValueError(f'SentencePiece model {model_file} has no EOS id, which the text model '
                       'needs as its end-of-text token; train it with eos_id >= 0')
    self.eot_id = self._sp.eos_id()
    self.vocab_size = self._sp.get_piece_size()
    # By default the model's pad id, or 0 (1 where 0 is the EOT: a masked pad need only
    # be valid, and not end the content early).
    self.pad_id = _pad_id(pad_id, self._sp.pad_id() if self._sp.pad_id() >= 0
                          else int(self.eot_id == 0), self.vocab_size)

  def encode(self, texts: Sequence[str]) -> np.ndarray:
    texts = list(_check_texts(texts))
    if self.normalize == 'siglip':
      texts = [_siglip_canonical(t) for t in texts]
    elif self.normalize == 'lower':
      texts = [_lower_each_character(t) for t in texts]
    elif self.normalize:
      texts = [_open_clip_clean(self.normalize.removeprefix('open_clip_'), t) for t in texts]
    pieces = [p[:self.max_length - 1] for p in self._sp.encode(texts, out_type=int)]
    content = np.fromiter(itertools.chain.from_iterable(pieces), np.int32)
    return _pack(content, [len(p) for p in pieces], self.max_length, self.pad_id, self.eot_id)

  def decode(self, ids: Any) -> list[str]:
    return self._sp.decode([row.tolist() for row in _rows_up_to_eot(ids, self.eot_id)])

  def spec(self) -> dict[str, Any]:
    # model_file is relative to the directory save() writes.
    spec = {'type': 'sentencepiece', 'model_file': SENTENCEPIECE_FILE,
            'sha256': hashlib.sha256(self.model_bytes).hexdigest(),
            'max_length': self.max_length, 'pad_id': self.pad_id, 'eot_id': self.eot_id,
            'vocab_size': self.vocab_size}
    if self.normalize:  # only then: tokenizer.json files written before it stay valid
      spec['normalize'] = self.normalize
    return spec

  def data_file(self) -> tuple[str, str, bytes]:
    return 'model_file', SENTENCEPIECE_FILE, self.model_bytes


_NO_PUNCTUATION = str.maketrans('', '', string.punctuation)


def _siglip_canonical(text: str) -> str:
  """transformers' SiglipTokenizer's text (big_vision's canonicalize_text): lower case,
  ASCII punctuation dropped, whitespace runs as one space, stripped. It also reads
  SentencePiece's space mark as a space."""
  text = text.replace('\u2581', ' ').lower().translate(_NO_PUNCTUATION)
  return re.sub(r'\s+', ' ', text).strip()


def _lower_each_character(text: str) -> str:
  """SigLIP 2's lower case as transformers' Siglip2Tokenizer makes it (the tokenizers
  library's Lowercase normalizer): character by character, so a final capital sigma
  becomes σ, where str.lower() would write ς."""
  return ''.join(character.lower() for character in text)


def _open_clip_clean(kind: str, text: str) -> str:
  """open_clip's HFTokenizer cleaning `kind` ('canonicalize', 'lower', 'whitespace'):
  basic_clean (ftfy, HTML entities), then its canonicalize_text (underscores as spaces,
  ASCII punctuation dropped, lower case) or lower case, whitespace runs as one space."""
  text = clip_bpe.basic_clean(text)
  if kind == 'canonicalize':
    text = text.replace('_', ' ').translate(_NO_PUNCTUATION).lower()
  elif kind == 'lower':
    text = text.lower()
  return ' '.join(text.split())


class ClipBpeTokenizer(Tokenizer):
  """CLIP's byte-level BPE (jaxcl.text.clip_bpe): SOT, content, EOT, then pads (0 as open_clip,
  unless `pad_id` >= 0)."""

  def __init__(self, vocab_file: str | epath.PathLike, max_length: int, pad_id: int = -1):
    self.max_length = _check_max_length(max_length)
    # Kept so save() can copy the vocabulary wherever the tokenizer goes.
    self.vocab_bytes = epath.Path(vocab_file).read_bytes()
    self._bpe = clip_bpe.ClipBpe(self.vocab_bytes, str(vocab_file))
    self.sot_id, self.eot_id = self._bpe.sot_id, self._bpe.eot_id
    self.vocab_size = self._bpe.vocab_size
    self.pad_id = _pad_id(pad_id, 0, self.vocab_size)
    # The copy keeps the file's form, which its content, not its name, told.
    self.vocab_name = (files.CLIP_BPE_GZ_FILE if self._bpe.kind == 'gz'
                       else files.CLIP_BPE_JSON_FILE)

  def encode(self, texts: Sequence[str]) -> np.ndarray:
    pieces = [p[:self.max_length - 2] for p in self._bpe.encode(_check_texts(texts))]
    content = np.fromiter(itertools.chain.from_iterable(pieces), np.int32)
    return _pack(content, [len(p) for p in pieces], self.max_length, self.pad_id, self.eot_id,
                 self.sot_id)

  def decode(self, ids: Any) -> list[str]:
    return [self._bpe.decode(row) for row in _rows_up_to_eot(ids, self.eot_id)]

  def spec(self) -> dict[str, Any]:
    # vocab_file is relative to the directory save() writes.
    return {'type': 'clip_bpe', 'vocab_file': self.vocab_name,
            'sha256': hashlib.sha256(self.vocab_bytes).hexdigest(),
            'max_length': self.max_length, 'pad_id': self.pad_id, 'sot_id': self.sot_id,
            'eot_id': self.eot_id, 'vocab_size': self.vocab_size}

  def data_file(self) -> tuple[str, str, bytes]:
    return 'vocab_file', self.vocab_name, self.vocab_bytes


def build_tokenizer(text_cfg: Any) -> Tokenizer:
  """The tokenizer `text_cfg` names (fields tokenizer, max_length and, as it needs them,
  sentencepiece_model, vocab_file, pad_id, normalize; one absent takes its default)."""
  name = text_cfg.tokenizer
  pad_id, normalize = getattr(text_cfg, 'pad_id', -1), getattr(text_cfg, 'normalize', '')
  if name not in TOKENIZERS:
    raise ValueError(f'text.tokenizer must be one of {TOKENIZERS}, got {name!r}')
  if normalize not in NORMALIZERS:
    raise ValueError(f'text.normalize must be one of {NORMALIZERS}, got {normalize!r}')
  if normalize and name != 'sentencepiece':
    raise ValueError(f'text.normalize={normalize} is for text.tokenizer=sentencepiece, '
                     f'not {name}')
  if name == 'bytes':
    if pad_id != -1:
      raise ValueError(f'text.pad_id is for sentencepiece and clip_bpe; bytes pads with 0, '
                       f'got text.pad_id={pad_id}')
    return ByteTokenizer(text_cfg.max_length)
  if name == 'sentencepiece':
    model = _existing_file(text_cfg, 'sentencepiece_model', name, 'a path')
    return _cached(SentencePieceTokenizer, 'sentencepiece_model', model, text_cfg.max_length,
                   pad_id, normalize, version=_version(model))
  vocab = _existing_file(text_cfg, 'vocab_file', name,
                         "open_clip's bpe_simple_vocab_16e6.txt.gz or a tokenizer.json")
  return _cached(ClipBpeTokenizer, 'vocab_file', vocab, text_cfg.max_length, pad_id,
                 version=_version(vocab))


def _existing_file(text_cfg: Any, field: str, tokenizer: str, what: str) -> str:
  path = getattr(text_cfg, field, None)
  if not path:
    raise ValueError(f'text.tokenizer={tokenizer} needs text.{field} ({what})')
  if not epath.Path(path).is_file():
    raise ValueError(f'text.{field} {path} does not exist')
  return str(path)


def _version(path: str) -> tuple:
  stat = epath.Path(path).stat()
  return stat.mtime, stat.length


@functools.lru_cache(maxsize=4)
def _cached(cls, field: str, path: str, *args, version) -> Tokenizer:
  """Validation and set-up both build the tokenizer: its file is read once. `version`
  ((mtime, size), in the cache key): a file rewritten is read again."""
  del version
  try:
    return cls(path, *args)
  except OSError as e:
    raise ValueError(f'text.{field} {path} cannot be read: {e}') from None


def load_tokenizer(directory: str | epath.PathLike) -> Tokenizer:
  """Rebuilds the tokenizer that `save(directory)` wrote."""
  directory = epath.Path(directory)
  spec = json.loads((directory / SPEC_FILE).read_text())
  if spec.get('type') == 'bytes':
    tokenizer = ByteTokenizer(spec['max_length'])
  elif spec.get('type') == 'sentencepiece':
    tokenizer = SentencePieceTokenizer(directory / spec['model_file'], spec['max_length'],
                                       spec['pad_id'], spec.get('normalize', ''))
  elif spec.get('type') == 'clip_bpe':
    tokenizer = ClipBpeTokenizer(directory / spec['vocab_file'], spec['max_length'],
                                 spec['pad_id'])
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


def _pad_id(pad_id: int, default: int, vocab_size: int) -> int:
  if pad_id == -1:
    return default
  if int(pad_id) != pad_id or not 0 <= pad_id < vocab_size:
    raise ValueError(f"text.pad_id must be -1 (the tokenizer's own) or an id in "
                     f'[0, {vocab_size}), got {pad_id}')
  return int(pad_id)


def _pack(content: np.ndarray, lengths: Sequence[int], max_length: int, pad_id: int,
          eot_id: int, sot_id: int | None = None) -> np.ndarray:
  """Lays out rows: content [sum(lengths)] (already truncated) -> int32 [n, max_length]."""
  lengths = np.asarray(lengths, np.int64)
  out = np.full((len(lengths), max_length), pad_id, np.int32)
  start = int(sot_id is not None)
  if sot_id is not None:
    out[:, 0] = sot_id
  # Boolean indexing fills row-major, i.e. each row's content in order.
  positions = np.arange(max_length) - start
  out[(positions >= 0) & (positions < lengths[:, None])] = content
  out[np.arange(len(lengths)), start + lengths] = eot_id
  return out


def _rows_up_to_eot(ids: Any, eot_id: int) -> Iterable[np.ndarray]:
  """Each row of ids [n, L] or [L] cut before its first EOT (whole if it has none)."""
  ids = np.atleast_2d(np.asarray(ids))
  if ids.ndim != 2:
    raise ValueError(f'decode() takes ids [n, L] or [L], got shape {ids.shape}')
  for row in ids:
    eot = np.flatnonzero(row == eot_id)
    yield row[:eot[0]] if eot.size else row
