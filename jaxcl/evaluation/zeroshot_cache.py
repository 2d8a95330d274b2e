"""Zero-shot classifiers (class names x templates through the text tower,
prompt-ensembled) cached in the workdir, so that evaluating the same
checkpoint again (`jaxcl eval` after training, a second `jaxcl eval`) does
not run the text tower over every prompt again.

WORKDIR/zeroshot_classifiers.npz (files.ZEROSHOT_CACHE_FILE) holds the
classifiers [C, D] of one step: an array per prompt set, named by the
SHA-256 of (step, the weights' fingerprint, class names, templates, the
tokenizer's spec). A classifier depends only on those, so datasets with the
same prompts (imagenet2012, imagenet_v2) share one. A new step's first
classifier replaces the file; the fingerprint (a hash of the weights'
exact bits, jaxcl.trainer.evaluator.weights_fingerprint) tells a step
retrained from an earlier checkpoint from the first.
A file that does not read is a miss. Process 0 reads and writes it and
hands what it read to the others.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
import zipfile

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from jaxcl import errors, files

_STEP = 'step'


def cache_key(step: int, weights: str, class_names, templates, tokenizer_spec: dict) -> str:
  """The name of a classifier in the cache file."""
  blob = json.dumps({'step': int(step), 'weights': weights, 'class_names': list(class_names),
                     'templates': list(templates), 'tokenizer': tokenizer_spec},
                    sort_keys=True)
  return 'sha256_' + hashlib.sha256(blob.encode()).hexdigest()[:32]


def _read(path: epath.Path, step: int) -> dict:
  """{key: classifier} of the file if it holds `step`; {} otherwise."""
  if not path.exists():
    return {}
  try:
    with np.load(io.BytesIO(path.read_bytes())) as npz:
      if int(npz[_STEP]) != step:
        return {}
      return {k: np.asarray(npz[k], np.float32) for k in npz.files if k != _STEP}
  except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):  # a cache: recompute
    return {}


def _write(path: epath.Path, step: int, classifiers: dict) -> None:
  buffer = io.BytesIO()
  np.savez(buffer, **{_STEP: np.int64(step)}, **classifiers)
  try:
    files.write_atomically(path, buffer.getvalue())
  except OSError as e:  # the results do not depend on it
    print(f'jaxcl: cannot write the zero-shot cache {path} '
          f'({e.strerror or errors.type_and_first_line(e)}); it is recomputed next time',
          file=sys.stderr)


def classifier(workdir, step: int, weights: str, class_names, templates, tokenizer_spec,
               compute) -> np.ndarray:
  """The classifier [C, D] of these prompts at `step`: from the cache in
  `workdir`, or compute() (every process runs it) and then cached. workdir
  None: no cache."""
  if workdir is None:
    return compute()
  path = epath.Path(workdir) / files.ZEROSHOT_CACHE_FILE
  key = cache_key(step, weights, class_names, templates, tokenizer_spec)
  cached = _read(path, step) if jax.process_index() == 0 else {}
  found = cached.get(key)
  if found is not None and found.shape[0] != len(class_names):
    found = None
  if jax.process_count() > 1:
    shape = np.zeros(2, np.int32) if found is None else np.array(found.shape, np.int32)
    shape = np.asarray(multihost_utils.broadcast_one_to_all(shape))
    if shape[0]:
      found = np.asarray(multihost_utils.broadcast_one_to_all(
          found if found is not None else np.zeros(shape, np.float32)))
  if found is not None:
    return found
  result = np.asarray(compute(), np.float32)
  if jax.process_index() == 0:
    _write(path, step, {**cached, key: result})
  return result
