"""LocCa's decoder tasks on the host (Wan et al. 2024; SigLIP 2's decoder):
each example's target sequence for the decoder, with the tokens that count.

Three tasks, one drawn per example among those it supports:

- 'caption': the caption, every token counted;
- 'refer' (referring expression): a region's description, then its box as
  text, only the box counted;
- 'ground' (grounded captioning): a box as text, then its region's
  description, only the description counted.

A box (top, left, bottom, right as fractions of the image) is written as
four integers in [0, BOX_BINS), "56 9 91 44". Regions come from the record's
'boxes' and 'box_captions' (jaxcl.data.shapes with geometry); a record
without them trains the caption task only. The prompt and the answer are
tokenized apart and joined, so their tokens are the tokenizer's own for
each part whatever it merges across a boundary; the row is laid out as the
tokenizer lays out one text (a start token if it has one, an end-of-text,
padding), truncated to its length.
"""

from __future__ import annotations

import numpy as np

from jaxcl import presets

TASKS = presets.DECODER_TASKS
BOX_BINS = 100


def box_text(box) -> str:
  """'top left bottom right' as integers in [0, BOX_BINS)."""
  return ' '.join(str(int(v)) for v in np.clip(np.floor(np.asarray(box) * BOX_BINS), 0,
                                                BOX_BINS - 1))


def _content(tokenizer, text: str) -> list[int]:
  """The ids `tokenizer` gives `text`, without its start, end-of-text and padding."""
  row = tokenizer.encode([text])[0]
  start = int(getattr(tokenizer, 'sot_id', None) is not None)
  ends = np.nonzero(row == tokenizer.eot_id)[0]
  return row[start:ends[0] if len(ends) else len(row)].tolist()


def sequence(tokenizer, prompt: str, answer: str) -> tuple[np.ndarray, np.ndarray]:
  """(ids int32 [L], weights float32 [L]): the prompt's tokens then the
  answer's and an end-of-text, L = tokenizer.max_length; weights 1 on the
  answer and the end-of-text (what the decoder is scored on)."""
  length, sot = tokenizer.max_length, getattr(tokenizer, 'sot_id', None)
  head = ([] if sot is None else [sot]) + (_content(tokenizer, prompt) if prompt else [])
  body = _content(tokenizer, answer) + [tokenizer.eot_id]
  ids = (head + body)[:length]
  weights = ([0.0] * len(head) + [1.0] * len(body))[:length]
  pad = length - len(ids)
  return (np.asarray(ids + [tokenizer.pad_id] * pad, np.int32),
          np.asarray(weights + [0.0] * pad, np.float32))


def supported(record, tasks) -> list[str]:
  """The tasks of `tasks` a record supports (region tasks need its boxes)."""
  has_regions = len(record.get('boxes', ())) > 0 and 'box_captions' in record
  return [t for t in tasks if t == 'caption' or has_regions]


def example(record, caption: str, tokenizer, tasks, rng: np.random.Generator):
  """(ids, weights, task index in TASKS) of one record for the decoder:
  a task drawn among `tasks` the record supports, a region drawn for the
  region tasks; `caption` is the caption the record's text is this epoch."""
  task = rng.choice(supported(record, tasks))
  if task == 'caption':
    ids, weights = sequence(tokenizer, '', caption)
  else:
    region = rng.integers(len(record['boxes']))
    described = _as_str(record['box_captions'][region])
    where = box_text(record['boxes'][region])
    ids, weights = (sequence(tokenizer, described, where) if task == 'refer'
                    else sequence(tokenizer, where, described))
  return ids, weights, TASKS.index(task)


def _as_str(value) -> str:
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)
