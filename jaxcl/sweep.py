"""`jaxcl sweep`: one run per temperature, compared in a table and a plot.

  jaxcl sweep --config CONFIG --workdir DIR --temperatures 0.05,0.1,0.2,0.5,1.0,learnable

Each value trains the config with temperature.mode=fixed at that τ (or, for
`learnable`, the config's learnable τ from its init) in DIR/tau-VALUE, one
after the other, and evaluates it. A run whose eval.json is there already, for
exactly this config, is not trained again, so an interrupted sweep resumes
where it stopped (and a killed run resumes from its checkpoint). Rerun with a
different config, the sweep refuses (exit 2) as `jaxcl train` does, unless
only keys a run may change on resuming differ (total_steps, eval, ...): then
each run continues, or is evaluated again. Writes DIR/sweep.csv, DIR/sweep.json
and DIR/sweep.png: the evaluation metrics against τ (log axis) with the
learnable run marked at its final τ, entropy and contrastive accuracy against
τ (SimCLR's Table 5), and the learnable run's τ trajectory.
"""

from __future__ import annotations

import csv
import io
import json
import time

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from etils import epath  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

from jaxcl import config as config_lib  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from jaxcl import files  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from jaxcl import report  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

LEARNABLE = 'learnable'
TRAIN_COLUMNS = ('loss', 'entropy', 'effective_negatives', 'positive_prob', 'contrastive_top1',
                 'contrastive_top5', 'hardest_negative_share', 'alignment', 'uniformity')
ACCURACY_COLUMNS = ('knn_top1', 'linear_top1', 'zeroshot_top1', 'zeroshot_top5', 'i2t_r1',
                    't2i_r1')
EVAL_COLUMNS = (*ACCURACY_COLUMNS, 'tolerance', 'test_uniformity', 'zeroshot_ece',
                'zeroshot_ece_fitted')
WALL_FILE = files.WALL_FILE


def parse_temperatures(text: str) -> list[str]:
  """'0.05,0.1,learnable' -> ['0.05', '0.1', 'learnable']; ConfigError for
  anything that is not a positive number or 'learnable', or repeats."""
  values = [v.strip() for v in text.split(',') if v.strip()]
  if not values:
    raise config_lib.ConfigError('--temperatures needs at least one value')
  for v in values:
    if v != LEARNABLE:
      try:
        ok = float(v) > 0
      except ValueError:
        ok = False
      if not ok:
        raise config_lib.ConfigError(f'--temperatures: {v!r} is neither a positive number nor '
                                     f'{LEARNABLE!r}')
  seen = {}
  for v in values:
    same = seen.setdefault(v if v == LEARNABLE else float(v), v)
    if same is not v:
      raise config_lib.ConfigError(f'--temperatures lists one τ twice ({same} and {v})')
  return values


def run_config(config, value: str):
  """The sweep's config for one temperature value."""
  config = config.copy_and_resolve_references()
  t = config.temperature
  if value == LEARNABLE:
    t.mode = LEARNABLE
  else:
    tau = float(value)
    t.update(mode='fixed', init=tau, min=min(t.min, tau), max=max(t.max, tau))
  config.name = f'{config.name}-tau-{value}' if config.name else f'tau-{value}'
  return config


def _read_json(path):
  """The JSON object in `path`, or None if it is missing or unreadable."""
  try:
    value = json.loads(epath.Path(path).read_text())
  except (OSError, ValueError):
    return None
  return value if isinstance(value, dict) else None


def finished(run_dir, config) -> bool:
  """Whether run_dir holds this config's finished, evaluated run: its
  eval.json is readable and at total_steps, and its saved config is this one."""
  results = _read_json(epath.Path(run_dir) / files.EVAL_FILE)
  if results is None or results.get('step') != config.total_steps:
    return False
  try:
    saved = config_lib.read_saved(run_dir)
  except config_lib.ConfigError:
    return False
  return saved == config_lib.flat_config(config)


def summarize(run_dir, value: str) -> dict:
  """One row of the sweep table from a finished run's files."""
  run_dir = epath.Path(run_dir)
  rows = report.read_metrics(run_dir)
  last = [r for r in rows if 'loss' in r][-1] if any('loss' in r for r in rows) else {}
  results = _read_json(run_dir / files.EVAL_FILE) or {}
  wall = run_dir / WALL_FILE
  row = {'run': run_dir.name, 'tau': value, 'final_tau': last.get('temperature'),
         **{k: last.get(k) for k in TRAIN_COLUMNS},
         **{k: results[k] for k in EVAL_COLUMNS if k in results},
         'wall_time_s': json.loads(wall.read_text())['seconds'] if wall.exists() else None}
  return row


def prepare(config, workdir, values: list[str]) -> dict:
  """{value: its run's config}, every run checked (validated, its workdir
  trainable and resumable with this config) before the first trains; the
  sweep's directory made. ConfigError for a directory that holds something
  else."""
  from jaxcl import run_files  # pylint: disable=g-import-not-at-top
  workdir = epath.Path(workdir)
  if workdir.is_dir() and not (files.is_empty_dir(workdir) or files.is_sweep(workdir)):
    raise config_lib.ConfigError(f'workdir {workdir} holds files but is not a jaxcl sweep (no '
                                 f'sweep.json or tau-* runs); use a new or empty directory')
  configs = {v: run_config(config, v) for v in values}
  for value, cfg in configs.items():
    config_lib.validate(cfg)
    run_files.check_trainable_workdir(workdir / f'tau-{value}')
    config_lib.check_resumable(cfg, workdir / f'tau-{value}')
  workdir.mkdir(parents=True, exist_ok=True)
  return configs


def timed_train(cfg, run_dir, writer: bool, **kwargs) -> None:
  """train.train_and_evaluate, its seconds added to the run's wall_time.json
  (a run resumed after a kill, or continued at a rung, counts every call)."""
  from jaxcl import train  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  train.train_and_evaluate(cfg, run_dir, **kwargs)
  if writer:
    before = (_read_json(run_dir / WALL_FILE) or {}).get('seconds', 0.0)
    files.write_atomically(run_dir / WALL_FILE,
                           json.dumps({'seconds': before + time.perf_counter() - start}))


def run_sweep(config, workdir, values: list[str], log=print) -> dict:
  """Trains and evaluates every value (skipping finished runs); writes the
  sweep files. Returns {'columns', 'rows'}."""
  import jax  # pylint: disable=g-import-not-at-top
  workdir = epath.Path(workdir)
  writer = jax.process_index() == 0  # on a pod, process 0 writes the sweep's files
  configs = prepare(config, workdir, values)
  rows = []
  for value, cfg in configs.items():
    run_dir = workdir / f'tau-{value}'
    if finished(run_dir, cfg):
      log(f'jaxcl sweep: tau-{value} is finished, skipped')
    else:
      log(f'jaxcl sweep: training tau-{value}')
      timed_train(cfg, run_dir, writer)
    rows.append(summarize(run_dir, value))
  table = {'columns': columns(rows), 'rows': rows}
  if writer:
    write_table(workdir, table)
    plot_sweep(workdir, table)
  return table


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
