"""The decoder's evaluation (jaxcl.evaluation.decoder_eval): box overlap,
and perplexity and referring-expression accuracy of a decoder that knows
every answer, of one that knows none, and of one that writes boxes off by
a little and by a lot."""

import numpy as np
import pytest

from helpers import assert_close
from jaxcl import parallel
from jaxcl.data import locca, shapes
from jaxcl.evaluation import decoder_eval
from jaxcl.text import tokenizers


def test_iou_of_boxes():
  a = np.array([[0, 0, 0.5, 0.5], [0, 0, 1, 1], [0, 0, 0.5, 0.5], [np.nan] * 4])
  b = np.array([[0, 0, 0.5, 0.5], [0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1], [0, 0, 1, 1]])
  assert_close(decoder_eval.iou(a, b), np.array([1, 0.25, 0, 0]), rtol=1e-12, what='iou')


class _Oracle:
  """A decoder_fn whose logits put all mass on the record's own next token
  (the record's index is in its image's first pixel), its box shifted by
  `shift` bins; `knows=False`: uniform logits."""

  def __init__(self, records, tokenizer, knows=True, shift=0):
    self.records, self.tokenizer, self.knows, self.shift = records, tokenizer, knows, shift

  def __call__(self, images, ids):
    images, ids = np.asarray(images), np.asarray(ids)
    vocab = self.tokenizer.vocab_size
    logits = np.zeros((*ids.shape, vocab), np.float32)
    if not self.knows:
      return logits
    for row, (image, query) in enumerate(zip(images, ids)):
      record = self.records[int(image[0, 0, 0])]
      box = np.clip(record['boxes'][0] + self.shift / locca.BOX_BINS, 0, 0.999)
      refer, _ = locca.sequence(self.tokenizer, record['box_captions'][0], locca.box_text(box))
      caption, _ = locca.sequence(self.tokenizer, '', record['captions'][0])
      prompt = len(locca._content(self.tokenizer, record['box_captions'][0]))
      # A referring query: the description, then nothing yet or digits (a caption
      # may begin with the description: 'large yellow square at the bottom, ...').
      digits = {ord(d) + self.tokenizer.byte_offset for d in '0123456789'}
      answering = query[prompt] == self.tokenizer.pad_id or query[prompt] in digits
      target = (refer if np.array_equal(query[:prompt], refer[:prompt]) and answering
                else caption)
      logits[row, np.arange(ids.shape[1]), target] = 30.0
    return logits


@pytest.mark.parametrize('knows, shift, accuracy', [(True, 0, 1.0), (True, 1, 1.0),
                                                   (True, 30, 0.0), (False, 0, 0.0)])
def test_perplexity_and_referring_accuracy(knows, shift, accuracy):
  tokenizer = tokenizers.ByteTokenizer(48)
  records = shapes.generate(5, 16, geometry=True)
  for index, record in enumerate(records):
    record['image'] = record['image'].copy()
    record['image'][0, 0, 0] = index
  mesh = parallel.make_mesh({'data': -1, 'fsdp': 1}, __import__('jax').devices()[:1])
  results = decoder_eval.evaluate(_Oracle(records, tokenizer, knows, shift), mesh, records,
                                  tokenizer, batch_size=8)
  assert results['refer_accuracy'] == accuracy
  if knows:
    assert results['decoder_perplexity'] == pytest.approx(1.0, abs=1e-6)
  else:  # uniform over the vocabulary
    assert results['decoder_perplexity'] == pytest.approx(tokenizer.vocab_size, rel=1e-5)


def test_greedy_decoding_stops_after_a_boxs_tokens():
  """A decoder that writes '1' forever (never its end-of-text) is read at
  most MAX_BOX_TOKENS times for the boxes, not once per free position."""
  tokenizer = tokenizers.ByteTokenizer(96)
  records = shapes.generate(3, 8, geometry=True)  # one batch of 8
  calls = []

  def ones(images, ids):
    calls.append(1)
    logits = np.zeros((*np.asarray(ids).shape, tokenizer.vocab_size), np.float32)
    logits[..., ord('1') + tokenizer.byte_offset] = 30.0
    return logits

  mesh = parallel.make_mesh({'data': -1, 'fsdp': 1}, __import__('jax').devices()[:1])
  results = decoder_eval.evaluate(ones, mesh, records, tokenizer, batch_size=8)
  assert results['refer_accuracy'] == 0.0  # '1111...': no four integers
  assert len(calls) == 1 + decoder_eval.MAX_BOX_TOKENS  # the perplexity's pass, then the boxes'
