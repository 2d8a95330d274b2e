"""Plots and an HTML page of a run or a temperature sweep (`jaxcl report`).

A run's page plots its metrics.jsonl against the step (loss, τ, positive
probability, entropy, contrastive accuracy, evaluation metrics) and shows its
config.json and eval.json. A sweep directory's page adds the sweep plot and
table (jaxcl.sweep). Everything is written under DIR/report/, and
DIR/report.html embeds the PNGs, so the page is one self-contained file.
Matplotlib renders headless.
"""

from __future__ import annotations

import base64
import html
import json

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from etils import epath  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

REPORT_DIR, REPORT_FILE = 'report', 'report.html'
# (file name, title, metric keys, log y axis)
RUN_PLOTS = (
    ('loss.png', 'loss', ('loss',), False),
    ('temperature.png', 'temperature τ', ('temperature',), True),
    ('positive_prob.png', 'probability of the positive', ('positive_prob',), False),
    ('entropy.png', 'softmax entropy (nats)', ('entropy',), False),
    ('accuracy.png', 'contrastive accuracy', ('contrastive_top1', 'contrastive_top5'), False),
    ('hardness.png', 'hardest negative\'s share of the negatives\' weight',
     ('hardest_negative_share',), False),
    ('geometry.png', 'alignment and uniformity', ('alignment', 'uniformity'), False),
    ('evaluation.png', 'evaluation', ('knn_top1', 'linear_top1', 'zeroshot_top1', 'i2t_r1',
                                      't2i_r1'), False),
)


def read_metrics(workdir) -> list[dict]:
  path = epath.Path(workdir) / 'metrics.jsonl'
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_run(workdir) -> list[str]:
  """Writes DIR/report/*.png for the metrics the run has; returns their names."""
  rows = read_metrics(workdir)
  out = epath.Path(workdir) / REPORT_DIR
  out.mkdir(parents=True, exist_ok=True)
  written = []
  for name, title, keys, log_y in RUN_PLOTS:
    series = {k: [(r['step'], r[k]) for r in rows if k in r] for k in keys}
    series = {k: v for k, v in series.items() if v}
    if not series:
      continue
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for key, points in series.items():
      steps, values = zip(*points)
      ax.plot(steps, values, marker='o' if len(points) < 10 else None, label=key)
    ax.set_xlabel('step')
    ax.set_title(title)
    if log_y:
      ax.set_yscale('log')
    if len(series) > 1:
      ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(str(out / name), dpi=100)
    plt.close(fig)
    written.append(name)
  return written


def _image(path) -> str:
  data = base64.b64encode(epath.Path(path).read_bytes()).decode('ascii')
  return f'<img src="data:image/png;base64,{data}" alt="{html.escape(epath.Path(path).name)}">'


def _table(rows: list[dict], columns) -> str:
  head = ''.join(f'<th>{html.escape(c)}</th>' for c in columns)
  body = ''.join('<tr>' + ''.join(f'<td>{_fmt(r.get(c))}</td>' for c in columns) + '</tr>'
                 for r in rows)
  return f'<table><tr>{head}</tr>{body}</table>'


def _fmt(value) -> str:
  if isinstance(value, float):
    return f'{value:.4g}'
  return html.escape('' if value is None else str(value))


def _json_block(path) -> str:
  path = epath.Path(path)
  if not path.exists():
    return '<p>(none)</p>'
  return f'<pre>{html.escape(path.read_text())}</pre>'


def write_report(workdir) -> epath.Path:
  """Writes DIR/report/*.png and DIR/report.html; returns the page's path."""
  workdir = epath.Path(workdir)
  parts = [f'<h1>jaxcl report: {html.escape(str(workdir))}</h1>']
  sweep_json = workdir / 'sweep.json'
  if sweep_json.exists():
    sweep = json.loads(sweep_json.read_text())
    parts.append('<h2>Temperature sweep</h2>')
    if (workdir / 'sweep.png').exists():
      parts.append(_image(workdir / 'sweep.png'))
    parts.append(_table(sweep['rows'], sweep['columns']))
    for row in sweep['rows']:
      run = workdir / row['run']
      images = [_image(run / REPORT_DIR / name) for name in plot_run(run)]
      parts.append(f'<h2>run {html.escape(row["run"])}</h2>' + ''.join(images))
  if (workdir / 'metrics.jsonl').exists():
    images = [_image(workdir / REPORT_DIR / name) for name in plot_run(workdir)]
    parts.append('<h2>Metrics</h2>' + ''.join(images))
  parts.append('<h2>eval.json</h2>' + _json_block(workdir / 'eval.json'))
  parts.append('<h2>config.json</h2>' + _json_block(workdir / 'config.json'))
  style = ('body{font-family:sans-serif;max-width:1100px;margin:auto}img{margin:4px}'
           'table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px}'
           'pre{background:#f6f6f6;padding:8px;overflow:auto}')
  page = (f'<!doctype html><html><head><meta charset="utf-8"><title>jaxcl report</title>'
          f'<style>{style}</style></head><body>{"".join(parts)}</body></html>\n')
  path = workdir / REPORT_FILE
  path.write_text(page)
  return path
