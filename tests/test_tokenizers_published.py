"""The tokenizers against the published ones: clip_bpe id for id as open_clip
(CLIP's original) and transformers' CLIPTokenizer, sentencepiece with
normalize='siglip' and pad_id=1 as transformers' SiglipTokenizer."""

import gzip
import io
import json
import random
import warnings

import ml_collections
import numpy as np
import pytest
import sentencepiece

from jaxcl.text import clip_bpe, tokenizers
from jaxcl.text.tokenizers import ClipBpeTokenizer, SentencePieceTokenizer, build_tokenizer

SOT, EOT = 49406, 49407
# Texts on which open_clip and transformers agree: nothing ftfy or html.unescape would change.
PLAIN = [
    'a photo of a cat.', '', '   ', 'Hello, World! 123 4.5% (x-ray) [a/b] {c}',
    "don't stop, it's what we're doing; I'll've",
    'Café naïve résumé Ørsted Ångström', '東京タワー 北京 서울 ひらがな', 'emoji 🐱🐶👍🏽 ❤️ 🇯🇵',
    '  tabs\tand\nnew lines   and  spaces  ', 'UPPER lower MiXeD', '½ ² ⅷ ١٢٣ 3.14159',
    'a_b-c/d\\e|f~g`h^i@j#k$', 'ok' * 100,  # one long word
    'the quick brown fox jumps over the lazy dog ' * 10,  # longer than 77 tokens: cut
]
# Texts that ftfy or html.unescape change: open_clip cleans them, transformers does not.
CLEANED = ['don’t “quote” it', 'fish &amp; chips &lt;b&gt; &quot;hi&quot; &#39;x&#39;',
           '&amp;amp; twice', 'cafÃ© mojibake', 'ﬁne ligature']


@pytest.fixture(scope='module')
def vocab_gz():
  from open_clip.tokenizer import default_bpe
  return default_bpe()


@pytest.fixture(scope='module')
def clip(vocab_gz):
  return ClipBpeTokenizer(vocab_gz, 77)


@pytest.fixture(scope='module')
def hf_clip(vocab_gz):
  """transformers' CLIPTokenizer on the same vocabulary (it takes vocab and merges)."""
  from transformers import CLIPTokenizer
  _, vocab, merges = clip_bpe.read_vocab(open(vocab_gz, 'rb').read(), vocab_gz)
  return CLIPTokenizer(vocab=vocab, merges=merges)


def _check_layout(ids, tok):
  """SOT, content, exactly one EOT, then pads."""
  for row in ids:
    end = np.flatnonzero(row == tok.eot_id)
    assert row[0] == tok.sot_id and end.size == 1, row
    assert (row[end[0] + 1:] == tok.pad_id).all() and tok.sot_id not in row[1:end[0]]


def test_clip_bpe_matches_open_clip(clip):
  import open_clip
  texts = PLAIN + CLEANED
  ids = clip.encode(texts)
  assert ids.dtype == np.int32 and (clip.sot_id, clip.eot_id, clip.pad_id) == (SOT, EOT, 0)
  assert clip.vocab_size == 49408
  np.testing.assert_array_equal(ids, open_clip.tokenize(texts, context_length=77).numpy())
  _check_layout(ids, clip)
  simple = open_clip.tokenizer.SimpleTokenizer()
  assert clip.decode(ids[:2]) == [simple.decode(simple.encode(t)).strip() for t in texts[:2]]


@pytest.mark.parametrize('length', [2, 3, 8])
def test_clip_bpe_truncation_is_open_clips(vocab_gz, length):
  import open_clip
  tok = ClipBpeTokenizer(vocab_gz, length)
  ids = tok.encode(PLAIN)
  # tokens[:context_length], the last set to EOT: SOT + the first length - 2 + EOT.
  np.testing.assert_array_equal(ids, open_clip.tokenize(PLAIN, context_length=length).numpy())
  _check_layout(ids, tok)


def test_clip_bpe_fuzz_matches_open_clip(clip):
  """Random text over scripts, marks, symbols and the regex's corner cases ("'ſ", which
  CLIP's case-insensitive split reads as "'s"; U+0345, which it drops)."""
  from open_clip.tokenizer import SimpleTokenizer
  rng = random.Random(0)
  pool = ([chr(c) for c in range(0x20, 0x2000)] + list('東京🐱👍🏽❤️’“”&;#<>ſİͅ\u00a0\u2003') +
          list("ab '’s") * 40)
  texts = [''.join(rng.choice(pool) for _ in range(rng.randrange(30))) for _ in range(300)]
  simple = SimpleTokenizer()
  content = [list(row[1:np.flatnonzero(row == EOT)[0]]) for row in clip.encode(texts)]
  assert content == [simple.encode(t)[:75] for t in texts]


def test_clip_bpe_matches_transformers(clip, hf_clip, vocab_gz):
  hf = lambda texts: np.array(hf_clip(texts, padding='max_length', max_length=77,
                                      truncation=True)['input_ids'])
  # transformers pads with the EOT, the one difference in layout: pad_id says so.
  tok = ClipBpeTokenizer(vocab_gz, 77, pad_id=EOT)
  ids = tok.encode(PLAIN)
  np.testing.assert_array_equal(ids, hf(PLAIN))
  ids[np.arange(77) > np.argmax(ids == EOT, axis=1)[:, None]] = 0  # open_clip's pads
  np.testing.assert_array_equal(ids, clip.encode(PLAIN))
  # Without ftfy and html.unescape, transformers tokenizes such text otherwise; jaxcl is
  # open_clip's (the original CLIP's, what its weights were trained on). Cleaned as open_clip
  # cleans, transformers agrees.
  for text in CLEANED:
    assert (tok.encode([text]) != hf([text])).any(), text
  np.testing.assert_array_equal(tok.encode(CLEANED), hf([clip_bpe.clean(t) for t in CLEANED]))


def test_special_token_names_are_text(clip):
  """open_clip reads <end_of_text>, transformers <|endoftext|> in a text as the EOT; jaxcl
  reads both as text, so the EOT that ends the content stays the only one."""
  import open_clip
  texts = ['a <|endoftext|> b', 'a <end_of_text> b <start_of_text>']
  ids = clip.encode(texts)
  _check_layout(ids, clip)
  assert (open_clip.tokenize(texts[1:]).numpy() == EOT).sum() == 2


def test_tokenizer_json_gives_the_same_ids(tmp_path, clip, hf_clip):
  path = tmp_path / 'tokenizer.json'
  hf_clip.backend_tokenizer.save(str(path))
  tok = ClipBpeTokenizer(path, 77)
  np.testing.assert_array_equal(tok.encode(PLAIN + CLEANED), clip.encode(PLAIN + CLEANED))
  assert tok.spec()['vocab_file'] == 'tokenizer.bpe.json'
  assert {k: v for k, v in tok.spec().items() if k not in ('vocab_file', 'sha256')} == {
      k: v for k, v in clip.spec().items() if k not in ('vocab_file', 'sha256')}
  # Older tokenizer.json files write each merge as one string "a b".
  spec = json.loads(path.read_text())
  spec['model']['merges'] = [' '.join(m) for m in spec['model']['merges']]
  path.write_text(json.dumps(spec))
  np.testing.assert_array_equal(ClipBpeTokenizer(path, 77).encode(PLAIN), clip.encode(PLAIN))


def test_clip_bpe_save_load(tmp_path, clip, vocab_gz):
  spec = clip.save(tmp_path)
  assert spec == {'type': 'clip_bpe', 'vocab_file': 'tokenizer.bpe.txt.gz',
                  'sha256': spec['sha256'], 'max_length': 77, 'pad_id': 0, 'sot_id': SOT,
                  'eot_id': EOT, 'vocab_size': 49408}
  assert (tmp_path / 'tokenizer.bpe.txt.gz').read_bytes() == open(vocab_gz, 'rb').read()
  loaded = tokenizers.load_tokenizer(tmp_path)
  assert isinstance(loaded, ClipBpeTokenizer)
  np.testing.assert_array_equal(loaded.encode(PLAIN), clip.encode(PLAIN))
  # Another file behind the same tokenizer.json is refused, even one whose ids would agree
  # (only its header line differs): the SHA-256 tells.
  lines = gzip.decompress((tmp_path / 'tokenizer.bpe.txt.gz').read_bytes()).split(b'\n')
  (tmp_path / 'tokenizer.bpe.txt.gz').write_bytes(
      gzip.compress(b'\n'.join([b'#v2'] + lines[1:]), compresslevel=1))
  with pytest.raises(ValueError, match='does not match'):
    tokenizers.load_tokenizer(tmp_path)


def _text_cfg(**kwargs):
  return ml_collections.ConfigDict({'tokenizer': 'bytes', 'sentencepiece_model': '',
                                    'vocab_file': '', 'pad_id': -1, 'normalize': '',
                                    'max_length': 16, **kwargs})


def test_build_clip_bpe(vocab_gz):
  tok = build_tokenizer(_text_cfg(tokenizer='clip_bpe', vocab_file=vocab_gz, max_length=77))
  assert isinstance(tok, ClipBpeTokenizer) and tok.max_length == 77 and tok.pad_id == 0
  assert build_tokenizer(_text_cfg(tokenizer='clip_bpe', vocab_file=vocab_gz, pad_id=EOT)
                         ).pad_id == EOT


@pytest.mark.parametrize('overrides, match', [
    ({'tokenizer': 'clip_bpe'}, 'needs text.vocab_file'),
    ({'tokenizer': 'clip_bpe', 'vocab_file': '/nonexistent/v.txt.gz'}, 'does not exist'),
    ({'tokenizer': 'clip_bpe', 'vocab_file': 'GARBAGE'}, 'neither a gzipped merges list nor'),
    ({'tokenizer': 'clip_bpe', 'vocab_file': 'BAD_GZ'}, 'not CLIP\'s merges list'),
    ({'tokenizer': 'clip_bpe', 'vocab_file': 'VOCAB', 'pad_id': 49408}, 'text.pad_id must be'),
    ({'tokenizer': 'clip_bpe', 'vocab_file': 'VOCAB', 'normalize': 'siglip'},
     'is for text.tokenizer=sentencepiece'),
    ({'normalize': 'nfkc'}, 'text.normalize must be one of'),
    ({'pad_id': 3}, 'bytes pads with 0'),
])
def test_build_errors(tmp_path, vocab_gz, overrides, match):
  files = {'GARBAGE': b'not a vocabulary', 'BAD_GZ': gzip.compress(b'#v\na b\n')}
  if overrides.get('vocab_file') in files:
    (tmp_path / 'v').write_bytes(files[overrides['vocab_file']])
    overrides['vocab_file'] = str(tmp_path / 'v')
  elif overrides.get('vocab_file') == 'VOCAB':
    overrides['vocab_file'] = vocab_gz
  with pytest.raises(ValueError, match=match):
    build_tokenizer(_text_cfg(**overrides))


# ------------------------------------------------------------------------------- SigLIP ---
SIGLIP_TEXTS = [
    'A small red circle, in the top-left!', 'a big blue square in the bottom right',
    'Two green triangles near the center.', 'one yellow star above a purple line',
    'The RED square is left of the blue circle?', 'the blue circle (big) is right',
]
SIGLIP_CORPUS = SIGLIP_TEXTS + [
    '', '   ', '!!!', "it's the cat's toy", 'a  small\tred\ncircle ', 'Café ☕ 東京 “quoted”',
    '▁a ▁▁b', 'zzz qqq', 'x', '@#$%^&*', '   leading and trailing   ', 'ﬁ Ⅻ ½',
    ' '.join(SIGLIP_TEXTS) * 3,  # longer than 64 tokens: cut
]


@pytest.fixture(scope='module')
def siglip_model(tmp_path_factory):
  """A tiny unigram model with the special ids of Google's c4_en: pad 0, EOS 1, unk 2."""
  model, path = io.BytesIO(), tmp_path_factory.mktemp('siglip') / 'spiece.model'
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter([t.lower() for t in SIGLIP_TEXTS] * 4), model_writer=model,
      vocab_size=80, model_type='unigram', pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
      hard_vocab_limit=False, minloglevel=2)
  path.write_bytes(model.getvalue())
  return str(path)


@pytest.mark.parametrize('max_length', [16, 64])
@pytest.mark.parametrize('legacy', [True, False])
def test_sentencepiece_siglip_matches_transformers(siglip_model, max_length, legacy):
  from transformers import SiglipTokenizer
  hf = SiglipTokenizer(vocab_file=siglip_model, legacy=legacy)
  assert (hf.pad_token_id, hf.eos_token_id, hf.unk_token_id) == (1, 1, 2)
  tok = build_tokenizer(_text_cfg(tokenizer='sentencepiece', sentencepiece_model=siglip_model,
                                  pad_id=1, normalize='siglip', max_length=max_length))
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    expected = hf(SIGLIP_CORPUS, padding='max_length', max_length=max_length, truncation=True)
  np.testing.assert_array_equal(tok.encode(SIGLIP_CORPUS), expected['input_ids'])
  assert (tok.pad_id, tok.eot_id) == (1, 1)


def test_sentencepiece_siglip_layout_and_spec(siglip_model, tmp_path):
  tok = SentencePieceTokenizer(siglip_model, 16, pad_id=1, normalize='siglip')
  ids = tok.encode(['The RED square!', ''])
  # Pads are EOTs too: the first EOT ends the content.
  assert ids[1, 0] == 1 and (ids[0, :np.argmax(ids[0] == 1)] > 2).all()
  assert tok.decode(ids) == ['the red square', '']
  spec = tok.save(tmp_path)
  assert (spec['pad_id'], spec['normalize']) == (1, 'siglip')
  np.testing.assert_array_equal(tokenizers.load_tokenizer(tmp_path).encode(SIGLIP_CORPUS),
                                tok.encode(SIGLIP_CORPUS))
  # The defaults add no key: tokenizer.json files written before these options still load.
  assert 'normalize' not in SentencePieceTokenizer(siglip_model, 16).spec()
  assert SentencePieceTokenizer(siglip_model, 16).pad_id == 0


def test_sentencepiece_special_token_names_are_text(siglip_model):
  """SiglipTokenizer maps '</s>' in a text to its EOS; jaxcl keeps the text's only EOT last."""
  tok = SentencePieceTokenizer(siglip_model, 16, pad_id=1, normalize='siglip')
  ids = tok.encode(['a </s> b'])[0]
  assert np.argmax(ids == 1) == len(tok._sp.encode('a s b'))


# SigLIP 2's Gemma tokenizer: a BPE SentencePiece model with byte fallback and Gemma's
# special pieces and options, at a size this test can train.
GEMMA_CORPUS = SIGLIP_CORPUS + PLAIN + [
    'İstanbul ΣΑΣ straße ǅ',  # lower case character by character: final Σ becomes σ
    'ＡＢＣ full width', '\u00a0no-break\u3000ideographic space', 'tabs\t\tand\n\nlines']


@pytest.fixture(scope='module')
def gemma_model(tmp_path_factory):
  model, directory = io.BytesIO(), tmp_path_factory.mktemp('gemma')
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter([t.lower() for t in SIGLIP_TEXTS + PLAIN] * 4), model_writer=model,
      vocab_size=700, model_type='bpe', pad_id=0, eos_id=1, bos_id=2, unk_id=3,
      pad_piece='<pad>', eos_piece='<eos>', bos_piece='<bos>', unk_piece='<unk>',
      user_defined_symbols=['<mask>'], byte_fallback=True, add_dummy_prefix=False,
      remove_extra_whitespaces=False, normalization_rule_name='identity', split_digits=True,
      allow_whitespace_only_pieces=True, hard_vocab_limit=False, minloglevel=2)
  (directory / 'tokenizer.model').write_bytes(model.getvalue())
  return directory


@pytest.mark.parametrize('max_length', [16, 64])
def test_sentencepiece_gemma_matches_siglip2_tokenizer(gemma_model, max_length):
  """transformers' Siglip2Tokenizer converted from the same model, with the published
  checkpoints' settings: no BOS, EOS appended, pad on the right."""
  from transformers import Siglip2Tokenizer
  hf = Siglip2Tokenizer.from_pretrained(gemma_model, add_bos_token=False, add_eos_token=True,
                                        padding_side='right')
  tok = build_tokenizer(_text_cfg(tokenizer='sentencepiece', normalize='lower',
                                  sentencepiece_model=str(gemma_model / 'tokenizer.model'),
                                  max_length=max_length))
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    expected = hf(GEMMA_CORPUS, padding='max_length', max_length=max_length, truncation=True)
  ids = tok.encode(GEMMA_CORPUS)
  np.testing.assert_array_equal(ids, expected['input_ids'])
  assert (tok.pad_id, tok.eot_id, tok.sot_id) == (0, 1, None)
  assert (ids[:, -1] == 1).any() and (ids == 3).sum() == 0  # some cut; bytes, never unk
  assert tok.decode(ids[:1]) == [GEMMA_CORPUS[0].lower()]
  # Siglip2Tokenizer reads '<eos>' in a text as its EOS; jaxcl keeps the only EOT last.
  assert (tok.encode(['a <eos> b'])[0] == 1).sum() == 1
