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
import io
import json

import matplotlib
import matplotlib.pyplot as plt
from etils import epath

from jaxcl import errors, files
from jaxcl.workdir import metrics_log

matplotlib.use('Agg')  # headless; pyplot picks its backend at the first figure

REPORT_DIR, REPORT_FILE = files.REPORT_DIR, files.REPORT_FILE
# (file name, title, metric keys, log y axis)
RUN_PLOTS = (
    ('loss.png', 'loss', ('loss',), False),
    # (individual τ: the batch's mean and quantiles; per-direction: text-to-image's)
    ('temperature.png', 'temperature τ', ('temperature', 'temperature_t2i', 'temperature_p10',
                                          'temperature_p50', 'temperature_p90'), True),
    ('positive_prob.png', 'probability of the positive', ('positive_prob',), False),
    ('entropy.png', 'softmax entropy (nats)', ('entropy',), False),
    ('accuracy.png', 'contrastive accuracy', ('contrastive_top1', 'contrastive_top5'), False),
    ('hardness.png', 'hardest negative\'s share of the negatives\' weight',
     ('hardest_negative_share',), False),
    ('geometry.png', 'alignment and uniformity', ('alignment', 'uniformity'), False),
    ('evaluation.png', 'evaluation', ('knn_top1', 'linear_top1', 'zeroshot_top1', 'i2t_r1',
                                      't2i_r1'), False),
)


def read_metrics(workdir, with_skipped: bool = False):
  """The rows of DIR/metrics.jsonl: JSON objects with an integer `step`.
  Other lines (cut short by a full disk, edited by hand) are skipped;
  with_skipped: return (rows, number of lines skipped)."""
  rows, skipped = [], 0
  for line in metrics_log.read_lines(workdir):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
      ok = isinstance(row, dict) and isinstance(row.get('step'), int)
    except ValueError:
      ok = False
    if ok:
      rows.append(row)
    else:
      skipped += 1
  return (rows, skipped) if with_skipped else rows


def _plottable(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def plot_run(workdir, rows=None) -> list[str]:
  """Writes DIR/report/*.png for the metrics the run has; returns their names."""
  rows = read_metrics(workdir) if rows is None else rows
  out = epath.Path(workdir) / REPORT_DIR
  out.mkdir(parents=True, exist_ok=True)
  written = []
  for name, title, keys, log_y in RUN_PLOTS:
    series = {k: [(r['step'], r[k]) for r in rows if _plottable(r.get(k))] for k in keys}
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
    save_figure(fig, out / name)
    written.append(name)
  return written


def save_figure(fig, path) -> None:
  """Writes a matplotlib figure as a PNG (atomically) and closes it."""
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', dpi=100)
  plt.close(fig)
  files.write_atomically(path, buffer.getvalue())


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


def _read_sweep(path) -> dict:
  try:
    sweep = json.loads(path.read_text())
    ok = (isinstance(sweep, dict) and isinstance(sweep.get('rows'), list)
          and isinstance(sweep.get('columns'), list)
          and all(isinstance(r, dict) and isinstance(r.get('run'), str) for r in sweep['rows']))
  except ValueError:
    ok = False
  if not ok:
    raise errors.ConfigError(f'{path} is not a jaxcl sweep table; rerun jaxcl sweep to rewrite it')
  return sweep


def write_report(workdir) -> tuple[epath.Path, int]:
  """Writes DIR/report/*.png and DIR/report.html; returns the page's path
  and how many unreadable metrics lines were skipped. ConfigError if DIR
  is neither a jaxcl run nor a sweep."""
  workdir = epath.Path(workdir)
  if not (files.is_run(workdir) or files.is_sweep(workdir)):
    raise errors.ConfigError(f'{workdir} is neither a jaxcl workdir ({files.CONFIG_FILE}) nor a '
                             f'sweep (sweep.json): nothing to report')
  parts, skipped = [f'<h1>jaxcl report: {html.escape(str(workdir))}</h1>'], 0
  sweep_json = workdir / files.SWEEP_JSON
  if sweep_json.exists():
    sweep = _read_sweep(sweep_json)
    parts.append('<h2>Temperature sweep</h2>')
    if (workdir / files.SWEEP_PNG).exists():
      parts.append(_image(workdir / files.SWEEP_PNG))
    parts.append(_table(sweep['rows'], sweep['columns']))
    for row in sweep['rows']:
      run = workdir / row['run']
      rows, lost = read_metrics(run, with_skipped=True)
      skipped += lost
      images = [_image(run / REPORT_DIR / name) for name in plot_run(run, rows)]
      parts.append(f'<h2>run {html.escape(row["run"])}</h2>' + ''.join(images))
  if metrics_log.exists(workdir):
    rows, lost = read_metrics(workdir, with_skipped=True)
    skipped += lost
    images = [_image(workdir / REPORT_DIR / name) for name in plot_run(workdir, rows)]
    parts.append('<h2>Metrics</h2>' + ''.join(images))
  parts.append(f'<h2>{files.EVAL_FILE}</h2>' + _json_block(workdir / files.EVAL_FILE))
  parts.append(f'<h2>{files.CONFIG_FILE}</h2>' + _json_block(workdir / files.CONFIG_FILE))
  style = ('body{font-family:sans-serif;max-width:1100px;margin:auto}img{margin:4px}'
           'table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px}'
           'pre{background:#f6f6f6;padding:8px;overflow:auto}')
  page = (f'<!doctype html><html><head><meta charset="utf-8"><title>jaxcl report</title>'
          f'<style>{style}</style></head><body>{"".join(parts)}</body></html>\n')
  path = workdir / REPORT_FILE
  files.write_atomically(path, page)
  return path, skipped
