"""Memory-efficient global contrastive losses: logits in tiles, never whole.

The dense losses (jaxcl.losses, impl='dense') materialize an n x N logit
matrix per device. Here the same quantities are computed one tile of at
most block_size x block_size logits at a time (rows and columns both in
blocks), in a forward and a backward pass that each
hold at most one tile (the scheme of Inf-CL: Cheng et al., "Breaking the
Memory Barrier: Near Infinite Batch Size Scaling for Contrastive Loss", 2024):

- softmax losses (InfoNCE, CLIP, NT-Xent) need the per-row log-sum-exp over
  all columns: the forward pass keeps a running (max, sum) per row over column
  tiles and saves only the final log-sum-exp l_i; the backward pass recomputes
  each tile x_ij and uses dL/dx_ij = g_i exp(x_ij - l_i).
- the sigmoid loss (SigLIP) is a plain sum over pairs: the forward pass sums
  tile by tile, the backward pass recomputes each tile's gradient.

Both are one `jax.custom_vjp` (`tiled_row_stats`) whose backward pass takes
each tile's gradient with `jax.vjp` of a scalar function of that tile.

Columns come from every device when `axis_name` is given (inside
`jax.shard_map`), in one of two ways:

- gather (impl='blockwise'): the column embeddings are all-gathered once
  (N x d floats, small next to N x N logits) and scanned tile by tile; their
  gradient is reduce-scattered back (`psum_scatter`).
- ring (impl='ring'): each device's block of columns travels around the
  devices with `jax.lax.ppermute` while every device computes on the block it
  holds; the block for the next step is sent while the current one is used,
  so XLA can overlap the transfer with the compute. In the backward pass each
  block's gradient accumulator travels with it and arrives home after a full
  turn. No device ever holds more than two blocks of columns.

Every column has an integer id (its index in the global batch; -1 for
padding). Row i's positive column has id `positive_ids[i]`; a row may
exclude one column (`excluded_ids[i]`, NT-Xent's anchor itself; -1: none).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

SOFTMAX, SIGMOID = 'softmax', 'sigmoid'
# The softmax's log-sum-exp over the negatives alone (the positive column left
# out): SogCLR's per-anchor term (jaxcl.losses.estimators).
NEGATIVES = 'negatives'
# How a cosine similarity s becomes a logit before the scale 1/τ: 'linear'
# (s itself), or 'arctanh' (2 artanh s = log((1 + s) / (1 - s)), the
# temperature-free logit of Kim & Kim 2025), s clipped to 1 - FREE_EPS from ±1.
LINEAR, ARCTANH = 'linear', 'arctanh'
FREE_EPS = 1e-6

# A finite stand-in for -inf on masked logits: exp() of it underflows to 0,
# and unlike -inf it keeps 0 * logit products (entropy, gradients) finite.
MASKED = -1e9


def varying(tree, axis_name):
  """Marks replicated values as per-device inside shard_map (a no-op
  outside): scan carries and custom_vjp inputs whose per-device cotangents
  shard_map must sum need it."""
  if axis_name is None:
    return tree
  names = axis_name if isinstance(axis_name, tuple) else (axis_name,)

  def cast(x):
    missing = tuple(a for a in names if a not in jax.typeof(x).manual_axis_type.varying)
    return jax.lax.pcast(x, missing, to='varying') if missing else x

  return jax.tree.map(cast, tree)


def logits_of(similarity, scale, transform: str = LINEAR):
  """scale · similarity, or scale · 2 artanh(similarity) (transform 'arctanh')."""
  if transform == ARCTANH:
    s = jnp.clip(similarity, -1.0 + FREE_EPS, 1.0 - FREE_EPS)
    similarity = jnp.log1p(s) - jnp.log1p(-s)
  return similarity * scale


def _tile(q, k, col_ids, scale, excluded_ids, transform):
  """Logits of one tile, float32 [n, b], and where they count (valid);
  scale [n]: each row's."""
  x = logits_of(jnp.einsum('nd,bd->nb', q, k, preferred_element_type=jnp.float32),
                scale[:, None], transform)
  valid = (col_ids[None, :] >= 0) & (col_ids[None, :] != excluded_ids[:, None])
  return x, valid


def _padded_blocks(k, col_ids, block_size):
  """k [m, d] -> [num_blocks, block, d] (zero rows with id -1 pad the end)."""
  m = k.shape[0]
  block = min(block_size, m)
  pad = -m % block
  k = jnp.pad(k, ((0, pad), (0, 0)))
  col_ids = jnp.pad(col_ids, (0, pad), constant_values=-1)
  return k.reshape(-1, block, k.shape[1]), col_ids.reshape(-1, block)


def _over_tiles(fold, carry, k, col_ids, block_size):
  """carry = fold(carry, k_tile, ids_tile) for every column tile of k; also
  returns fold's per-tile outputs stacked back to [m, ...] (or None)."""
  blocks, ids = _padded_blocks(k, col_ids, block_size)
  carry, per_tile = jax.lax.scan(lambda c, kb: fold(c, *kb), carry, (blocks, ids))
  if per_tile is None:
    return carry, None
  return carry, per_tile.reshape(-1, *per_tile.shape[2:])[:k.shape[0]]


def _over_columns(fold, carry, k, col_ids, *, axis_name, ring, block_size, with_grad=False):
  """Runs `fold` over the column tiles of every device's k.

  fold(carry, k_tile, ids_tile) -> (carry, dk_tile or None). With
  with_grad=True the per-tile outputs are the gradient of this device's rows
  with respect to those columns; the gradient of this device's own k, summed
  over every device's rows, is returned beside the carry.
  """
  if axis_name is None:
    return _over_tiles(fold, carry, k, col_ids, block_size)
  if not ring:
    all_k = jax.lax.all_gather(k, axis_name, axis=0, tiled=True)
    all_ids = jax.lax.all_gather(col_ids, axis_name, axis=0, tiled=True)
    carry, dk = _over_tiles(fold, carry, all_k, all_ids, block_size)
    if with_grad:  # every device's rows' gradient for my columns, summed
      dk = jax.lax.psum_scatter(dk, axis_name, scatter_dimension=0, tiled=True)
    return carry, dk
  devices = jax.lax.axis_size(axis_name)
  perm = [(i, (i + 1) % devices) for i in range(devices)]

  def step(state, _):
    carry, k_here, ids_here, dk_acc = state
    # Send on the block before using it: the transfer overlaps the compute.
    k_next, ids_next = jax.lax.ppermute((k_here, ids_here), axis_name, perm)
    carry, dk = _over_tiles(fold, carry, k_here, ids_here, block_size)
    if with_grad:  # the block's gradient travels with it, back home after a turn
      dk_acc = jax.lax.ppermute(dk_acc + dk, axis_name, perm)
    return (carry, k_next, ids_next, dk_acc), None

  dk0 = varying(jnp.zeros(k.shape, jnp.float32), axis_name) if with_grad else None
  (carry, _, _, dk), _ = jax.lax.scan(step, (carry, k, col_ids, dk0), None, length=devices)
  return carry, dk


# --------------------------------------------------------------- the kernel ---
# Rows are processed in chunks of block_size as well, so a tile is at most
# block_size x block_size logits however many rows a device has.
_ROW_PAD = {'positive_ids': -2, 'excluded_ids': -1}  # a padded row matches no column


def _chunk_rows(rows: dict, block_size: int) -> dict:
  """Per-row arrays [n, ...] -> [n / r, r, ...], r = min(block_size, n), the
  last chunk padded (padded rows get zero cotangents, so they never count)."""
  n = next(iter(rows.values())).shape[0]
  r = min(block_size, n)
  pad = -n % r

  def chunk(name, x):
    x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), constant_values=_ROW_PAD.get(name, 0))
    return x.reshape(-1, r, *x.shape[1:])

  return {name: chunk(name, x) for name, x in rows.items()}


def _unchunk(x, n):
  return x.reshape(-1, *x.shape[2:])[:n]


def _forward_fold(kind, transform, rows, bias):
  """Per-row running statistics over column tiles, rows chunked: the softmax's
  max m, Σ exp(x - m) and Σ exp(x - m)(x - m) (log-sum-exp and entropy, kept
  relative to the max so a near-one-hot softmax keeps its precision), the
  hardest negative's logit, how many columns score at least the positive
  (top-k metrics; ties count against), and for sigmoid Σ log σ(y z)."""

  def one_chunk(k_tile, ids_tile, row, carry):
    x, valid = _tile(row['q'], k_tile, ids_tile, row['scale'], row['excluded_ids'], transform)
    is_positive = ids_tile[None, :] == row['positive_ids'][:, None]
    out = {'beaten_by': carry['beaten_by'] + jnp.sum(
        valid & ~is_positive & (x >= row['positive_logit'][:, None]), axis=1)}
    masked = jnp.where(valid, x, MASKED)
    out['max'] = jnp.maximum(carry['max'], jnp.max(masked, axis=1))
    shift = carry['max'] - out['max']  # <= 0
    rescale = jnp.exp(shift)
    centered = masked - out['max'][:, None]
    weights = jnp.exp(centered)  # 0 where masked
    out['exp_sum'] = carry['exp_sum'] * rescale + jnp.sum(weights, axis=1)
    out['negative_sum'] = carry['negative_sum'] * rescale + jnp.sum(
        jnp.where(is_positive, 0.0, weights), axis=1)
    out['exp_x_sum'] = (rescale * (carry['exp_x_sum'] + shift * carry['exp_sum'])
                        + jnp.sum(weights * centered, axis=1))
    out['hardest'] = jnp.maximum(carry['hardest'],
                                 jnp.max(jnp.where(is_positive, MASKED, masked), axis=1))
    if kind == SIGMOID:
      signs = jnp.where(is_positive, 1.0, -1.0)
      terms = jnp.where(valid, jax.nn.log_sigmoid(signs * (x + bias)), 0.0)
      out['sigmoid_sum'] = carry['sigmoid_sum'] + jnp.sum(terms, axis=1)
    if kind == NEGATIVES:  # relative to the negatives' own max: the positive may outscore
      # them all by more than exp() can span
      is_negative = valid & ~is_positive
      negatives = jnp.where(is_negative, x, MASKED)
      out['negative_max'] = jnp.maximum(carry['negative_max'], jnp.max(negatives, axis=1))
      weights = jnp.where(is_negative, jnp.exp(negatives - out['negative_max'][:, None]), 0.0)
      rescale = jnp.exp(carry['negative_max'] - out['negative_max'])
      out['negative_exp'] = carry['negative_exp'] * rescale + jnp.sum(weights, axis=1)
      # Σ exp(x) x over the negatives, relative to their max (their softmax's mean logit)
      out['negative_exp_x'] = carry['negative_exp_x'] * rescale + jnp.sum(
          weights * jnp.where(is_negative, x, 0.0), axis=1)
    return out

  def fold(carry, k_tile, ids_tile):
    return jax.lax.map(lambda args: one_chunk(k_tile, ids_tile, *args), (rows, carry)), None

  return fold


def _tile_objective(kind, transform, ids_tile, row, g):
  """The scalar whose gradient is one tile's share of the backward pass:
  Σ_ij g_i exp(x_ij - lse_i) (softmax, or negatives over non-positive
  columns; lse held fixed) or Σ_ij g_i log σ(y_ij z_ij)."""

  def objective(q, k_tile, scale, bias):
    x, valid = _tile(q, k_tile, ids_tile, scale, row['excluded_ids'], transform)
    if kind == NEGATIVES:
      valid = valid & (ids_tile[None, :] != row['positive_ids'][:, None])
    if kind in (SOFTMAX, NEGATIVES):
      terms = jnp.exp(jnp.where(valid, x, MASKED) - row['stat'][:, None])
    else:
      signs = jnp.where(ids_tile[None, :] == row['positive_ids'][:, None], 1.0, -1.0)
      terms = jax.nn.log_sigmoid(signs * (x + bias))
    return jnp.sum(jnp.where(valid, terms, 0.0) * g[:, None])

  return objective


def share_of_hardest(hardest_weight, negative_sum):
  """p(hardest negative) / Σ p(negatives), from weights exp(x - row max)
  (no cancellation when the positive holds nearly all the mass); 0 without
  negatives."""
  return jnp.where(negative_sum > 0, hardest_weight / jnp.maximum(negative_sum, 1e-30), 0.0)


def _row_stats(kind, axis_name, ring, block_size, transform, q, k, col_ids, positive_ids,
               excluded_ids, positive_logit, scale, bias):
  n = q.shape[0]
  rows = _chunk_rows(dict(q=q, positive_ids=positive_ids, excluded_ids=excluded_ids,
                          positive_logit=positive_logit, scale=scale), block_size)
  shape = rows['positive_ids'].shape
  zeros = jnp.zeros(shape, jnp.float32)
  carry = {'beaten_by': jnp.zeros(shape, jnp.int32), 'max': zeros + MASKED, 'exp_sum': zeros,
           'exp_x_sum': zeros, 'negative_sum': zeros, 'hardest': zeros + MASKED}
  if kind == SIGMOID:
    carry['sigmoid_sum'] = zeros
  if kind == NEGATIVES:
    carry.update(negative_max=zeros + MASKED, negative_exp=zeros, negative_exp_x=zeros)
  carry = varying(carry, axis_name)
  fold = _forward_fold(kind, transform, rows, bias)
  carry, _ = _over_columns(fold, carry, k, col_ids, axis_name=axis_name, ring=ring,
                           block_size=block_size)
  carry = {name: _unchunk(x, n) for name, x in carry.items()}
  log_sum = jnp.log(carry['exp_sum'])
  lse = carry['max'] + log_sum
  summary = {'beaten_by': carry['beaten_by'], 'lse': lse,
             'entropy': log_sum - carry['exp_x_sum'] / carry['exp_sum'],
             'hardest_share': share_of_hardest(jnp.exp(carry['hardest'] - carry['max']),
                                               carry['negative_sum'])}
  if kind == NEGATIVES:
    summary['negative_mean'] = carry['negative_exp_x'] / carry['negative_exp']
  stat = {SOFTMAX: lambda: lse, SIGMOID: lambda: carry['sigmoid_sum'],
          NEGATIVES: lambda: carry['negative_max'] + jnp.log(carry['negative_exp'])}[kind]()
  return stat, summary


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4))
def tiled_row_stats(kind, axis_name, ring, block_size, transform, q, k, col_ids, positive_ids,
                    excluded_ids, positive_logit, scale, bias):
  """Per-row statistics of rows q [n, d] against every column, in tiles.

  kind 'softmax': stat_i = log Σ_j exp(x_ij) over the valid columns j (all
  columns but padding and excluded_ids[i]); kind 'negatives': the same
  over the valid columns other than the positive; kind 'sigmoid': stat_i =
  Σ_j log σ(y_ij (x_ij + bias)), y_ij = +1 if column j is row i's positive.
  x_ij = logits_of(q_i · k_j, scale_i, transform), scale [n] per row. k [m, d]:
  this device's columns, ids col_ids [m] (-1: padding); with axis_name, every
  device's columns are used.

  Returns (stat float32 [n], summary): summary (no gradient) holds per-row
  'lse' (log Σ_j exp x_ij), 'entropy' (of softmax_j x_ij), 'hardest_share'
  (the hardest negative's share of the negatives' softmax mass) and
  'beaten_by' (the valid non-positive
  columns with x_ij >= positive_logit[i]): the diagnostics of
  jaxcl.losses; kind 'negatives' adds 'negative_mean', Σ_j p_ij x_ij under
  the softmax over the negatives. Differentiable in q, k, scale and bias.
  """
  return _row_stats(kind, axis_name, ring, block_size, transform, q, k, col_ids, positive_ids,
                    excluded_ids, positive_logit, scale, bias)


def _fwd(kind, axis_name, ring, block_size, transform, q, k, col_ids, positive_ids,
         excluded_ids, positive_logit, scale, bias):
  out = _row_stats(kind, axis_name, ring, block_size, transform, q, k, col_ids, positive_ids,
                   excluded_ids, positive_logit, scale, bias)
  return out, (q, k, col_ids, positive_ids, excluded_ids, positive_logit, scale, bias, out[0])


def _bwd(kind, axis_name, ring, block_size, transform, residuals, cotangents):
  q, k, col_ids, positive_ids, excluded_ids, positive_logit, scale, bias, stat = residuals
  n = q.shape[0]
  rows = _chunk_rows(dict(q=q, positive_ids=positive_ids, excluded_ids=excluded_ids, stat=stat,
                          scale=scale, g=cotangents[0].astype(jnp.float32)), block_size)

  def fold(carry, k_tile, ids_tile):
    def one_chunk(acc, row):  # this row chunk's gradients against the tile
      objective = _tile_objective(kind, transform, ids_tile, row, row['g'])
      dq, dk, dscale, dbias = jax.grad(objective, argnums=(0, 1, 2, 3))(row['q'], k_tile,
                                                                        row['scale'], bias)
      return (acc[0] + dk, acc[1] + dbias), (dq, dscale)

    zeros = varying((jnp.zeros(k_tile.shape, jnp.float32), jnp.zeros_like(bias)), axis_name)
    (dk, dbias), (dq, dscale) = jax.lax.scan(one_chunk, zeros, rows)
    return (carry[0] + dq, carry[1] + dscale, carry[2] + dbias), dk

  zeros = varying((jnp.zeros(rows['q'].shape, jnp.float32), jnp.zeros(rows['scale'].shape),
                   jnp.zeros_like(bias)), axis_name)
  (dq, dscale, dbias), dk = _over_columns(fold, zeros, k, col_ids, axis_name=axis_name, ring=ring,
                                          block_size=block_size, with_grad=True)
  return (_unchunk(dq, n).astype(q.dtype), dk.astype(k.dtype), None, None, None, None,
          _unchunk(dscale, n), dbias)


tiled_row_stats.defvjp(_fwd, _bwd)
