"""The exact large-batch step in microbatches (GradCache, Gao et al. 2021).

A contrastive loss couples every row of the global batch, so plain gradient
accumulation (a loss per chunk) would change it: each chunk would see only
its own negatives. GradCache keeps the global-batch loss and still holds the
towers' activations of one chunk at a time:

1. encode every chunk, no gradient taken, keeping only the embeddings;
2. compute the loss over the whole global batch (dense, blockwise or ring;
   every negative) and its gradient with respect to the embeddings (and to
   τ and SigLIP's bias, which only the loss reads);
3. re-encode each chunk under `jax.vjp` and pull its slice of the embedding
   gradient back to the parameters, summing over the chunks.

Both chunk loops are `lax.scan`s, so compile time does not grow with the
number of chunks. A chunk's augmentation keys are the rows' own keys
(augment.view_keys), so the re-encoding in pass 3 sees exactly the inputs of
pass 1, and both see what the unchunked step would have. With LayerNorm
towers (ViT, text) the result is the unchunked step's, up to float
summation order.

Batch norm (SimCLR's ResNets) normalizes each chunk by its own statistics,
global over the devices but not over the chunks: the chunked step is the
exact gradient of the loss whose embeddings were computed chunk by chunk,
and the running statistics are updated once per chunk, in order, as if each
chunk were a step of its own.

Chunk layout: the global batch [N] is split over D data shards, device d
holding rows [d N/D, (d+1) N/D). Chunk c takes rows [c m, (c+1) m) of every
device's block (m = N/(C D)), so each device encodes its own rows and no
chunk moves data between devices.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxcl import parallel


def to_chunks(x, num_chunks: int, num_shards: int):
  """[N, ...] split over `num_shards` -> [num_chunks, N / num_chunks, ...],
  chunk c holding the rows [c m, (c+1) m) of every shard's block."""
  n = x.shape[0]
  m = n // (num_chunks * num_shards)
  x = x.reshape(num_shards, num_chunks, m, *x.shape[1:])
  return jnp.swapaxes(x, 0, 1).reshape(num_chunks, num_shards * m, *x.shape[3:])


def from_chunks(x, num_shards: int):
  """The inverse of `to_chunks`: [C, N / C, ...] -> [N, ...]."""
  c, rows = x.shape[:2]
  x = x.reshape(c, num_shards, rows // num_shards, *x.shape[2:])
  return jnp.swapaxes(x, 0, 1).reshape(c * rows, *x.shape[3:])


def loss_and_grads(encode: Callable, head: Callable, params, batch_stats, inputs, *,
                   microbatch_size: int, mesh, param_shardings=None,
                   encode_with_terms: Callable | None = None):
  """((loss, (head's aux, the terms' aux, new batch stats)), grads) of the
  global batch, in chunks.

  encode(params, batch_stats, inputs) -> ((a [n, D], b [n, D]), new batch
  stats): one chunk's embeddings, its inputs any pytree of [n, ...] arrays
  (the images, the token ids, the rows' augmentation keys). head(params, a,
  b) -> (loss, aux): the global-batch loss of all N rows'
  embeddings. inputs: the same pytree with [N, ...] leaves, split over the
  mesh's batch axes. param_shardings: where the gradient sum lives (FSDP).
  encode_with_terms(params, batch_stats, inputs) -> (((a, b), (value,
  aux)), new batch stats): the embeddings and, from the same forward pass,
  per-example terms (each chunk's value and aux its share of the global
  batch's: summed over the chunks), added to the loss in pass 3; None:
  no terms (aux ({}, {})).
  """
  n = jax.tree.leaves(inputs)[0].shape[0]
  num_shards = parallel.num_batch_shards(mesh)
  if n % microbatch_size or microbatch_size % num_shards:
    raise ValueError(f'a batch of {n} does not split into microbatches of {microbatch_size} '
                     f'over {num_shards} data shards')
  num_chunks = n // microbatch_size
  chunked = NamedSharding(mesh, P(None, parallel.BATCH_AXES))
  chunks = jax.tree.map(
      lambda x: jax.lax.with_sharding_constraint(to_chunks(x, num_chunks, num_shards), chunked),
      inputs)

  # Pass 1: embeddings only; outside any gradient, so no activation outlives its chunk.
  def embed_chunk(stats, chunk):
    (a, b), stats = encode(params, stats, chunk)
    return stats, (a, b)

  new_stats, (a, b) = jax.lax.scan(embed_chunk, batch_stats, chunks)
  a, b = from_chunks(a, num_shards), from_chunks(b, num_shards)

  # Pass 2: the loss over the global batch; its gradient to the embeddings is the cache.
  (loss, head_aux), (head_grads, grad_a, grad_b) = jax.value_and_grad(
      head, argnums=(0, 1, 2), has_aux=True)(params, a, b)
  cached = jax.tree.map(lambda g: to_chunks(g, num_chunks, num_shards), (grad_a, grad_b))

  # Pass 3: re-encode each chunk and pull its cached gradient back to the parameters
  # (with its per-example terms' own gradient, from the same forward pass).
  if encode_with_terms is None:
    encode_with_terms = lambda p, stats, chunk: (
        (encode(p, stats, chunk)[0], (jnp.float32(0), ({}, {}))), None)

  def backprop_chunk(carry, chunk_and_grads):
    total, term_total = carry
    chunk, grads = chunk_and_grads

    def forward(p):
      embeddings, (value, aux) = encode_with_terms(p, batch_stats, chunk)[0]
      return (embeddings, value), aux

    (_, value), pull_back, aux = jax.vjp(forward, params, has_aux=True)
    chunk_grads = pull_back((grads, jnp.ones_like(value)))[0]
    return (jax.tree.map(jnp.add, total, chunk_grads),
            jax.tree.map(jnp.add, term_total, (value, aux))), None

  zeros = jax.tree.map(jnp.zeros_like, params)
  if param_shardings is not None:
    zeros = jax.lax.with_sharding_constraint(zeros, param_shardings)
  first = jax.tree.map(lambda x: x[0], chunks)
  term_zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), jax.eval_shape(
      lambda: encode_with_terms(params, batch_stats, first)[0][1]))
  (tower_grads, (term, term_aux)), _ = jax.lax.scan(backprop_chunk, (zeros, term_zeros),
                                                   (chunks, cached))
  grads = jax.tree.map(jnp.add, head_grads, tower_grads)
  return (loss + term, (head_aux, term_aux, new_stats)), grads
