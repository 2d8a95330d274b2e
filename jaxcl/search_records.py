"""The records of a τ search (`jaxcl sweep`, grid or halving): the table's
columns, DIR/sweep.json and sweep.csv, and sweep.png."""

from __future__ import annotations

import csv
import io
import json

import matplotlib
import matplotlib.pyplot as plt
from etils import epath

from jaxcl import files, report

matplotlib.use('Agg')  # headless; pyplot picks its backend at the first figure

LEARNABLE = 'learnable'
TRAIN_COLUMNS = ('loss', 'entropy', 'effective_negatives', 'positive_prob', 'contrastive_top1',
                 'contrastive_top5', 'hardest_negative_share', 'alignment', 'uniformity')
ACCURACY_COLUMNS = ('knn_top1', 'linear_top1', 'zeroshot_top1', 'zeroshot_top5', 'i2t_r1',
                    't2i_r1', 'patch_probe_top1', 'refer_accuracy')
EVAL_COLUMNS = (*ACCURACY_COLUMNS, 'decoder_perplexity', 'tolerance', 'test_uniformity',
                'zeroshot_ece', 'zeroshot_ece_fitted')


def columns(rows: list[dict], extra=()) -> list[str]:
  """The table's columns that some row has a value for."""
  return [c for c in ('run', 'tau', *extra, 'final_tau', *TRAIN_COLUMNS, *EVAL_COLUMNS,
                      'wall_time_s') if any(r.get(c) is not None for r in rows)]


def write_table(workdir, table: dict) -> None:
  """DIR/sweep.json (the whole table) and DIR/sweep.csv (its rows)."""
  workdir = epath.Path(workdir)
  files.write_atomically(workdir / files.SWEEP_JSON, json.dumps(table, indent=2) + '\n')
  text = io.StringIO()
  csv_writer = csv.DictWriter(text, fieldnames=table['columns'], extrasaction='ignore')
  csv_writer.writeheader()
  csv_writer.writerows(table['rows'])
  files.write_atomically(workdir / files.SWEEP_CSV, text.getvalue())


def plot_sweep(workdir, table: dict) -> None:
  """DIR/sweep.png: evaluation vs τ, entropy and contrastive accuracy vs τ,
  and the learnable run's τ trajectory."""
  workdir = epath.Path(workdir)
  rows = table['rows']
  fixed = sorted((r for r in rows if r['tau'] != LEARNABLE), key=lambda r: float(r['tau']))
  learned = [r for r in rows if r['tau'] == LEARNABLE]
  metrics = [c for c in ACCURACY_COLUMNS if any(r.get(c) is not None for r in rows)]
  fig, axes = plt.subplots(1, 4, figsize=(20, 4))
  ax = axes[0]
  for i, metric in enumerate(metrics):
    color = f'C{i}'
    ax.plot([float(r['tau']) for r in fixed], [r.get(metric) for r in fixed], 'o-',
            color=color, label=metric)
    for r in learned:
      ax.plot([r['final_tau']], [r.get(metric)], '*', markersize=14, color=color,
              label=f'{metric}, learnable (final τ)')
  ax.set_xscale('log')
  ax.set_xlabel('τ')
  ax.set_title('evaluation against τ')
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3)
  ax = axes[1]
  taus = [float(r['tau']) for r in fixed]
  ax.plot(taus, [r.get('entropy') for r in fixed], 'o-', color='C0', label='entropy (nats)')
  ax.set_xscale('log')
  ax.set_xlabel('τ')
  ax.set_ylabel('entropy', color='C0')
  twin = ax.twinx()
  twin.plot(taus, [r.get('contrastive_top1') for r in fixed], 's-', color='C1',
            label='contrastive top-1')
  twin.set_ylabel('contrastive top-1', color='C1')
  ax.set_title('the final step\'s softmax against τ')
  ax.grid(alpha=0.3)
  ax = axes[2]
  for r in learned:
    points = [(m['step'], m['temperature']) for m in report.read_metrics(workdir / r['run'])
              if 'temperature' in m]
    if points:
      ax.plot(*zip(*points), color='C3', label='learnable τ')
  for r in fixed:
    ax.axhline(float(r['tau']), color='gray', lw=0.5)
  ax.set_yscale('log')
  ax.set_xlabel('step')
  ax.set_title('learnable τ over training (grey: the fixed values)')
  ax.grid(alpha=0.3)
  ax = axes[3]  # Wang & Liu's trade-off: a small τ buys uniformity and loses tolerance
  for r in rows:
    if r.get('tolerance') is not None and r.get('test_uniformity') is not None:
      ax.plot(r['test_uniformity'], r['tolerance'], '*' if r['tau'] == LEARNABLE else 'o',
              color='C3' if r['tau'] == LEARNABLE else 'C0')
      ax.annotate(f"τ {r['tau']}", (r['test_uniformity'], r['tolerance']), fontsize=7)
  ax.set_xlabel('uniformity (test; lower: more uniform)')
  ax.set_ylabel('tolerance (test; same-class cosine)')
  ax.set_title('uniformity against tolerance, one point per τ')
  ax.grid(alpha=0.3)
  fig.tight_layout()
  report.save_figure(fig, workdir / files.SWEEP_PNG)
