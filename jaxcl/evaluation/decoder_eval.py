"""What the LocCa decoder (config.decoder) has learned, on the test split:

- `decoder_perplexity`: exp of the mean token cross-entropy of each test
  image's first caption, teacher-forced (the caption task's loss, held out);
- `refer_accuracy`: given a region's description, the box the decoder
  writes greedily (jaxcl.data.locca's four integers) overlaps the region's
  box with IoU above 0.5 (LocCa's referring-expression score), for the
  first region of the first REFER_IMAGES test images that have regions
  (each written token runs the model again: a bounded cost per evaluation).

`decoder_fn(images uint8 [b, H, W, C], ids int32 [b, L]) -> logits [b, L, V]`
runs the frozen model's decoder on its own image tokens, teacher-forced.
"""

from __future__ import annotations

import re

import numpy as np

from jaxcl import parallel
from jaxcl.data import locca

IOU_THRESHOLD = 0.5
REFER_IMAGES = 256
# A box is four integers below 100 and three spaces (jaxcl.data.locca), then the
# end-of-text: no tokenizer needs more tokens than this for one, so greedy decoding
# stops here even when a decoder never writes its end-of-text.
MAX_BOX_TOKENS = 16


def evaluate(decoder_fn, mesh, source, tokenizer, batch_size: int) -> dict:
  """{'decoder_perplexity', 'refer_accuracy'} over `source`'s records
  ({'image', 'captions'}, and 'boxes', 'box_captions' where they have regions)."""
  records = [source[i] for i in range(len(source))]
  images = np.stack([r['image'] for r in records])
  rows = [locca.sequence(tokenizer, '', r['captions'][0]) for r in records]
  ids, weights = np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])
  logits = _run(decoder_fn, mesh, images, ids, batch_size)
  log_p = logits - _logsumexp(logits)
  picked = np.take_along_axis(log_p, ids[..., None], -1)[..., 0]
  results = {'decoder_perplexity': float(np.exp(-(weights * picked).sum() / weights.sum()))}
  regions = [i for i, r in enumerate(records) if len(r.get('boxes', ()))][:REFER_IMAGES]
  if regions:
    written = _greedy_box(decoder_fn, mesh, images[regions], tokenizer,
                          [records[i]['box_captions'][0] for i in regions], batch_size)
    truth = np.stack([records[i]['boxes'][0] for i in regions])
    results['refer_accuracy'] = float(np.mean(iou(written, truth) > IOU_THRESHOLD))
  return results


def _run(decoder_fn, mesh, images, ids, batch_size):
  """decoder_fn over the rows in batches of `batch_size` (the last padded)."""
  out = []
  for start in range(0, len(images), batch_size):
    part = slice(start, start + batch_size)
    count = len(images[part])
    pad = lambda x: np.concatenate([x, np.repeat(x[-1:], batch_size - count, 0)])
    batch = parallel.put_batch(mesh, {'image': pad(images[part]), 'ids': pad(ids[part])})
    out.append(parallel.gather_to_host(decoder_fn(batch['image'], batch['ids']))[:count])
  return np.concatenate(out).astype(np.float64)


def _logsumexp(x):
  m = x.max(-1, keepdims=True)
  return m + np.log(np.exp(x - m).sum(-1, keepdims=True))


def _greedy_box(decoder_fn, mesh, images, tokenizer, descriptions, batch_size) -> np.ndarray:
  """The boxes [n, 4] the decoder writes after each description (greedy, up
  to its end-of-text or the row's end); NaN where it writes no four integers."""
  rows = [locca.sequence(tokenizer, str(d), '') for d in descriptions]
  ids = np.stack([row_ids for row_ids, _ in rows])
  # The answer begins at the end-of-text, the one token its weights count.
  starts = np.array([int(np.argmax(weights)) for _, weights in rows])
  ids[np.arange(len(ids)), starts] = tokenizer.pad_id
  done = np.zeros(len(ids), bool)
  for step in range(min(MAX_BOX_TOKENS, ids.shape[1] - int(starts.min()))):
    position = np.minimum(starts + step, ids.shape[1] - 1)
    logits = _run(decoder_fn, mesh, images, ids, batch_size)
    chosen = logits[np.arange(len(ids)), position].argmax(-1)
    write = ~done & (starts + step < ids.shape[1])
    ids[np.arange(len(ids))[write], position[write]] = chosen[write]
    done |= ~write | (chosen == tokenizer.eot_id)
    if done.all():
      break
  texts = [tokenizer.decode(row[start:])[0] for row, start in zip(ids, starts)]
  return np.stack([_parse_box(t) for t in texts])


def _parse_box(text: str) -> np.ndarray:
  numbers = re.findall(r'\d+', text)[:4]
  if len(numbers) < 4:
    return np.full(4, np.nan)
  return np.asarray([int(n) for n in numbers], np.float64) / locca.BOX_BINS


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Intersection over union of boxes [n, 4] (top, left, bottom, right);
  0 where a box is NaN or empty."""
  top, left = np.maximum(a[:, 0], b[:, 0]), np.maximum(a[:, 1], b[:, 1])
  bottom, right = np.minimum(a[:, 2], b[:, 2]), np.minimum(a[:, 3], b[:, 3])
  inter = np.clip(bottom - top, 0, None) * np.clip(right - left, 0, None)
  area = lambda x: np.clip(x[:, 2] - x[:, 0], 0, None) * np.clip(x[:, 3] - x[:, 1], 0, None)
  union = area(a) + area(b) - inter
  return np.nan_to_num(np.where(union > 0, inter / np.where(union > 0, union, 1), 0))
