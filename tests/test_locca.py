"""LocCa's decoder tasks on the host (jaxcl.data.locca): boxes as text,
prompt and answer sequences with the answer's tokens counted, and the task
drawn per example among those it supports."""

import numpy as np
import pytest

from jaxcl.data import locca, shapes
from jaxcl.text import tokenizers


def _bytes(length=32):
  return tokenizers.ByteTokenizer(length)


def test_a_box_is_four_integers_of_its_fractions():
  assert locca.box_text([0.5625, 0.09375, 0.90625, 1.0]) == '56 9 90 99'
  assert locca.box_text([0, 0, 0.004, 0.01]) == '0 0 0 1'


def test_a_sequence_counts_its_answer_and_end_of_text():
  tok = _bytes(16)
  ids, weights = locca.sequence(tok, 'red', '1 2')
  assert tok.decode(ids) == ['red1 2']
  assert weights.tolist() == [0, 0, 0, 1, 1, 1, 1] + [0] * 9  # '1 2' and the end-of-text
  assert ids[6] == tok.eot_id and (ids[7:] == tok.pad_id).all()
  ids, weights = locca.sequence(tok, '', 'a caption')  # the caption task: all of it counts
  np.testing.assert_array_equal(ids, tok.encode(['a caption'])[0])
  assert weights.sum() == len('a caption') + 1
  ids, weights = locca.sequence(_bytes(6), 'long prompt', 'x')  # the prompt cut to 5, as encode
  assert len(ids) == 6 and weights.tolist() == [0] * 5 + [1]  # what of the answer fits


def test_a_start_token_comes_first():
  open_clip = pytest.importorskip('open_clip')
  tok = tokenizers.ClipBpeTokenizer(open_clip.tokenizer.default_bpe(), 20)
  ids, weights = locca.sequence(tok, 'small red circle', '56 9 90 44')
  assert ids[0] == tok.sot_id and weights[0] == 0
  answer = ids[weights > 0][:-1]
  np.testing.assert_array_equal(answer, locca._content(tok, '56 9 90 44'))
  assert ids[weights > 0][-1] == tok.eot_id


def test_each_example_draws_a_task_it_supports():
  tok, rng = _bytes(48), np.random.default_rng(0)
  (record,) = shapes.generate(3, 1, geometry=True)
  record['box_captions'] = [c.encode() for c in record['box_captions']]  # as TFDS gives them
  drawn = [locca.example(record, record['captions'][0], tok, locca.TASKS, rng)
           for _ in range(600)]
  counts = np.bincount([task for _, _, task in drawn], minlength=3)
  assert (counts > 150).all()  # each task about a third
  for ids, weights, task in drawn[:30]:
    text, answer = tok.decode(ids)[0], tok.decode(np.where(weights > 0, ids, 0))[0]
    if locca.TASKS[task] == 'refer':  # the description, then the box
      assert answer == locca.box_text(record['boxes'][0])
      assert text == record['box_captions'][0].decode() + answer
    elif locca.TASKS[task] == 'ground':
      assert answer == record['box_captions'][0].decode()
  plain = {'captions': ['a caption']}  # no regions: captions only
  assert {locca.example(plain, 'a caption', tok, locca.TASKS, rng)[2] for _ in range(20)} == {0}
