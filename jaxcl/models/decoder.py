"""A text decoder on an image tower's unpooled tokens: SigLIP 2's LocCa
decoder (Wan et al. 2024), in CapPa's form (Tschannen et al. 2023,
big_vision's models/proj/cappa).

Each block is pre-LayerNorm: self-attention over the text, cross-attention
to the image tokens, an MLP. The decoder reads token ids [b, L] and gives
logits over the vocabulary [b, L, V] for each position's next token. Per
example it predicts either autoregressively (the ids shifted right behind
a start token, causal self-attention: teacher forcing) or in parallel
(CapPa's parallel prediction: every input is the mask token, attention is
bidirectional, so each position is predicted from the image alone). Used
in training only: the exported embedders never include it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxcl.models.transformer import Attention, _apply_mlp, _attend, _dense_init, _mlp

START_ID = 0  # the start token of shifted inputs (big_vision shifts in 0, the pad id)


class DecoderBlock(nnx.Module):
  """x + self-attention(LN(x)), then + cross-attention(LN(x), image), then
  + MLP(LN(x)); `mask` [b, 1, L, L] says which text positions each sees."""

  def __init__(self, width: int, heads: int, mlp_dim: int, *, act: str, norm_eps: float,
               rngs: nnx.Rngs, dtype):
    norm = lambda: nnx.LayerNorm(width, epsilon=norm_eps, dtype=dtype, rngs=rngs)
    self.heads = heads
    self.norm1, self.norm2, self.norm3 = norm(), norm(), norm()
    self.self_attention = Attention(width, heads, rngs=rngs, dtype=dtype)
    dense = lambda n_out: nnx.Linear(width, n_out, kernel_init=_dense_init, dtype=dtype,
                                     rngs=rngs)
    self.query, self.key_value, self.cross_out = dense(width), dense(2 * width), dense(width)
    _mlp(self, width, mlp_dim, act, rngs, dtype)

  def __call__(self, x, image, mask, image_lengths=None):
    q, k, v = jnp.split(self.self_attention.qkv(self.norm1(x)), 3, axis=-1)
    x = x + self.self_attention.out(_attend(q, k, v, self.heads, mask=mask))
    k, v = jnp.split(self.key_value(image), 2, axis=-1)
    x = x + self.cross_out(_attend(self.query(self.norm2(x)), k, v, self.heads,
                                   key_value_seq_lengths=image_lengths))
    return x + _apply_mlp(self, self.norm3(x))


class CaptionDecoder(nnx.Module):
  """(image tokens [b, T, image_width], token ids [b, L], parallel bool [b])
  -> logits float32 [b, L, vocab_size]: position t's logits predict ids[t]."""

  def __init__(self, *, vocab_size: int, max_length: int, image_width: int, width: int,
               depth: int, heads: int, mlp_dim: int, act: str = 'gelu_tanh',
               norm_eps: float = 1e-6, rngs: nnx.Rngs, dtype=jnp.float32):
    self.vocab_size, self.mask_id = vocab_size, vocab_size  # one more row: the mask token
    self.embed = nnx.Embed(vocab_size + 1, width, embedding_init=nnx.initializers.normal(1.0),
                           dtype=dtype, rngs=rngs)
    self.position = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (1, max_length, width)))
    self.image_in = (nnx.Linear(image_width, width, kernel_init=_dense_init, dtype=dtype,
                                rngs=rngs) if image_width != width else None)
    self.blocks = nnx.List([DecoderBlock(width, heads, mlp_dim, act=act, norm_eps=norm_eps,
                                         rngs=rngs, dtype=dtype) for _ in range(depth)])
    self.norm = nnx.LayerNorm(width, epsilon=norm_eps, dtype=dtype, rngs=rngs)
    self.logits = nnx.Linear(width, vocab_size, kernel_init=nnx.initializers.zeros, dtype=dtype,
                             rngs=rngs)

  def __call__(self, image, ids, parallel, image_lengths=None):
    b, length = ids.shape
    shifted = jnp.concatenate([jnp.full((b, 1), START_ID, ids.dtype), ids[:, :-1]], axis=1)
    inputs = jnp.where(parallel[:, None], self.mask_id, shifted)
    causal = jnp.tril(jnp.ones((length, length), bool))
    mask = jnp.where(parallel[:, None, None, None], True, causal[None, None])
    x = self.embed(inputs) + self.position[...][:, :length].astype(self.embed.dtype)
    if self.image_in is not None:
      image = self.image_in(image)
    for block in self.blocks:
      x = block(x, image.astype(x.dtype), mask, image_lengths)
    return self.logits(self.norm(x)).astype(jnp.float32)


def parallel_examples(row_keys, fraction: float):
  """bool [n]: which examples a step predicts in parallel, each with
  probability `fraction`, drawn from its row's own key [n] (so a row's
  draw does not depend on the rows beside it: microbatches, shards)."""
  draws = jax.vmap(lambda key: jax.random.uniform(jax.random.fold_in(key, 1)))(row_keys)
  return draws < fraction
