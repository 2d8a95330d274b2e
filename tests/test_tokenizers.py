"""Tokenizers: the row layout (content, one EOT, pads), round trips, save/load, config errors."""

import io
import json

import ml_collections
import numpy as np
import pytest

from jaxcl.text import tokenizers
from jaxcl.text.tokenizers import ByteTokenizer, build_tokenizer, load_tokenizer

CAPTIONS = [
    'a small red circle in the top left',
    'a big blue square in the bottom right',
    'two green triangles near the center',
    'one yellow star above a purple line',
    'the red square is left of the blue circle',
]


def _check_layout(ids, tokenizer, lengths):
  """Each row: `length` content ids, exactly one EOT, then pads."""
  assert ids.dtype == np.int32 and ids.shape == (len(lengths), tokenizer.max_length)
  for row, n in zip(ids, lengths):
    assert n < tokenizer.max_length
    assert np.count_nonzero(row == tokenizer.eot_id) == 1 and row[n] == tokenizer.eot_id
    assert (row[n + 1:] == tokenizer.pad_id).all()


@pytest.mark.parametrize('text', ['a small red circle in the top left', 'café ☕'])
def test_bytes_round_trip(text):
  tok = ByteTokenizer(64)
  ids = tok.encode([text])
  _check_layout(ids, tok, [len(text.encode('utf-8'))])
  assert tok.decode(ids) == [text]
  assert tok.decode(ids[0]) == [text]  # one row [L] gives one string


def test_bytes_exact_ids_and_empty_string():
  tok = ByteTokenizer(5)
  assert (tok.vocab_size, tok.pad_id, tok.eot_id) == (258, 0, 1)
  ids = tok.encode(['ab', '', 'é'])
  np.testing.assert_array_equal(ids, [[99, 100, 1, 0, 0],  # 'a' = 97, 'b' = 98, shifted by 2
                                      [1, 0, 0, 0, 0],  # EOT even for the empty string
                                      [0xC3 + 2, 0xA9 + 2, 1, 0, 0]])  # é is C3 A9 in UTF-8
  assert tok.decode(ids) == ['ab', '', 'é']
  assert tok.encode([]).shape == (0, 5)


def test_bytes_truncation_keeps_eot():
  tok = ByteTokenizer(8)
  ids = tok.encode(['abcdefghijklmnop', 'abcdefg', '☕☕☕'])
  _check_layout(ids, tok, [7, 7, 7])
  assert tok.decode(ids)[:2] == ['abcdefg', 'abcdefg']
  # 7 bytes = two whole 3-byte characters and a cut one, decoded with a replacement mark.
  assert tok.decode(ids)[2] == '☕☕\ufffd'


def test_bytes_rejects_a_lone_string():
  with pytest.raises(TypeError):
    ByteTokenizer(8).encode('abc')


def test_bytes_save_load(tmp_path):
  tok = ByteTokenizer(16)
  spec = tok.save(tmp_path)
  assert spec == {'type': 'bytes', 'max_length': 16, 'pad_id': 0, 'eot_id': 1,
                  'byte_offset': 2, 'vocab_size': 258}
  assert json.loads((tmp_path / 'tokenizer.json').read_text()) == spec
  loaded = load_tokenizer(tmp_path)
  assert isinstance(loaded, ByteTokenizer)
  np.testing.assert_array_equal(loaded.encode(CAPTIONS), tok.encode(CAPTIONS))


def _train_sentencepiece(path, vocab_size=60, eos_id=2):
  """Trains a tiny unigram model on CAPTIONS in-process and writes it to `path`."""
  spm = pytest.importorskip('sentencepiece')
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(CAPTIONS * 4), model_writer=model, vocab_size=vocab_size,
      model_type='unigram', pad_id=0, unk_id=1, bos_id=-1, eos_id=eos_id,
      hard_vocab_limit=False, minloglevel=2)  # vocab_size is only an upper bound
  path.write_bytes(model.getvalue())
  return str(path)


@pytest.fixture
def sp_model(tmp_path):
  return _train_sentencepiece(tmp_path / 'captions.model')


def test_sentencepiece_round_trip_and_layout(sp_model):
  tok = tokenizers.SentencePieceTokenizer(sp_model, 32)
  assert (tok.pad_id, tok.eot_id) == (0, 2) and tok.vocab_size > 3
  texts = CAPTIONS[:3] + ['']
  ids = tok.encode(texts)
  lengths = [len(tok._sp.encode(t)) for t in texts]
  _check_layout(ids, tok, lengths)
  assert lengths[-1] == 0 and ids[-1, 0] == tok.eot_id
  assert tok.decode(ids) == texts


def test_sentencepiece_truncation_keeps_eot(sp_model):
  tok = tokenizers.SentencePieceTokenizer(sp_model, 6)
  full = tokenizers.SentencePieceTokenizer(sp_model, 64).encode(CAPTIONS)
  ids = tok.encode(CAPTIONS)
  _check_layout(ids, tok, [5] * len(CAPTIONS))
  np.testing.assert_array_equal(ids[:, :5], full[:, :5])


def test_sentencepiece_save_load(sp_model, tmp_path):
  tok = tokenizers.SentencePieceTokenizer(sp_model, 32)
  out = tmp_path / 'export'
  spec = tok.save(out)
  assert spec['type'] == 'sentencepiece' and spec['model_file'] == 'tokenizer.model'
  assert (out / 'tokenizer.model').read_bytes() == (tmp_path / 'captions.model').read_bytes()
  assert json.loads((out / 'tokenizer.json').read_text()) == spec
  loaded = load_tokenizer(out)
  np.testing.assert_array_equal(loaded.encode(CAPTIONS), tok.encode(CAPTIONS))
  # A different model behind the same tokenizer.json would give other ids: refused.
  _train_sentencepiece(out / 'tokenizer.model', vocab_size=40)
  with pytest.raises(ValueError, match='does not match'):
    load_tokenizer(out)


def test_sentencepiece_without_eos_is_refused(tmp_path):
  model = _train_sentencepiece(tmp_path / 'no_eos.model', eos_id=-1)
  with pytest.raises(ValueError, match='no EOS'):
    tokenizers.SentencePieceTokenizer(model, 16)


def _text_cfg(**kwargs):
  return ml_collections.ConfigDict(
      {'tokenizer': 'bytes', 'sentencepiece_model': '', 'max_length': 16, **kwargs})


def test_build_tokenizer(sp_model):
  assert isinstance(build_tokenizer(_text_cfg()), ByteTokenizer)
  tok = build_tokenizer(_text_cfg(tokenizer='sentencepiece', sentencepiece_model=sp_model))
  assert isinstance(tok, tokenizers.SentencePieceTokenizer) and tok.max_length == 16


@pytest.mark.parametrize('overrides, match', [
    ({'tokenizer': 'wordpiece'}, 'must be one of'),
    ({'tokenizer': 'sentencepiece'}, 'needs text.sentencepiece_model'),
    ({'tokenizer': 'sentencepiece', 'sentencepiece_model': '/nonexistent/x.model'},
     'does not exist'),
    ({'max_length': 1}, 'max_length'),
])
def test_build_tokenizer_errors(overrides, match):
  with pytest.raises(ValueError, match=match):
    build_tokenizer(_text_cfg(**overrides))
