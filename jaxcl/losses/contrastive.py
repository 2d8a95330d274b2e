"""Contrastive losses over the global batch, as pure functions of arrays.

Every loss takes L2-normalized embeddings and a temperature τ (logits are
divided by τ; a Python float or a traced scalar, and gradients flow into it).
``transform='arctanh'`` makes each logit 2 artanh(s) / τ of the cosine
similarity s in place of s / τ: the temperature-free loss of Kim & Kim (2025),
used with τ = 1 (temperature.mode=free).

With ``axis_name=None`` the inputs are the whole batch. With ``axis_name`` set
(a mesh axis name or a tuple of them) the function runs inside
``jax.shard_map`` on one device's shard of n rows: it scores its local rows
against the embeddings all-gathered from every device along those axes (an
n x N block, N the global batch), labels offset by ``axis_index * n``, and
returns the loss of the whole global batch, the same value on every device.
The all-gather's transpose is a reduce-scatter, so when ``jax.grad`` is taken
outside the shard_map each device receives the gradient for its own rows from
every other device's loss terms: value and gradients equal the single-device
computation on the concatenated batch.

Logits and log-sum-exp are computed in float32 whatever the embedding dtype.

``with_metrics=True`` also returns a dict of global-batch diagnostics computed
from the same logits (no second pass): ``contrastive_top1`` and
``contrastive_top5``, how often the positive scores above every other
candidate (resp. is among the five best); ties count against the positive, so
collapsed embeddings score 0, not 1.

``impl`` chooses how the logits are computed, with equal values and
gradients: 'dense' (default) materializes each device's n x N logits;
'blockwise' and 'ring' (jaxcl.losses.tiled) compute them in tiles of at most
``block_size`` x ``block_size`` in a forward and a recomputing backward pass, the columns
all-gathered once ('blockwise') or passed around the devices ('ring').
"""

from __future__ import annotations

from typing import Hashable, Sequence, Union

import jax
import jax.numpy as jnp

from jaxcl import presets
from jaxcl.losses import estimators, tiled

AxisName = Union[Hashable, Sequence[Hashable], None]
IMPLS = presets.LOSS_IMPLS
DEFAULT_BLOCK_SIZE = 1024
_MASKED = tiled.MASKED


def _gather(x: jax.Array, axis_name: AxisName) -> tuple[jax.Array, jax.Array]:
  """Returns (x of every device concatenated [N, ...], offset of this shard)."""
  if axis_name is None:
    return x, jnp.int32(0)
  gathered = jax.lax.all_gather(x, axis_name, axis=0, tiled=True)
  offset = jax.lax.axis_index(axis_name) * x.shape[0]
  return gathered, offset


def _global_sum(x: jax.Array, axis_name: AxisName) -> jax.Array:
  return x if axis_name is None else jax.lax.psum(x, axis_name)


def _scaled_logits(rows: jax.Array, cols: jax.Array, temperature, transform) -> jax.Array:
  """rows [n, d] · cols [m, d]ᵀ / τ in float32 (bf16 inputs accumulate in f32);
  τ a scalar or [n], each row's."""
  sims = jnp.einsum('nd,md->nm', rows, cols, preferred_element_type=jnp.float32)
  inverse = 1.0 / jnp.asarray(temperature, jnp.float32)
  return tiled.logits_of(sims, inverse[:, None] if inverse.ndim else inverse, transform)


def _softmax_terms(logits: jax.Array, positive: jax.Array, axis_name: AxisName,
                   num_anchors: int, with_metrics: bool):
  """Mean cross-entropy of the positive column over all anchors of all devices.

  logits: [n, m] float32, already masked where a column is not a candidate.
  positive: [n] int32 column index of each row's positive.
  num_anchors: the global number of rows (the mean's denominator).
  """
  pos_logit = jnp.take_along_axis(logits, positive[:, None], axis=1)[:, 0]
  lse = jax.nn.logsumexp(logits, axis=1)
  loss = _global_sum(jnp.sum(lse - pos_logit), axis_name) / num_anchors
  if not with_metrics:
    return loss
  # Rank of the positive: candidates (other than itself) scoring at least as high.
  is_positive = jnp.arange(logits.shape[1])[None, :] == positive[:, None]
  beaten_by = jnp.sum((logits >= pos_logit[:, None]) & ~is_positive, axis=1)
  # Entropy relative to the row max, so a near-one-hot softmax keeps its precision.
  centered = logits - jnp.max(logits, axis=1, keepdims=True)
  weights = jnp.exp(centered)  # 0 on masked columns
  total = jnp.sum(weights, axis=1)
  entropy = jnp.log(total) - jnp.sum(weights * centered, axis=1) / total
  negative_weights = jnp.where(is_positive, 0.0, weights)
  hardest_share = tiled.share_of_hardest(jnp.max(negative_weights, axis=1),
                                             jnp.sum(negative_weights, axis=1))
  return loss, _diagnostics(beaten_by, lse, entropy, hardest_share, pos_logit, axis_name,
                            num_anchors)


def _diagnostics(beaten_by, lse, entropy, hardest_share, pos_logit, axis_name: AxisName,
                 num_anchors: int) -> dict:
  """What the softmax over each anchor's candidates looks like, averaged over
  the global batch, from per-row summaries [n] (none needs the logits again):

  contrastive_top1/5: the positive scores above every other candidate / is
    among the best five (beaten_by: candidates scoring at least as high).
  positive_prob: p(positive) = exp(x_pos - lse).
  entropy: H = -Σ_j p_j log p_j (per row in `entropy`);
    effective_negatives = exp(mean H), the number of equally likely
    candidates with that entropy (SimCLR's Table 5 reports H).
  hardest_negative_share: p(hardest negative) / Σ p(negatives), the share of
    the negatives' gradient weight on the single hardest one (the gradient
    on negative j is proportional to p_j; Wang and Liu, CVPR 2021).
  """
  mean = lambda x: _global_sum(jnp.sum(x.astype(jnp.float32)), axis_name) / num_anchors
  entropy = mean(entropy)
  return {'contrastive_top1': mean(beaten_by < 1),
          'contrastive_top5': mean(beaten_by < 5),
          'positive_prob': mean(jnp.exp(pos_logit - lse)),
          'entropy': entropy,
          'effective_negatives': jnp.exp(entropy),
          'hardest_negative_share': mean(hardest_share)}


def _with_summary(loss, summary, positive, axis_name, num_anchors, with_metrics):
  if not with_metrics:
    return loss
  summary = jax.lax.stop_gradient(summary)
  return loss, _diagnostics(summary['beaten_by'], summary['lse'], summary['entropy'],
                            summary['hardest_share'], jax.lax.stop_gradient(positive), axis_name,
                            num_anchors)


# The uniformity estimate's rows per device: (2 x 1024)² kernel entries (16 MB)
# at most, where all of a device's rows would need (2n)² (68 GB for n = 65,536).
UNIFORMITY_ROWS = 1024


def alignment_uniformity(a: jax.Array, b: jax.Array, *, axis_name: AxisName = None) -> dict:
  """Wang and Isola (2020) on the current batch of L2-normalized pairs.

  alignment: E ||a_i - b_i||² over the positive pairs of the global batch
  (lower: positives closer). uniformity: log E exp(-2 ||z_i - z_j||²) over
  pairs of distinct embeddings (a and b together), taken over the pairs
  within each device's first UNIFORMITY_ROWS rows and averaged over devices,
  so it costs at most (2 UNIFORMITY_ROWS)² per device whatever the batch
  (lower: more uniform on the sphere).
  """
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  num = a.shape[0] * _num_devices(axis_name)
  alignment = _global_sum(jnp.sum(jnp.sum((a - b) ** 2, axis=1)), axis_name) / num
  rows = min(a.shape[0], UNIFORMITY_ROWS)
  z = jnp.concatenate([a[:rows], b[:rows]])
  sq_dist = jnp.maximum(2.0 - 2.0 * z @ z.T, 0.0)  # unit vectors
  off_diagonal = ~jnp.eye(z.shape[0], dtype=bool)
  pairs = float(z.shape[0] * (z.shape[0] - 1))  # a Python float: no int32 overflow
  mean_kernel = jnp.sum(jnp.where(off_diagonal, jnp.exp(-2.0 * sq_dist), 0.0)) / pairs
  uniformity = _global_sum(jnp.log(mean_kernel), axis_name) / _num_devices(axis_name)
  return {'alignment': alignment, 'uniformity': uniformity}


def _num_devices(axis_name: AxisName) -> int:
  return 1 if axis_name is None else jax.lax.axis_size(axis_name)


def _tiled(kind, rows, cols, col_ids, positive_ids, excluded_ids, positive_logit, temperature,
           bias, axis_name, impl, block_size, transform):
  """blockwise.tiled_row_stats with the temperature as a scale, replicated
  scalars marked per-device so shard_map sums their per-device gradients."""
  if impl not in ('blockwise', 'ring'):
    raise ValueError(f'impl must be one of {IMPLS}, got {impl!r}')
  scale = jnp.broadcast_to(1.0 / jnp.asarray(temperature, jnp.float32), rows.shape[:1])
  scale, bias = tiled.varying((scale, jnp.asarray(bias, jnp.float32)), axis_name)
  return tiled.tiled_row_stats(
      kind, axis_name, impl == 'ring' and axis_name is not None, block_size, transform, rows,
      cols, col_ids, positive_ids, excluded_ids, jax.lax.stop_gradient(positive_logit), scale,
      bias)


def _local_ids(n: int, axis_name: AxisName) -> jax.Array:
  """Global batch indices of this device's n rows."""
  offset = 0 if axis_name is None else jax.lax.axis_index(axis_name) * n
  return offset + jnp.arange(n, dtype=jnp.int32)


def _paired_logits(a, b, temperature, transform):
  """x_ii = a_i · b_i / τ for aligned rows, float32 [n]."""
  dots = jnp.einsum('nd,nd->n', a, b, preferred_element_type=jnp.float32)
  return tiled.logits_of(dots, 1.0 / jnp.asarray(temperature, jnp.float32), transform)


def _moving_loss(result, lse_negatives, positive_logit, negative_mean, moving, num_negatives,
                 axis_name, num_anchors):
  """(result with the estimator's gradient in place of the batch's, its new state).

  The loss keeps the batch InfoNCE's value (what runs log and compare);
  its gradient is that of the mean over the anchors of moving.step's terms
  (jaxcl.losses.estimators)."""
  terms, new_state = moving.step(lse_negatives, positive_logit, negative_mean, num_negatives)
  surrogate = _global_sum(jnp.sum(terms), axis_name) / num_anchors
  loss = result[0] if isinstance(result, tuple) else result
  loss = jax.lax.stop_gradient(loss) + surrogate - jax.lax.stop_gradient(surrogate)
  return ((loss, result[1]) if isinstance(result, tuple) else loss), new_state


def _dense_negatives(logits, positive):
  """Per row over the columns other than the positive: log Σ exp(x) and
  the softmax's mean logit Σ p x (no gradient), [n] each."""
  is_positive = jnp.arange(logits.shape[1])[None, :] == positive[:, None]
  negatives = jnp.where(is_positive, _MASKED, logits)
  lse = jax.nn.logsumexp(negatives, axis=1)
  p = jnp.exp(negatives - jax.lax.stop_gradient(lse)[:, None])
  return lse, jax.lax.stop_gradient(jnp.sum(p * jnp.where(is_positive, 0.0, logits), axis=1))


def info_nce(q: jax.Array, k: jax.Array, *, temperature, axis_name: AxisName = None,
             with_metrics: bool = False, impl: str = 'dense',
             block_size: int = DEFAULT_BLOCK_SIZE, transform: str = tiled.LINEAR,
             moving: estimators.Moving | None = None):
  """One-direction InfoNCE: row i of q against every row of k, positive k_i.

  q, k: [n, d] L2-normalized (n = global batch, or the local shard inside
  shard_map). Returns the mean over the N global anchors of
  -log softmax(q_i · Kᵀ / τ)[i]; τ a scalar, or [n]: each anchor's.
  moving: an estimator's state for the n rows (jaxcl.losses.estimators: Moving,
  or Individual, whose τ [n] must be `temperature`): the gradient becomes
  the estimator's, and the return value (result, its new state).
  """
  n = q.shape[0]
  num_anchors = n * _num_devices(axis_name)
  if impl != 'dense':
    ids = _local_ids(n, axis_name)
    positive = _paired_logits(q, k, temperature, transform)
    kind = tiled.SOFTMAX if moving is None else tiled.NEGATIVES
    stat, summary = _tiled(kind, q, k, ids, ids, jnp.full(n, -1, jnp.int32),
                           positive, temperature, 0.0, axis_name, impl, block_size, transform)
    lse = stat if moving is None else jax.lax.stop_gradient(summary['lse'])
    loss = _global_sum(jnp.sum(lse - positive), axis_name) / num_anchors
    result = _with_summary(loss, summary, positive, axis_name, num_anchors, with_metrics)
    if moving is None:
      return result
    return _moving_loss(result, stat, positive, summary['negative_mean'], moving,
                        num_anchors - 1, axis_name, num_anchors)
  keys, offset = _gather(k, axis_name)
  logits = _scaled_logits(q, keys, temperature, transform)
  positive = offset + jnp.arange(n, dtype=jnp.int32)
  result = _softmax_terms(logits, positive, axis_name, keys.shape[0], with_metrics)
  if moving is None:
    return result
  positive_logit = jnp.take_along_axis(logits, positive[:, None], axis=1)[:, 0]
  lse_negatives, negative_mean = _dense_negatives(logits, positive)
  return _moving_loss(result, lse_negatives, positive_logit, negative_mean, moving,
                      num_anchors - 1, axis_name, num_anchors)


def clip_loss(a: jax.Array, b: jax.Array, *, temperature, axis_name: AxisName = None,
              with_metrics: bool = False, impl: str = 'dense',
              block_size: int = DEFAULT_BLOCK_SIZE, transform: str = tiled.LINEAR,
              moving: estimators.Moving | None = None):
  """CLIP's symmetric loss: ½ (info_nce(a, b) + info_nce(b, a)). a, b: [n, d].
  temperature: one τ; [2]: τ of a → b (image to text) and of b → a; or
  [n, 2]: each row's τ as an a anchor and as a b anchor (per-example τ).
  moving: an estimator's state, leaves [n, 2] (the a anchors', the b
  anchors'); then returns (result, its new state)."""
  kwargs = dict(axis_name=axis_name, with_metrics=with_metrics, impl=impl,
                block_size=block_size, transform=transform)
  tau = jnp.asarray(temperature, jnp.float32)
  forward_tau, backward_tau = ((tau[..., 0], tau[..., 1]) if tau.ndim else (tau, tau))
  directions = [info_nce(q, k, temperature=t, **kwargs,
                         moving=None if moving is None else
                         jax.tree.map(lambda x, c=column: x[:, c], moving))
                for column, (q, k, t) in enumerate(((a, b, forward_tau), (b, a, backward_tau)))]
  if moving is not None:
    (forward, forward_state), (backward, backward_state) = directions
    return (jax.tree.map(lambda x, y: 0.5 * (x + y), forward, backward),
            jax.tree.map(lambda x, y: jnp.stack([x, y], axis=1), forward_state, backward_state))
  return jax.tree.map(lambda x, y: 0.5 * (x + y), *directions)


def nt_xent(z1: jax.Array, z2: jax.Array, *, temperature, axis_name: AxisName = None,
            with_metrics: bool = False, impl: str = 'dense',
            block_size: int = DEFAULT_BLOCK_SIZE, transform: str = tiled.LINEAR,
            moving: estimators.Moving | None = None):
  """SimCLR's NT-Xent over 2N anchors (both views of N pairs).

  z1, z2: [n, d] L2-normalized views; row i of z1 and row i of z2 are the two
  views of one example. Each anchor's candidates are the other 2N - 1
  embeddings of the global batch (itself excluded); its positive is the other
  view of the same example. Returns the mean over the 2N anchors.
  temperature: one τ, or [n, 2]: each row's τ as a view-1 and a view-2 anchor.
  moving: an estimator's state, leaves [n, 2] (the view-1 anchors', the
  view-2 anchors'; 2N - 2 negatives each); then returns (result, its new state).
  """
  n = z1.shape[0]
  big_n = n * _num_devices(axis_name)
  by_view = lambda x: jnp.concatenate([x[:, 0], x[:, 1]])  # [n, 2] -> the 2n anchors'
  anchor_state = None if moving is None else jax.tree.map(by_view, moving)
  tau = jnp.asarray(temperature, jnp.float32)
  tau = by_view(tau) if tau.ndim else tau
  anchors = jnp.concatenate([z1, z2], axis=0)        # [2n, d]
  if impl != 'dense':
    # Column ids: view 1 of example i is i, view 2 is N + i (N global examples).
    ids1 = _local_ids(n, axis_name)
    ids = jnp.concatenate([ids1, ids1 + big_n])
    positive = _paired_logits(anchors, jnp.concatenate([z2, z1], axis=0), tau, transform)
    kind = tiled.SOFTMAX if moving is None else tiled.NEGATIVES
    stat, summary = _tiled(kind, anchors, anchors, ids, jnp.concatenate([ids1 + big_n, ids1]),
                           ids, positive, tau, 0.0, axis_name, impl, block_size, transform)
    lse = stat if moving is None else jax.lax.stop_gradient(summary['lse'])
    loss = _global_sum(jnp.sum(lse - positive), axis_name) / (2 * big_n)
    result = _with_summary(loss, summary, positive, axis_name, 2 * big_n, with_metrics)
    lse_negatives, positive_logit = stat, positive
    negative_mean = summary.get('negative_mean')
  else:
    all1, offset = _gather(z1, axis_name)
    all2, _ = _gather(z2, axis_name)
    candidates = jnp.concatenate([all1, all2], axis=0)  # [2N, d]: view 1 then view 2
    logits = _scaled_logits(anchors, candidates, tau, transform)
    index = offset + jnp.arange(n, dtype=jnp.int32)
    self_col = jnp.concatenate([index, index + big_n])
    positive = jnp.concatenate([index + big_n, index])
    is_self = jnp.arange(2 * big_n)[None, :] == self_col[:, None]
    logits = jnp.where(is_self, _MASKED, logits)
    result = _softmax_terms(logits, positive, axis_name, 2 * big_n, with_metrics)
    if moving is not None:
      lse_negatives, negative_mean = _dense_negatives(logits, positive)
      positive_logit = jnp.take_along_axis(logits, positive[:, None], axis=1)[:, 0]
  if moving is None:
    return result
  result, new_state = _moving_loss(result, lse_negatives, positive_logit, negative_mean,
                                   anchor_state, 2 * big_n - 2, axis_name, 2 * big_n)
  return result, jax.tree.map(lambda x: jnp.stack([x[:n], x[n:]], axis=1), new_state)


def siglip_loss(a: jax.Array, b: jax.Array, *, temperature, bias,
                axis_name: AxisName = None, with_metrics: bool = False, impl: str = 'dense',
                block_size: int = DEFAULT_BLOCK_SIZE, transform: str = tiled.LINEAR):
  """SigLIP's pairwise sigmoid loss.

  a, b: [n, d] L2-normalized. logits = a · Bᵀ / τ + bias; y = +1 for the pair
  (i, i), -1 otherwise; loss = -(1/N) Σ_i Σ_j log σ(y_ij · logits_ij), the sum
  over all N² pairs of the global batch divided by N.
  """
  if impl != 'dense':
    n = a.shape[0]
    ids = _local_ids(n, axis_name)
    positive = _paired_logits(a, b, temperature, transform)
    sums, summary = _tiled(tiled.SIGMOID, a, b, ids, ids, jnp.full(n, -1, jnp.int32),
                           positive, temperature, bias, axis_name, impl, block_size, transform)
    big_n = n * _num_devices(axis_name)
    loss = -_global_sum(jnp.sum(sums), axis_name) / big_n
    return _with_summary(loss, summary, positive, axis_name, big_n, with_metrics)
  cols, offset = _gather(b, axis_name)
  logits = _scaled_logits(a, cols, temperature, transform) + jnp.asarray(bias, jnp.float32)
  positive = offset + jnp.arange(a.shape[0], dtype=jnp.int32)
  is_positive = jnp.arange(cols.shape[0])[None, :] == positive[:, None]
  signs = jnp.where(is_positive, 1.0, -1.0)
  big_n = cols.shape[0]
  loss = -_global_sum(jnp.sum(jax.nn.log_sigmoid(signs * logits)), axis_name) / big_n
  if not with_metrics:
    return loss
  _, metrics = _softmax_terms(logits, positive, axis_name, big_n, True)
  return loss, metrics
