"""Per-example τ on the captioned shapes: one- against two-shape images.

  jaxcl train --config configs/clip_shapes.py --workdir DIR \
      --config.temperature.mode=predicted   # or individual, with loss.estimator=sogclr
  python benchmarks/tau_uncertainty.py --workdir DIR [--json benchmarks/tau_uncertainty.json]

On the captioned shapes a two-shape image is the ambiguous one: each of its
captions names one shape only. This loads the run's newest checkpoint and
compares the τ of the two kinds of image:
- predicted ("temperature as uncertainty", Zhang et al. 2021, which reads
  τ(x) as how unsure the model is of an input): τ(x)
  (Experiment.predicted_temperature, the τ the loss gives the image as an
  anchor) for every image of the test split;
- individual (iSogCLR, whose τ_i is meant to follow how frequent an
  example's semantics are): every training example's τ_i from the train
  state's per-example table, for the image and for the caption as anchor.
For each: mean, quantiles, and the AUC of τ as a score for "two shapes" (the
probability that a random two-shape image gets a higher τ than a random
one-shape image; 0.5: no separation). Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import numpy as np

from jaxcl import data
from jaxcl.trainer import trained


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
  exp, state = trained.load_trained(args.workdir)
  mode = exp.config.temperature.mode
  if mode not in ('predicted', 'individual'):
    sys.exit(f'{args.workdir} has temperature.mode={mode}, neither predicted nor individual')
  d = exp.config.dataset
  split = d.eval_test_split if mode == 'predicted' else d.train_split
  source, _ = data.load_source(exp.config.dataset, split)
  two_shapes = np.array([source[i]['label'] < 0 for i in range(len(source))])
  if mode == 'predicted':
    images = np.stack([source[i]['image'] for i in range(len(source))])
    predict = jax.jit(exp.predicted_temperature)
    taus = {'τ(x), test images': np.concatenate([
        np.asarray(predict(state.params, state.batch_stats, images[i:i + 250]))
        for i in range(0, len(images), 250)])}
  else:  # the per-example table's rows are the training split's examples, in order
    table = np.asarray(state.per_example['tau'])[:len(source)]
    taus = {'τ_i, training images as anchors': table[:, 0],
            'τ_i, their captions as anchors': table[:, 1]}
  result = {'workdir': args.workdir, 'mode': mode, 'split': split, 'step': int(state.step),
            'seed': exp.config.seed, 'groups': []}
  print('| τ | images | count | mean τ | p10 | p50 | p90 |')
  print('|---|---|---|---|---|---|---|')
  for what, tau in taus.items():
    rows = []
    for name, mask in (('one shape', ~two_shapes), ('two shapes', two_shapes)):
      q10, q50, q90 = np.quantile(tau[mask], [0.1, 0.5, 0.9])
      rows.append({'images': name, 'count': int(mask.sum()), 'mean_tau': float(tau[mask].mean()),
                   'p10': float(q10), 'p50': float(q50), 'p90': float(q90)})
      print(f"| {what} | {name} | {rows[-1]['count']} | {rows[-1]['mean_tau']:.4f} | {q10:.4f} | "
            f"{q50:.4f} | {q90:.4f} |")
    result['groups'].append({'tau': what, 'rows': rows,
                             'auc_two_shapes_higher': auc(tau[two_shapes], tau[~two_shapes])})
    print(f"AUC of {what} for two shapes against one: "
          f"{result['groups'][-1]['auc_two_shapes_higher']:.3f}")
  print(f"(step {result['step']}, seed {result['seed']}, {split} split)")
  with open(args.json, 'w') as f:
    json.dump(result, f, indent=2)
  print(f'wrote {args.json}')


if __name__ == '__main__':
  main()
