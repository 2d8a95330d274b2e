"""CLIP's byte-level BPE, id for id as open_clip's SimpleTokenizer (OpenAI's original).

A text is cleaned as open_clip cleans it (ftfy, HTML entities unescaped twice,
whitespace collapsed, lower case), split into words by CLIP's regex, and each
word's UTF-8 bytes, mapped to printable characters, are merged by the BPE
(the `tokenizers` library), the last symbol of a word carrying `</w>`.

The vocabulary is one of two files, told apart by their content:
  open_clip's `bpe_simple_vocab_16e6.txt.gz`: a gzipped merges list, of which
    CLIP uses the first 48,894; the vocab is the 256 byte characters, the same
    with `</w>`, the merged pairs, then <|startoftext|> and <|endoftext|> (49,408).
  a Hugging Face `tokenizer.json` of a CLIP BPE: its model's vocab and merges.
Only the vocabulary is read from either: the text handling above is jaxcl's,
so both forms give the same ids.

Hugging Face's CLIPTokenizer differs from open_clip on text that ftfy or
html.unescape would change (curly quotes, mojibake, entities such as &amp;):
it has neither. Both map the special tokens' names in a text to their ids;
here they are text like any other, so a row's only EOT is the one after its
content.
"""

from __future__ import annotations

import functools
import gzip
import html
import json

import ftfy
import regex
import tokenizers

START, END = '<|startoftext|>', '<|endoftext|>'
CLIP_MERGES = 49152 - 256 - 2  # open_clip's SimpleTokenizer reads merges[1:CLIP_MERGES + 1]
# CLIP's word split as open_clip compiles it, less its special tokens' names (text here).
# It runs on the `regex` module with IGNORECASE, as there: the `tokenizers` library's regex
# engine has other Unicode tables and case folding ("'ſ" is one word here, U+0345 dropped).
WORD_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def basic_clean(text: str) -> str:
  """open_clip's basic_clean: ftfy's fixes, HTML entities unescaped twice, stripped."""
  return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


def clean(text: str) -> str:
  """open_clip's SimpleTokenizer cleaning ('lower'): what CLIP was trained on."""
  return ' '.join(basic_clean(text).split()).lower()


@functools.cache
def byte_characters() -> dict[int, str]:
  """GPT-2's byte -> printable character table, in CLIP's order of its first 256 ids:
  the bytes that are printable as they are, then the others, shifted past 255."""
  printable = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1),
               *range(ord('®'), ord('ÿ') + 1)]
  others = [b for b in range(256) if b not in printable]
  return {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}


def read_vocab(data: bytes, source: str) -> tuple[str, dict[str, int], list[tuple[str, str]]]:
  """(kind 'gz' or 'json', vocab, merges) of a vocabulary file's bytes; ValueError if
  `source` (named in errors) is neither form."""
  if data[:2] == b'\x1f\x8b':
    try:
      lines = gzip.decompress(data).decode('utf-8').split('\n')
    except (OSError, EOFError, UnicodeDecodeError) as e:
      raise ValueError(f'text.vocab_file {source} is not a readable gzipped merges list: '
                       f'{e}') from None
    merges = [tuple(line.split()) for line in lines[1:CLIP_MERGES + 1]]
    if len(merges) != CLIP_MERGES or any(len(m) != 2 for m in merges):
      raise ValueError(f'text.vocab_file {source} is not CLIP\'s merges list (a header line, '
                       f'then at least {CLIP_MERGES} lines "a b")')
    chars = list(byte_characters().values())
    tokens = [*chars, *(c + '</w>' for c in chars), *(a + b for a, b in merges), START, END]
    return 'gz', {t: i for i, t in enumerate(tokens)}, merges
  try:
    spec = json.loads(data)
    model = spec['model']
    vocab, merges = dict(model['vocab']), model['merges']
    # Older files write a merge as "a b", newer ones as ["a", "b"].
    merges = [tuple(m.split(' ') if isinstance(m, str) else m) for m in merges]
    vocab.update({t['content']: t['id'] for t in spec.get('added_tokens', ())})
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    raise ValueError(f'text.vocab_file {source} is neither a gzipped merges list nor a '
                     f'Hugging Face tokenizer.json ({type(e).__name__}: {e})') from None
  if model.get('type') != 'BPE' or model.get('end_of_word_suffix') != '</w>':
    raise ValueError(f'text.vocab_file {source} is not a CLIP BPE (a BPE model with '
                     f'end_of_word_suffix "</w>")')
  if START not in vocab or END not in vocab:
    raise ValueError(f'text.vocab_file {source} lacks {START} or {END}')
  return 'json', vocab, merges


class ClipBpe:
  """Texts to content ids (no SOT, EOT or truncation) and back."""

  def __init__(self, data: bytes, source: str):

    self.kind, vocab, merges = read_vocab(data, source)
    self.sot_id, self.eot_id = vocab[START], vocab[END]
    self.vocab_size = max(vocab.values()) + 1
    self._words = regex.compile(WORD_PATTERN, regex.IGNORECASE)
    # Merges are applied by rank, never a whole vocab entry first (ignore_merges), which
    # could split a word otherwise than CLIP.
    try:
      bpe = tokenizers.models.BPE(vocab, merges, end_of_word_suffix='</w>', ignore_merges=False)
    except Exception as e:  # the library raises Exception
      raise ValueError(f'text.vocab_file {source}: its merges do not fit its vocab: {e}') from None
    self._bpe = tokenizers.Tokenizer(bpe)
    # Words come split already: this only maps each one's bytes to the BPE's characters.
    self._bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(
        add_prefix_space=False, use_regex=False)
    self._tokens = {i: t for t, i in vocab.items()}
    self._bytes = {c: b for b, c in byte_characters().items()}

  def encode(self, texts) -> list[list[int]]:
    out = []
    for text in texts:
      words = self._words.findall(clean(text))
      out.append(self._bpe.encode(words, is_pretokenized=True, add_special_tokens=False).ids
                 if words else [])
    return out

  def decode(self, ids) -> str:
    """open_clip's decode: `</w>` as a space, special tokens and unknown ids left out."""
    text = ''.join(self._tokens.get(int(i), '') for i in ids
                   if i not in (self.sot_id, self.eot_id))
    data = bytes(self._bytes[c] for c in text if c in self._bytes)
    return data.decode('utf-8', 'replace').replace('</w>', ' ').strip()
