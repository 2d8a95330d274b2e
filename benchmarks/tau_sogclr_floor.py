"""Why a learnable τ falls to its floor under SogCLR at batch 64 (issue 34):
the two objectives' shapes in τ, on a trained model's embeddings.

  python benchmarks/tau_sogclr_floor.py --workdir RUN [--batches 64,512]
      [--json benchmarks/tau_sogclr_floor.json]

RUN is a trained SimCLR digits run (e.g. `benchmarks/seeds.py --group
digits_grid`'s learnable-seed0). For each batch size, 8 batches of the
training split are drawn, each image's two augmented views embedded as the
step embeds them, and for τ on a grid from 0.01 to 1 the mean over the
2B anchors of

- InfoNCE (NT-Xent), the batch estimator's objective: the positive is in
  the softmax's denominator, so the loss is >= 0 and its τ-derivative
  vanishes as τ -> 0 once every positive outranks its negatives;
- SogCLR's objective, -x_ii + log mean_{j negative} exp(x_ij) with
  x = s / τ: negatives only, whose estimator gradient the SogCLR step
  follows (u ≈ the batch's mean at γ = 0.9). Its τ-derivative is
  (s_ii - E_q[s_ij]) / τ² with q the softmax over the negatives: it stays
  positive, and grows as τ falls, while the positive beats the negatives'
  softmax-weighted mean;

with the share of anchors whose positive outranks all their negatives, their
mean margin s_ii - max_j s_ij (as τ -> 0 the negatives-only objective goes
as that mean / τ: to -∞ when it is positive), and the τ of the grid where
each objective is least. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

TAUS = np.geomspace(0.01, 1.0, 25)


def objectives(z1: np.ndarray, z2: np.ndarray, tau: float) -> tuple[float, float]:
  """(NT-Xent, SogCLR's negatives-only objective) of two views' unit
  embeddings [B, D], means over the 2B anchors, in float64."""
  z = np.concatenate([z1, z2]).astype(np.float64)
  n = len(z)
  s = z @ z.T / tau
  positive = np.concatenate([np.arange(n // 2, n), np.arange(n // 2)])
  self_mask = np.eye(n, dtype=bool)
  positive_mask = np.zeros((n, n), bool)
  positive_mask[np.arange(n), positive] = True
  x_pos = s[np.arange(n), positive]

  def lse(x, mask):
    x = np.where(mask, x, -np.inf)
    m = x.max(axis=1, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(axis=1, keepdims=True)))[:, 0]

  info_nce = lse(s, ~self_mask) - x_pos
  negatives = ~self_mask & ~positive_mask
  negatives_only = lse(s, negatives) - np.log(n - 2) - x_pos
  return float(info_nce.mean()), float(negatives_only.mean())


def margins(z1, z2) -> np.ndarray:
  """Each anchor's s_ii - max over its negatives of s_ij: > 0 where its
  positive outranks every negative. [2B]"""
  z = np.concatenate([z1, z2]).astype(np.float64)
  n = len(z)
  s = z @ z.T
  positive = np.concatenate([np.arange(n // 2, n), np.arange(n // 2)])
  np.fill_diagonal(s, -np.inf)
  best_positive = s[np.arange(n), positive].copy()
  s[np.arange(n), positive] = -np.inf
  return best_positive - s.max(axis=1)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--batches', default='64,512')
  parser.add_argument('--draws', type=int, default=8)
  parser.add_argument('--json', default='benchmarks/tau_sogclr_floor.json')
  args = parser.parse_args(argv)
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  sys.path.insert(0, os.getcwd())
  import jax  # noqa: PLC0415  (after the platform is chosen)
  from flax import nnx  # noqa: PLC0415

  from jaxcl.data import augment  # noqa: PLC0415
  from jaxcl.trainer import trained  # noqa: PLC0415
  exp, state = trained.load_trained(args.workdir)
  model = nnx.merge(exp.eval_graphdef, state.params, state.batch_stats)
  images = np.stack([exp.train_source[i]['image'] for i in range(len(exp.train_source))])
  learned_tau = float(model.temperature(state.step))

  @jax.jit
  def embed(batch, key):
    keys = augment.view_keys(key, 2, len(batch))
    return exp.method.embeddings(model, exp.method.model_inputs(keys, {'image': batch},
                                                                exp.config))

  rows = []
  rng = np.random.default_rng(0)
  for size in [int(b) for b in args.batches.split(',')]:
    curves, margin = [], []
    for draw in range(args.draws):
      batch = images[rng.choice(len(images), size, replace=False)]
      z1, z2 = (np.asarray(z) for z in embed(batch, jax.random.key(draw)))
      curves.append([objectives(z1, z2, tau) for tau in TAUS])
      margin.append(margins(z1, z2))
    curve, margin = np.mean(curves, axis=0), np.concatenate(margin)  # [taus, 2], [anchors]
    row = {'batch': size, 'taus': TAUS.tolist(), 'info_nce': curve[:, 0].tolist(),
           'negatives_only': curve[:, 1].tolist(),
           'positive_top1': float(np.mean(margin > 0)), 'mean_margin': float(margin.mean()),
           'info_nce_argmin': float(TAUS[curve[:, 0].argmin()]),
           'negatives_only_argmin': float(TAUS[curve[:, 1].argmin()]),
           'workdir': args.workdir, 'model_tau': learned_tau}
    rows.append(row)
    print(f"batch {size}: positive outranks all negatives for {row['positive_top1']:.3f} of "
          f"anchors; least on the grid: InfoNCE at τ {row['info_nce_argmin']:.3g}, "
          f"negatives-only at τ {row['negatives_only_argmin']:.3g}", flush=True)
  with open(args.json, 'w') as f:
    json.dump(rows, f, indent=1)
  print(f'wrote {args.json}')


if __name__ == '__main__':
  main()
