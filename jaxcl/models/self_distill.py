"""SigLIP 2's self-distillation heads (config.self_distill): the modules the
student and its EMA teacher add to a ViT image tower for SILC's
local-to-global term and TIPS's masked-patch term (jaxcl.losses.self_distill,
jaxcl.trainer.ema_teacher). Training only: no exported embedder reads them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class PrototypeHead(nnx.Module):
  """DINO's head (Caron et al. 2021, facebookresearch/dino DINOHead): an MLP
  of `layers` Linear layers with GELU between them (width -> hidden -> ... ->
  bottleneck), the output L2-normalized, then a bias-free map onto `out`
  prototypes whose columns have unit norm (DINO's weight-normalized last
  layer with its scale fixed at 1). features [..., width] -> logits [..., out]
  float32 in [-1, 1]."""

  def __init__(self, width: int, hidden: int, bottleneck: int, out: int, *, layers: int = 3,
               rngs: nnx.Rngs, dtype=jnp.float32):
    sizes = [width] + [hidden] * (layers - 1) + [bottleneck]
    init = nnx.initializers.truncated_normal(0.02)  # DINO's trunc_normal_(std=.02)
    self.mlp = nnx.List([nnx.Linear(a, b, kernel_init=init, rngs=rngs, dtype=dtype)
                         for a, b in zip(sizes[:-1], sizes[1:])])
    self.prototypes = nnx.Param(init(rngs.params(), (bottleneck, out)))

  def __call__(self, x):
    for i, layer in enumerate(self.mlp):
      x = layer(x) if i == 0 else layer(jax.nn.gelu(x, approximate=False))
    x = x.astype(jnp.float32)
    x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    v = self.prototypes[...]
    return x @ (v / jnp.maximum(jnp.linalg.norm(v, axis=0, keepdims=True), 1e-12))


class SelfDistillHeads(nnx.Module):
  """The student's (and, by EMA, the teacher's) heads: `image` maps a pooled
  image feature to prototypes (SILC's local-to-global term), `patch` a patch
  token (TIPS's masked term; iBOT's unshared student heads), and
  `mask_token` replaces a masked patch's embedding (iBOT, TIPS: zeros at
  init)."""

  def __init__(self, width: int, hidden: int, bottleneck: int, out: int, *, rngs: nnx.Rngs,
               dtype=jnp.float32):
    self.image = PrototypeHead(width, hidden, bottleneck, out, rngs=rngs, dtype=dtype)
    self.patch = PrototypeHead(width, hidden, bottleneck, out, rngs=rngs, dtype=dtype)
    self.mask_token = nnx.Param(jnp.zeros((1, 1, width)))
