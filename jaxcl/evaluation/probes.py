"""Evaluation of frozen features: weighted kNN and a linear probe, in JAX.

Both take features already computed by the encoder on the labeled train and
test splits (see `extract_features`). Accuracies are fractions in [0, 1].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcl import data, parallel
from jaxcl.losses import tiled


def extract_features(embed_fn, mesh, source, *, batch_size: int, max_examples=None, seed=0):
  """Runs `embed_fn` (uint8 images [B, H, W, C] -> [B, D]) over a split, or
  over a random subset of `max_examples` records (drawn with `seed`).

  Returns (features float32 [M, D], labels int32 [M]) as NumPy on every
  process, padding removed. Each process reads its own share of the records.
  """
  indices = None
  if max_examples is not None and max_examples < len(source):
    indices = np.sort(np.random.default_rng(seed).permutation(len(source))[:max_examples])
  feats, labels = [], []
  for batch in data.eval_batches(source, batch_size=batch_size,
                                 process_index=jax.process_index(),
                                 process_count=jax.process_count(), indices=indices):
    images = parallel.put_batch(mesh, batch['image'])
    out = parallel.gather_to_host(embed_fn(images))
    info = parallel.gather_to_host(parallel.put_batch(mesh, {'label': batch['label'],
                                                             'mask': batch['mask']}))
    feats.append(out[info['mask']])
    labels.append(info['label'][info['mask']])
  return np.concatenate(feats).astype(np.float32), np.concatenate(labels)


def _normalize(x):
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@functools.partial(jax.jit, static_argnames=('k', 'num_classes'))
def _knn_votes(queries, bank, bank_labels, *, k, num_classes, temperature):
  sims = _normalize(queries) @ _normalize(bank).T
  top_sims, top_idx = jax.lax.top_k(sims, k)
  weights = jnp.exp(top_sims / temperature)
  onehot = jax.nn.one_hot(bank_labels[top_idx], num_classes)  # [q, k, C]
  return jnp.einsum('qk,qkc->qc', weights, onehot)


def knn_top1(train_x, train_y, test_x, test_y, num_classes: int, *, k: int = 20,
             temperature: float = 0.07, chunk: int = 1024) -> float:
  """Weighted kNN (Wu et al. 2018, DINO): cosine similarity, the k nearest
  train features vote for their label with weight exp(similarity / T)."""
  k = min(k, len(train_x))
  bank, bank_y = jnp.asarray(train_x), jnp.asarray(train_y)
  correct = 0
  for start in range(0, len(test_x), chunk):
    queries = test_x[start:start + chunk]
    pad = chunk - len(queries) if len(test_x) > chunk else 0
    queries = np.concatenate([queries, np.zeros((pad, queries.shape[1]), queries.dtype)])
    votes = _knn_votes(jnp.asarray(queries), bank, bank_y, k=k, num_classes=num_classes,
                       temperature=temperature)
    pred = np.asarray(jnp.argmax(votes, axis=-1))[:len(queries) - pad]
    correct += int(np.sum(pred == test_y[start:start + chunk]))
  return correct / len(test_x)


@functools.partial(jax.jit, static_argnames=('num_classes', 'steps', 'batch_size'))
def _train_probe(x, y, key, *, num_classes, steps, batch_size, learning_rate, l2):
  d = x.shape[1]
  params = {'w': jnp.zeros((d, num_classes)), 'b': jnp.zeros((num_classes,))}
  opt = optax.adam(optax.cosine_decay_schedule(learning_rate, steps))

  def loss_fn(p, xb, yb):
    logits = xb @ p['w'] + p['b']
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
    return ce + 0.5 * l2 * jnp.sum(p['w'] ** 2)

  def step(carry, step_key):
    p, opt_state = carry
    if batch_size >= x.shape[0]:
      xb, yb = x, y
    else:
      idx = jax.random.randint(step_key, (batch_size,), 0, x.shape[0])
      xb, yb = x[idx], y[idx]
    grads = jax.grad(loss_fn)(p, xb, yb)
    updates, opt_state = opt.update(grads, opt_state, p)
    return (optax.apply_updates(p, updates), opt_state), None

  (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), jax.random.split(key, steps))
  return params


def linear_probe_top1(train_x, train_y, test_x, test_y, num_classes: int, *, steps: int = 1000,
                      learning_rate: float = 1e-2, l2: float = 1e-4, batch_size: int = 4096,
                      seed: int = 0) -> float:
  """Multinomial logistic regression on standardized frozen features (Adam,
  cosine-decayed LR, L2 penalty), top-1 accuracy on the test features."""
  mean, std = train_x.mean(0), train_x.std(0) + 1e-6
  params = _train_probe(jnp.asarray((train_x - mean) / std), jnp.asarray(train_y),
                        jax.random.key(seed), num_classes=num_classes, steps=steps,
                        batch_size=batch_size, learning_rate=learning_rate, l2=l2)
  logits = jnp.asarray((test_x - mean) / std) @ params['w'] + params['b']
  return float(np.mean(np.asarray(jnp.argmax(logits, -1)) == test_y))


def evaluate_features(train, test, num_classes: int, cfg) -> dict[str, float]:
  """{'knn_top1', 'linear_top1', 'tolerance', 'test_uniformity'} from
  (features, labels) of both splits. cfg: the config's `eval` group."""
  (train_x, train_y), (test_x, test_y) = train, test
  return {
      'knn_top1': knn_top1(train_x, train_y, test_x, test_y, num_classes, k=cfg.knn_k,
                           temperature=cfg.knn_temperature),
      'linear_top1': linear_probe_top1(train_x, train_y, test_x, test_y, num_classes,
                                       steps=cfg.probe_steps, learning_rate=cfg.probe_lr,
                                       l2=cfg.probe_l2, batch_size=cfg.probe_batch_size),
      **tolerance_uniformity(test_x, test_y),
  }


# --------------------------------------- embedding geometry (Wang & Liu 2021) ---
GEOMETRY_ROWS = 2048  # at most this many rows (a seeded subset): (2048)² pairs


def tolerance_uniformity(features, labels, *, max_rows: int = GEOMETRY_ROWS,
                         seed: int = 0) -> dict[str, float]:
  """{'tolerance', 'test_uniformity'} of features [n, D] (L2-normalized here)
  with int labels [n] (negative: no class; left out of tolerance).

  tolerance (Wang & Liu, CVPR 2021): the mean cosine similarity over ordered
  pairs i != j of the same class; high: same-class examples stay close.
  test_uniformity (Wang & Isola 2020): log of the mean of exp(-2 |z_i - z_j|²)
  over pairs i != j; lower: more uniform on the sphere. A small τ buys
  uniformity and loses tolerance. Over at most max_rows rows.
  """
  z, labels = np.asarray(features, np.float64), np.asarray(labels)
  if len(z) > max_rows:
    keep = np.sort(np.random.default_rng(seed).permutation(len(z))[:max_rows])
    z, labels = z[keep], labels[keep]
  z = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
  sims = z @ z.T
  pairs = ~np.eye(len(z), dtype=bool)
  out = {'test_uniformity': float(np.log(np.mean(np.exp(-2.0 * np.maximum(
      2.0 - 2.0 * sims[pairs], 0.0)))))} if len(z) > 1 else {}
  same = pairs & (labels[:, None] == labels[None, :]) & (labels[:, None] >= 0)
  if same.any():
    out['tolerance'] = float(np.mean(sims[same]))
  return out


# ------------------------------------------------- two towers (CLIP, SigLIP) ---
def embed_rows(embed_fn, mesh, rows: np.ndarray, *, batch_size: int) -> np.ndarray:
  """Runs `embed_fn` ([B, ...] -> [B, D]) over in-memory rows [M, ...] (token
  ids, say) in global batches of `batch_size`, the last one zero-padded; each
  process feeds its own block of every batch. Returns float32 [M, D] on every
  process."""
  p, count = jax.process_index(), jax.process_count()
  local = batch_size // count
  out = []
  for start in range(0, len(rows), batch_size):
    chunk = rows[start + p * local:min(start + (p + 1) * local, len(rows))]
    padded = np.zeros((local, *rows.shape[1:]), rows.dtype)
    padded[:len(chunk)] = chunk
    z = parallel.gather_to_host(embed_fn(parallel.put_batch(mesh, padded)))
    out.append(z[:min(batch_size, len(rows) - start)])
  return np.concatenate(out).astype(np.float32)


def zeroshot_classifier(text_embeddings: np.ndarray) -> np.ndarray:
  """Prompt ensembling: [C, T, D] normalized embeddings of T templates per
  class -> [C, D], the renormalized mean over the templates (CLIP's recipe)."""
  return np.asarray(_normalize(jnp.mean(_normalize(jnp.asarray(text_embeddings)), axis=1)))


def _ranks(scores: np.ndarray, correct: np.ndarray) -> np.ndarray:
  """For each row of scores [n, m] and its boolean mask of correct columns:
  how many wrong columns score at least as high as the best correct one
  (0 = retrieved first; ties count against)."""
  best = np.max(np.where(correct, scores, -np.inf), axis=1, keepdims=True)
  return np.sum((scores >= best) & ~correct, axis=1)


def _recall_at(ranks: np.ndarray, ks, name: str) -> dict[str, float]:
  return {f'{name}{k}': float(np.mean(ranks < k)) for k in ks}


def zeroshot_accuracy(image_embeddings, labels, classifier, ks=(1, 5)) -> dict[str, float]:
  """{'zeroshot_top1', 'zeroshot_top5'}: images [n, D] classified by cosine
  similarity to the class embeddings [C, D]; labels int [n]."""
  scores = image_embeddings @ classifier.T
  correct = np.arange(classifier.shape[0])[None, :] == np.asarray(labels)[:, None]
  return _recall_at(_ranks(scores, correct), [k for k in ks if k <= classifier.shape[0]],
                    'zeroshot_top')


def expected_calibration_error(probs, labels, bins: int = 15) -> float:
  """ECE (Guo et al. 2017): predictions binned by confidence (their top
  probability) into `bins` equal-width bins; the mean over predictions of
  |accuracy - mean confidence| of their bin. probs [n, C], labels int [n]."""
  probs, labels = np.asarray(probs, np.float64), np.asarray(labels)
  confidence = probs.max(axis=1)
  correct = probs.argmax(axis=1) == labels
  which = np.minimum((confidence * bins).astype(int), bins - 1)  # bin i: [i/bins, (i+1)/bins)
  gap = 0.0
  for b in range(bins):
    members = which == b
    if members.any():
      gap += members.sum() * abs(correct[members].mean() - confidence[members].mean())
  return float(gap / len(labels))


def _softmax(logits):
  logits = logits - logits.max(axis=1, keepdims=True)
  e = np.exp(logits)
  return e / e.sum(axis=1, keepdims=True)


def fit_temperature(similarities, labels) -> float:
  """The τ minimizing the cross-entropy of softmax(similarities / τ) [n, C]
  against labels [n] (LeVine et al. 2023: one temperature calibrates
  zero-shot CLIP), searched on a log grid from 1e-3 to 10, then refined."""
  sims, labels = np.asarray(similarities, np.float64), np.asarray(labels)

  def nll(tau):
    logits = sims / tau
    logits = logits - logits.max(axis=1, keepdims=True)
    lse = np.log(np.exp(logits).sum(axis=1))
    return float(np.mean(lse - logits[np.arange(len(labels)), labels]))

  grid = np.geomspace(1e-3, 10.0, 121)
  for _ in range(3):  # each pass: the best point's neighbours, 40 times finer
    best = int(np.argmin([nll(t) for t in grid]))
    low, high = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    grid = np.geomspace(low, high, 81)
  return float(grid[int(np.argmin([nll(t) for t in grid]))])


def zeroshot_calibration(image_embeddings, labels, classifier, temperature: float,
                         transform: str = tiled.LINEAR) -> dict:
  """Zero-shot calibration: {'zeroshot_ece'} of softmax(cosine / τ) at the
  training τ over all labeled images; {'zeroshot_fitted_temperature'}, one τ
  fitted on the even-indexed images, and {'zeroshot_ece_fitted'}, the ECE
  with it on the odd-indexed ones (fitted and scored on different images).
  transform: the training loss's (jaxcl.losses.tiled.logits_of; 'arctanh' for
  temperature.mode=free), applied to the cosine before τ."""
  sims = np.asarray(image_embeddings, np.float64) @ np.asarray(classifier, np.float64).T
  sims = np.asarray(tiled.logits_of(sims, 1.0, transform), np.float64)
  labels = np.asarray(labels)
  out = {'zeroshot_ece': expected_calibration_error(_softmax(sims / temperature), labels)}
  if len(labels) >= 4:
    fitted = fit_temperature(sims[0::2], labels[0::2])
    out.update(zeroshot_fitted_temperature=fitted,
               zeroshot_ece_fitted=expected_calibration_error(_softmax(sims[1::2] / fitted),
                                                              labels[1::2]))
  return out


def retrieval_recall(image_embeddings, text_embeddings, text_image, ks=(1, 5, 10),
                     chunk: int = 2048) -> dict[str, float]:
  """Image-to-text and text-to-image recall@k.

  image_embeddings [I, D], text_embeddings [T, D] (normalized), text_image
  int [T]: the image each caption belongs to (an image may have several).
  i2t: an image counts as found at k if any of its captions is among the k
  best-scoring captions; t2i: a caption's image among the k best images.
  """
  text_image = np.asarray(text_image)
  i2t, t2i = [], []
  for start in range(0, len(image_embeddings), chunk):
    scores = image_embeddings[start:start + chunk] @ text_embeddings.T
    rows = np.arange(start, start + len(scores))
    i2t.append(_ranks(scores, text_image[None, :] == rows[:, None]))
  for start in range(0, len(text_embeddings), chunk):
    scores = text_embeddings[start:start + chunk] @ image_embeddings.T
    t2i.append(_ranks(scores, np.arange(len(image_embeddings))[None, :]
                      == text_image[start:start + chunk, None]))
  return {**_recall_at(np.concatenate(i2t), ks, 'i2t_r'),
          **_recall_at(np.concatenate(t2i), ks, 't2i_r')}
