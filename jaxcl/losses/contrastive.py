"""Contrastive losses over the global batch, as pure functions of arrays.

Every loss takes L2-normalized embeddings, a temperature τ (logits are
divided by τ; a Python float or a traced scalar, and gradients flow into it)
and a LossOptions (how the loss is computed), and returns a LossResult: the
loss, the global batch's diagnostics, and the estimator's new state.

With ``options.axis_name=None`` the inputs are the whole batch. With
``axis_name`` set (a mesh axis name or a tuple of them) the function runs
inside ``jax.shard_map`` on one device's shard of n rows: it scores its local
rows against the embeddings all-gathered from every device along those axes
(an n x N block, N the global batch), labels offset by ``axis_index * n``,
and returns the loss of the whole global batch, the same value on every
device. The all-gather's transpose is a reduce-scatter, so when ``jax.grad``
is taken outside the shard_map each device receives the gradient for its own
rows from every other device's loss terms: value and gradients equal the
single-device computation on the concatenated batch.

Logits and log-sum-exp are computed in float32 whatever the embedding dtype.

``options.impl`` chooses how the logits are computed, with equal values and
gradients: 'dense' materializes each device's n x N logits; 'blockwise' and
'ring' (jaxcl.losses.tiled) compute them in tiles of at most ``block_size`` x
``block_size`` in a forward and a recomputing backward pass, the columns
all-gathered once ('blockwise') or passed around the devices ('ring');
'auto' is dense while one device's logits have at most AUTO_DENSE_MAX_LOGITS
entries and blockwise above. ``options.transform='arctanh'`` makes each logit
2 artanh(s) / τ of the cosine similarity s in place of s / τ: the
temperature-free loss of Kim & Kim (2025), used with τ = 1
(temperature.mode=free).

``state``, where a loss takes one, is a per-anchor estimator's state
(jaxcl.losses.estimators): the loss's value stays the batch's, its gradient
becomes the estimator's, and the result carries the state after the step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Hashable, NamedTuple, Sequence, Union

import jax
import jax.numpy as jnp

from jaxcl import presets
from jaxcl.losses import estimators, tiled

AxisName = Union[Hashable, Sequence[Hashable], None]
IMPLS = presets.LOSS_IMPLS
# impl='auto': dense while one device's logit matrix (its anchors x the global
# batch's candidates) has at most this many entries, blockwise above. On one
# CPU device clip_loss's dense value and gradient at 4096² plan 0.34 GB (the
# tiles 0.08) and run 1.3x faster; above, dense's memory grows with the
# logits (1.3 GB at 8192², 5.1 GB at 16384²) for a speed-up of 1.0-1.35x
# (benchmarks/RESULTS.md).
AUTO_DENSE_MAX_LOGITS = 4096 * 4096
_MASKED = tiled.MASKED


@dataclasses.dataclass(frozen=True)
class LossOptions:
  """How a loss is computed (the module docstring): the mesh axes it runs
  over (None: the inputs are the whole batch), the implementation, the tile
  size of the tiled ones, and how a similarity becomes a logit."""
  axis_name: AxisName = None
  impl: str = presets.LOSS_IMPL
  block_size: int = presets.LOSS_BLOCK_SIZE
  transform: str = tiled.LINEAR

  def __post_init__(self):
    if self.impl not in IMPLS:
      raise ValueError(f'impl must be one of {IMPLS}, got {self.impl!r}')

  def impl_for(self, num_rows: int, num_cols: int) -> str:
    """The implementation for a device's num_rows anchors x num_cols candidates."""
    if self.impl != 'auto':
      return self.impl
    return 'dense' if num_rows * num_cols <= AUTO_DENSE_MAX_LOGITS else 'blockwise'


class LossResult(NamedTuple):
  """loss: float32 scalar, the mean over the global batch's anchors (the same
  on every device). metrics: the global batch's diagnostics (_diagnostics; no
  gradient). state: the estimator's state after the step (None without one)."""
  loss: jax.Array
  metrics: dict
  state: Any = None


def _gather(x: jax.Array, axis_name: AxisName) -> jax.Array:
  """x of every device concatenated along the rows [N, ...]."""
  return x if axis_name is None else jax.lax.all_gather(x, axis_name, axis=0, tiled=True)


def _global_sum(x: jax.Array, axis_name: AxisName) -> jax.Array:
  return x if axis_name is None else jax.lax.psum(x, axis_name)


def _num_devices(axis_name: AxisName) -> int:
  return 1 if axis_name is None else jax.lax.axis_size(axis_name)


def _local_ids(n: int, axis_name: AxisName) -> jax.Array:
  """Global indices of this device's n rows (their rows in an all-gather)."""
  offset = 0 if axis_name is None else jax.lax.axis_index(axis_name) * n
  return offset + jnp.arange(n, dtype=jnp.int32)


def _scaled_logits(rows: jax.Array, cols: jax.Array, temperature, transform) -> jax.Array:
  """rows [n, d] · cols [m, d]ᵀ / τ in float32 (bf16 inputs accumulate in f32);
  τ a scalar or [n], each row's."""
  sims = jnp.einsum('nd,md->nm', rows, cols, preferred_element_type=jnp.float32)
  inverse = 1.0 / jnp.asarray(temperature, jnp.float32)
  return tiled.logits_of(sims, inverse[:, None] if inverse.ndim else inverse, transform)


def _paired_logits(a, b, temperature, transform):
  """x_ii = a_i · b_i / τ for aligned rows, float32 [n]."""
  dots = jnp.einsum('nd,nd->n', a, b, preferred_element_type=jnp.float32)
  return tiled.logits_of(dots, 1.0 / jnp.asarray(temperature, jnp.float32), transform)


def _positive_logit(logits: jax.Array, positive_ids: jax.Array) -> jax.Array:
  """Each row's logit in its positive column (positive_ids [n]), [n]."""
  return jnp.take_along_axis(logits, positive_ids[:, None], axis=1)[:, 0]


def _dense_summary(logits: jax.Array, is_positive: jax.Array, pos_logit: jax.Array) -> dict:
  """Per-row summaries [n] of masked logits [n, m] (_diagnostics' inputs)."""
  # Rank of the positive: candidates (other than itself) scoring at least as high.
  beaten_by = jnp.sum((logits >= pos_logit[:, None]) & ~is_positive, axis=1)
  # Entropy relative to the row max, so a near-one-hot softmax keeps its precision.
  centered = logits - jnp.max(logits, axis=1, keepdims=True)
  weights = jnp.exp(centered)  # 0 on masked columns
  total = jnp.sum(weights, axis=1)
  negative_weights = jnp.where(is_positive, 0.0, weights)
  return {'beaten_by': beaten_by, 'lse': jax.nn.logsumexp(logits, axis=1),
          'entropy': jnp.log(total) - jnp.sum(weights * centered, axis=1) / total,
          'hardest_share': tiled.share_of_hardest(jnp.max(negative_weights, axis=1),
                                                  jnp.sum(negative_weights, axis=1))}


def _diagnostics(summary: dict, pos_logit, axis_name: AxisName, num_anchors: int) -> dict:
  """What the softmax over each anchor's candidates looks like, averaged over
  the global batch, from per-row summaries [n] (none needs the logits again):

  contrastive_top1/5: the positive scores above every other candidate / is
    among the best five (beaten_by: candidates scoring at least as high;
    ties count against the positive, so collapsed embeddings score 0).
  positive_prob: p(positive) = exp(x_pos - lse).
  entropy: H = -Σ_j p_j log p_j (per row in `entropy`);
    effective_negatives = exp(mean H), the number of equally likely
    candidates with that entropy (SimCLR's Table 5 reports H).
  hardest_negative_share: p(hardest negative) / Σ p(negatives), the share of
    the negatives' gradient weight on the single hardest one (the gradient
    on negative j is proportional to p_j; Wang and Liu, CVPR 2021).
  """
  summary, pos_logit = jax.lax.stop_gradient((summary, pos_logit))
  mean = lambda x: _global_sum(jnp.sum(x.astype(jnp.float32)), axis_name) / num_anchors
  entropy = mean(summary['entropy'])
  return {'contrastive_top1': mean(summary['beaten_by'] < 1),
          'contrastive_top5': mean(summary['beaten_by'] < 5),
          'positive_prob': mean(jnp.exp(pos_logit - summary['lse'])),
          'entropy': entropy,
          'effective_negatives': jnp.exp(entropy),
          'hardest_negative_share': mean(summary['hardest_share'])}


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


def _tiled(kind, rows, cols, col_ids, positive_ids, excluded_ids, positive_logit, temperature,
           bias, options: LossOptions, impl: str):
  """tiled.tiled_row_stats with the temperature as a scale, replicated
  scalars marked per-device so shard_map sums their per-device gradients."""
  axis_name = options.axis_name
  scale = jnp.broadcast_to(1.0 / jnp.asarray(temperature, jnp.float32), rows.shape[:1])
  scale, bias = tiled.varying((scale, jnp.asarray(bias, jnp.float32)), axis_name)
  return tiled.tiled_row_stats(
      kind, axis_name, impl == 'ring' and axis_name is not None, options.block_size,
      options.transform, rows, cols, col_ids, positive_ids, excluded_ids,
      jax.lax.stop_gradient(positive_logit), scale, bias)


def _dense_negatives(logits, is_positive):
  """Per row over the columns other than the positive: log Σ exp(x) and
  the softmax's mean logit Σ p x (no gradient), [n] each."""
  negatives = jnp.where(is_positive, _MASKED, logits)
  lse = jax.nn.logsumexp(negatives, axis=1)
  p = jnp.exp(negatives - jax.lax.stop_gradient(lse)[:, None])
  return lse, jax.lax.stop_gradient(jnp.sum(p * jnp.where(is_positive, 0.0, logits), axis=1))


def _softmax_loss(rows, cols, positive_rows, positive_ids, excluded_ids, temperature,
                  options: LossOptions, state, *, num_anchors: int,
                  num_negatives: int) -> LossResult:
  """The mean over the global anchors of -log softmax(x_i)[positive]: the
  body of info_nce and nt_xent.

  rows [n, d] anchors; cols [m, d] this device's candidate columns (every
  device's columns are candidates; a column's id is its row in the
  all-gather of cols, _local_ids); positive_rows [n, d] each anchor's
  positive embedding, whose column id is positive_ids [n]; excluded_ids [n]
  a column that is not a candidate of the row (None: none). temperature: a
  scalar or [n]. state: an estimator's state for the n anchors, with
  num_negatives negatives each (None: the batch's own estimate).
  """
  axis_name = options.axis_name
  if state is not None:
    temperature = state.anchor_temperature(temperature)
  impl = options.impl_for(rows.shape[0], cols.shape[0] * _num_devices(axis_name))
  if impl == 'dense':
    cols = _gather(cols, axis_name)
    col_ids = jnp.arange(cols.shape[0], dtype=jnp.int32)
    logits = _scaled_logits(rows, cols, temperature, options.transform)
    if excluded_ids is not None:
      logits = jnp.where(col_ids[None, :] == excluded_ids[:, None], _MASKED, logits)
    is_positive = col_ids[None, :] == positive_ids[:, None]
    positive_logit = _positive_logit(logits, positive_ids)
    summary = _dense_summary(logits, is_positive, positive_logit)
    lse = summary['lse']
    if state is not None:
      lse_negatives, negative_mean = _dense_negatives(logits, is_positive)
  else:
    if excluded_ids is None:
      excluded_ids = jnp.full(rows.shape[:1], -1, jnp.int32)
    positive_logit = _paired_logits(rows, positive_rows, temperature, options.transform)
    kind = tiled.SOFTMAX if state is None else tiled.NEGATIVES
    col_ids = _local_ids(cols.shape[0], axis_name)
    stat, summary = _tiled(kind, rows, cols, col_ids, positive_ids, excluded_ids,
                           positive_logit, temperature, 0.0, options, impl)
    # With an estimator, stat is the negatives' log-sum-exp; the loss's value
    # still takes every candidate's.
    lse = stat if state is None else jax.lax.stop_gradient(summary['lse'])
    if state is not None:
      lse_negatives, negative_mean = stat, summary['negative_mean']
  loss = _global_sum(jnp.sum(lse - positive_logit), axis_name) / num_anchors
  metrics = _diagnostics(summary, positive_logit, axis_name, num_anchors)
  if state is None:
    return LossResult(loss, metrics)
  # The value stays the batch's InfoNCE (what runs log and compare); the
  # gradient is that of the mean over the anchors of the estimator's terms.
  terms, state = state.step(lse_negatives, positive_logit, negative_mean, num_negatives)
  surrogate = _global_sum(jnp.sum(terms), axis_name) / num_anchors
  loss = jax.lax.stop_gradient(loss) + surrogate - jax.lax.stop_gradient(surrogate)
  return LossResult(loss, metrics, state)


def info_nce(q: jax.Array, k: jax.Array, temperature, options: LossOptions = LossOptions(), *,
             state: estimators.State | None = None) -> LossResult:
  """One-direction InfoNCE: row i of q against every row of k, positive k_i.

  q, k: [n, d] L2-normalized (n = global batch, or the local shard inside
  shard_map). The loss is the mean over the N global anchors of
  -log softmax(q_i · Kᵀ / τ)[i]; τ a scalar, or [n]: each anchor's.
  state: an estimator's state for the n anchors (jaxcl.losses.estimators;
  an Individual one brings each anchor's τ, in place of `temperature`).
  """
  num_anchors = q.shape[0] * _num_devices(options.axis_name)
  return _softmax_loss(q, k, k, _local_ids(q.shape[0], options.axis_name), None, temperature,
                       options, state, num_anchors=num_anchors, num_negatives=num_anchors - 1)


def clip_loss(a: jax.Array, b: jax.Array, temperature, options: LossOptions = LossOptions(), *,
              state: estimators.State | None = None) -> LossResult:
  """CLIP's symmetric loss: ½ (info_nce(a, b) + info_nce(b, a)). a, b: [n, d].
  temperature: one τ; [2]: τ of a → b (image to text) and of b → a; or
  [n, 2]: each row's τ as an a anchor and as a b anchor (per-example τ).
  state: an estimator's state, leaves [n, 2] (the a anchors', the b anchors')."""
  tau = jnp.asarray(temperature, jnp.float32)
  forward_tau, backward_tau = (tau[..., 0], tau[..., 1]) if tau.ndim else (tau, tau)
  column = lambda c: None if state is None else jax.tree.map(lambda x: x[:, c], state)
  forward = info_nce(a, b, forward_tau, options, state=column(0))
  backward = info_nce(b, a, backward_tau, options, state=column(1))
  half = lambda x, y: 0.5 * (x + y)
  new_state = None if state is None else jax.tree.map(
      lambda x, y: jnp.stack([x, y], axis=1), forward.state, backward.state)
  return LossResult(half(forward.loss, backward.loss),
                    jax.tree.map(half, forward.metrics, backward.metrics), new_state)


def nt_xent(z1: jax.Array, z2: jax.Array, temperature, options: LossOptions = LossOptions(), *,
            state: estimators.State | None = None) -> LossResult:
  """SimCLR's NT-Xent over 2N anchors (both views of N pairs).

  z1, z2: [n, d] L2-normalized views; row i of z1 and row i of z2 are the two
  views of one example. Each anchor's candidates are the other 2N - 1
  embeddings of the global batch (itself excluded); its positive is the other
  view of the same example. The loss is the mean over the 2N anchors.
  temperature: one τ, or [n, 2]: each row's τ as a view-1 and a view-2 anchor.
  state: an estimator's state, leaves [n, 2] (the view-1 anchors', the
  view-2 anchors'; 2N - 2 negatives each).
  """
  n = z1.shape[0]
  big_n = n * _num_devices(options.axis_name)
  by_view = lambda x: jnp.concatenate([x[:, 0], x[:, 1]])  # [n, 2] -> the 2n anchors'
  tau = jnp.asarray(temperature, jnp.float32)
  anchors = jnp.concatenate([z1, z2], axis=0)  # [2n, d]: every anchor is a column too
  ids = _local_ids(2 * n, options.axis_name)  # this device's view 1, then its view 2
  result = _softmax_loss(
      anchors, anchors, jnp.concatenate([z2, z1], axis=0), jnp.roll(ids, n), ids,
      by_view(tau) if tau.ndim else tau, options,
      None if state is None else jax.tree.map(by_view, state),
      num_anchors=2 * big_n, num_negatives=2 * big_n - 2)
  if state is None:
    return result
  return result._replace(state=jax.tree.map(lambda x: jnp.stack([x[:n], x[n:]], axis=1),
                                            result.state))


def siglip_loss(a: jax.Array, b: jax.Array, temperature, bias,
                options: LossOptions = LossOptions()) -> LossResult:
  """SigLIP's pairwise sigmoid loss.

  a, b: [n, d] L2-normalized. logits = a · Bᵀ / τ + bias; y = +1 for the pair
  (i, i), -1 otherwise; loss = -(1/N) Σ_i Σ_j log σ(y_ij · logits_ij), the sum
  over all N² pairs of the global batch divided by N. The metrics are those
  of the softmax over each a_i's logits.
  """
  axis_name, n = options.axis_name, a.shape[0]
  big_n = n * _num_devices(axis_name)
  ids, impl = _local_ids(n, axis_name), options.impl_for(n, big_n)
  if impl != 'dense':
    positive = _paired_logits(a, b, temperature, options.transform)
    sums, summary = _tiled(tiled.SIGMOID, a, b, ids, ids, jnp.full(n, -1, jnp.int32),
                           positive, temperature, bias, options, impl)
    loss = -_global_sum(jnp.sum(sums), axis_name) / big_n
    return LossResult(loss, _diagnostics(summary, positive, axis_name, big_n))
  cols = _gather(b, axis_name)
  logits = (_scaled_logits(a, cols, temperature, options.transform)
            + jnp.asarray(bias, jnp.float32))
  is_positive = jnp.arange(big_n)[None, :] == ids[:, None]
  signs = jnp.where(is_positive, 1.0, -1.0)
  loss = -_global_sum(jnp.sum(jax.nn.log_sigmoid(signs * logits)), axis_name) / big_n
  positive = _positive_logit(logits, ids)
  return LossResult(loss, _diagnostics(_dense_summary(logits, is_positive, positive), positive,
                                       axis_name, big_n))
