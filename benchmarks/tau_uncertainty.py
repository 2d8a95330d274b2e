"""Predicted τ as uncertainty: τ(x) of one- and two-shape images.

  jaxcl train --config configs/clip_shapes.py --workdir DIR \
      --config.temperature.mode=predicted
  python benchmarks/tau_uncertainty.py --workdir DIR [--json benchmarks/tau_uncertainty.json]

"Temperature as uncertainty" (Zhang et al. 2021) reads a predicted τ(x) as
how unsure the model is of an input's embedding. On the captioned shapes a
two-shape image is the ambiguous one: each of its captions names one shape
only. This loads the run's newest checkpoint, computes τ(x)
(Experiment.predicted_temperature: the τ the loss gives the image as an
anchor) for every image of the test split, and compares the two groups:
mean, quantiles, and the AUC of τ(x) as a score for "two shapes" (the
probability that a random two-shape image gets a higher τ than a random
one-shape image; 0.5: no separation). Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import numpy as np


def auc(positive: np.ndarray, negative: np.ndarray) -> float:
  """P(score of a positive > score of a negative), ties counting half
  (the Mann-Whitney U statistic over the pairs)."""
  greater = (positive[:, None] > negative[None, :]).mean()
  ties = (positive[:, None] == negative[None, :]).mean()
  return float(greater + 0.5 * ties)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--workdir', required=True, help='a run with temperature.mode=predicted')
  parser.add_argument('--json', default='benchmarks/tau_uncertainty.json')
  args = parser.parse_args()
  from jaxcl import data, trained  # pylint: disable=g-import-not-at-top
  exp, state = trained.load_trained(args.workdir)
  if exp.config.temperature.mode != 'predicted':
    sys.exit(f'{args.workdir} has temperature.mode={exp.config.temperature.mode}, not predicted')
  source, _ = data.load_source(exp.config.dataset, exp.config.dataset.eval_test_split)
  images = np.stack([source[i]['image'] for i in range(len(source))])
  two_shapes = np.array([source[i]['label'] < 0 for i in range(len(source))])
  predict = jax.jit(exp.predicted_temperature)
  tau = np.concatenate([np.asarray(predict(state.params, state.batch_stats, images[i:i + 250]))
                        for i in range(0, len(images), 250)])
  rows = []
  for name, mask in (('one shape', ~two_shapes), ('two shapes', two_shapes)):
    q10, q50, q90 = np.quantile(tau[mask], [0.1, 0.5, 0.9])
    rows.append({'images': name, 'count': int(mask.sum()), 'mean_tau': float(tau[mask].mean()),
                 'p10': float(q10), 'p50': float(q50), 'p90': float(q90)})
  result = {'workdir': args.workdir, 'step': int(state.step), 'seed': exp.config.seed,
            'rows': rows, 'auc_two_shapes_higher': auc(tau[two_shapes], tau[~two_shapes])}
  print('| images | count | mean τ | p10 | p50 | p90 |')
  print('|---|---|---|---|---|---|')
  for r in rows:
    print(f"| {r['images']} | {r['count']} | {r['mean_tau']:.4f} | {r['p10']:.4f} | "
          f"{r['p50']:.4f} | {r['p90']:.4f} |")
  print(f"AUC of τ(x) for two shapes against one: {result['auc_two_shapes_higher']:.3f} "
        f"(step {result['step']}, seed {result['seed']})")
  with open(args.json, 'w') as f:
    json.dump(result, f, indent=2)
  print(f'wrote {args.json}')


if __name__ == '__main__':
  main()
