"""Synthetic inputs: a config's model and step set up without a dataset or a
tokenizer file, for benchmarks and for sizing a run before its data exists.

The images are random uint8 arrays of the config's input size, with as many
channels as its normalization has (dataset.mean: 1 or 3). For a text tower
the captions are random token ids in a table of the published vocabulary's
size (49,408 CLIP BPE tokens, 32,000 SentencePiece ones for SigLIP), so the
embedding table, its gradient and its optimizer state weigh what they will.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxcl import data, methods
from jaxcl.text import tokenizers
from jaxcl.trainer import experiment, train_step

# The text tables of the published models: open_clip's CLIP BPE, SigLIP's c4_en SentencePiece,
# SigLIP 2's Gemma SentencePiece (text.normalize=lower).
VOCAB_SIZES = {'clip_bpe': 49_408, 'sentencepiece': 32_000, 'gemma': 256_000}


def image_shape(config) -> tuple[int, int, int]:
  size = config.dataset.image_size or config.augment.image_size
  return (size, size, 3 if len(config.dataset.mean) == 3 else 1)


def tokenizer(text_config):
  """Byte tokens in a table of text.tokenizer's published size (bytes: its own)."""
  text = tokenizers.ByteTokenizer(text_config.max_length)
  gemma = text_config.tokenizer == 'sentencepiece' and text_config.get('normalize') == 'lower'
  published = VOCAB_SIZES['gemma' if gemma else text_config.tokenizer] if (
      gemma or text_config.tokenizer in VOCAB_SIZES) else 0
  text.vocab_size = max(text.vocab_size, published)
  return text


def setup(config, devices=None) -> experiment.Experiment:
  """experiment.setup for a validated config, from shapes alone: no data is opened."""
  text = tokenizer(config.text) if methods.get(config.method).text_tower else None
  info = data.DatasetInfo(image_shape=image_shape(config), num_classes=0)
  exp = experiment.setup(config, devices, tokenizer=text, info=info)
  # Per-example state (loss.estimator) gets a table of one batch's rows.
  return dataclasses.replace(exp, train_examples=config.batch_size)


def batch(exp: experiment.Experiment, n: int, seed: int = 0) -> dict:
  """n rows of the step's inputs (train_step.step_batch_keys) as NumPy
  arrays: random images and, for a text tower, random captions of random
  lengths (end-of-text, then padding), which the decoder also writes."""
  rng = np.random.default_rng(seed)
  if exp.patching is None:
    out = {'image': rng.integers(0, 256, (n, *exp.info.image_shape), dtype=np.uint8)}
  else:  # NaFlex: random patches at the largest budget, each image on its own grid
    shapes = exp.image_shapes(n)
    budget = shapes['patches'][0][1]
    grids = [data.naflex.grid_for_budget(*rng.integers(1, 4 * budget, 2), exp.patching.patch_size,
                                         budget) for _ in range(n)]
    out = {'image': {'patches': rng.integers(0, 256, shapes['patches'][0], dtype=np.uint8),
                     'grid': np.array(grids, np.int32)}}
  if exp.tokenizer is not None:
    t = exp.tokenizer
    ids = rng.integers(t.eot_id + 1, t.vocab_size, (n, t.max_length), dtype=np.int32)
    lengths = rng.integers(1, t.max_length, n)
    positions = np.arange(t.max_length)
    ids[positions[None] == lengths[:, None]] = t.eot_id
    ids[positions[None] > lengths[:, None]] = t.pad_id
    out['text'] = ids
    # The decoder's rows (config.decoder): the caption, every token to its end counted.
    out['decoder_ids'] = ids
    out['decoder_weights'] = (positions[None] <= lengths[:, None]).astype(np.float32)
  out['index'] = np.arange(n, dtype=np.int32) % max(exp.train_examples, 1)
  return {key: out[key] for key in train_step.step_batch_keys(exp)}
