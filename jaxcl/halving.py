"""`jaxcl sweep --search halving`: successive halving over the τ candidates.

  jaxcl sweep --config CONFIG --workdir DIR --search halving \
      --temperatures 0.05,0.1,0.2,0.5,1.0,learnable [--eta 2] [--holdout 0.2] [--monitor M]

Every candidate trains to the first rung. There the run's own monitor scores
it on held-out data (the method's monitor_metrics: kNN top-1 for SimCLR,
zero-shot top-1 or recall@1 for CLIP and SigLIP; --monitor names another
evaluation metric, such as linear_top1), and the best 1/eta continue
from their checkpoints to the next rung. The last one trains to total_steps
and gets the run's final evaluation, as `jaxcl train` would. The learning-rate
and τ schedules always run to total_steps, so a survivor continues exactly
the run it would have been.

With n candidates there are R = ceil(log_eta n) rungs before the last; rung k
trains ceil(n / eta^k) candidates to floor(total_steps * eta^k / eta^R)
steps. Six candidates at eta 2: 6 to T/8, 3 to T/4, 2 to T/2, 1 to T, which
is 2.125 runs' steps in all.

Held-out data: the monitor replaces the evaluation splits by slices of the
eval train split, its first (1 - holdout) as the kNN bank and probe's train
set and its last `holdout` as the queries (for CLIP and SigLIP: zero-shot and
retrieval), so the test split chooses nothing. --holdout 0 keeps the
configured splits (a dataset with a validation split of its own, or
webdataset shards whose dataset.eval_urls are held out).

The sweep resumes after a kill or a Ctrl-C: sweep.json records every
rung's scores as they come, and a run continues from its checkpoint. Once a
run trained, a rerun with other candidates, --eta, --holdout, --monitor,
config or search is refused before anything trains
(jaxcl.sweep.check_settings), as is a --monitor the method's evaluation does
not write.
"""

from __future__ import annotations

import math

import jax
import matplotlib.pyplot as plt
from etils import epath

from jaxcl import errors, files, methods, report, search_records, sweep
from jaxcl.data import shard_sources
from jaxcl.trainer import checkpoints, trained


def schedule(num_candidates: int, total_steps: int, eta: int = 2) -> list[tuple[int, int]]:
  """[(step, how many candidates train to it)], the last (total_steps, 1)."""
  rungs = 0
  while eta ** rungs < num_candidates:
    rungs += 1
  steps = [total_steps * eta ** k // eta ** rungs for k in range(rungs + 1)]
  if rungs and steps[0] < 1:
    raise errors.ConfigError(f'total_steps={total_steps} is too few for {num_candidates} '
                             f'candidates halved by {eta}: the first rung would be step 0')
  return [(step, -(-num_candidates // eta ** k)) for k, step in enumerate(steps)]


def survivors(scores: dict, candidates: list[str], keep: int) -> list[str]:
  """The `keep` best candidates by score (higher is better; a missing or
  non-finite score ranks last; ties go to the earlier candidate), in the
  candidates' order."""
  def rank(value):
    score = scores.get(value)
    good = score is not None and math.isfinite(score)
    return (0, -score) if good else (1, 0.0)
  kept = set(sorted(candidates, key=lambda v: (*rank(v), candidates.index(v)))[:keep])
  return [v for v in candidates if v in kept]


def holdout_changes(dataset_config, holdout: float) -> dict:
  """Config changes that point the evaluation at held-out slices of the
  dataset group's eval train split (none for holdout 0); ConfigError where
  they cannot."""
  if not holdout:
    return {}
  cut = round(100 * (1 - holdout)) if 0 < holdout < 1 else 0
  errors.check(0 < cut < 100, f'--holdout must be 0 (the configured splits) or a fraction in '
                              f'[0.01, 0.99] of the eval train split (sliced in whole percents), '
                              f'got {holdout}')
  d = dataset_config
  split = d.eval_train_split
  if d.name in (shard_sources.NAME, shard_sources.MIXTURE, 'image_folder') or '[' in split:
    raise errors.ConfigError(
        f'--holdout slices a TFDS split; dataset {d.name!r} split {split!r} cannot be sliced: '
        f'use --holdout=0 to monitor on the configured evaluation splits')
  return {'dataset.eval_train_split': f'{split}[:{cut}%]',
          'dataset.eval_test_split': f'{split}[{cut}%:]', 'eval.zeroshot_dataset': '',
          'eval.zeroshot_split': '', 'eval.zeroshot': (), 'eval.retrieval': ()}


def monitor_metrics(config, monitor: str, changes: dict) -> tuple[str, ...]:
  """The metrics that rank, best first: (monitor,), or the method's own
  without one; ConfigError for a monitor the method's evaluation does not
  write under the config the monitor evaluates with (`changes`, from
  holdout_changes: held-out slices replace the zero-shot and retrieval suite)."""
  method = methods.get(config.method)
  if not monitor:
    return method.monitor_metrics
  monitored = config.copy_and_resolve_references()
  monitored.update_from_flattened_dict(changes)  # as trained.evaluate_checkpoint applies them
  rankable = method.rankable_metrics(monitored)
  errors.check(monitor in rankable, f'--monitor={monitor}: {config.method}\'s evaluation writes no '
                                    f'such score here; choose one of {", ".join(rankable)}')
  return (monitor,)


def monitor_score(metrics: tuple[str, ...], results: dict) -> tuple[str | None, float | None]:
  """(metric, value): the first of `metrics` in `results`."""
  for metric in metrics:
    if results.get(metric) is not None:
      return metric, float(results[metric])
  return None, None


def run_halving(config, workdir, values: list[str], eta: int = 2, holdout: float = 0.2,
                monitor: str = '', log=print) -> dict:
  """Successive halving over `values`; writes sweep.json (every rung, as it
  is scored), sweep.csv and sweep.png. Returns the sweep.json record.
  monitor: the evaluation metric that ranks (default: the method's)."""
  workdir = epath.Path(workdir)
  writer = jax.process_index() == 0
  changes = holdout_changes(config.dataset, holdout)
  rungs = schedule(len(values), config.total_steps, eta)
  metrics = monitor_metrics(config, monitor, changes)
  with sweep.undone_if_refused(workdir, writer):
    configs, record = sweep.prepare(
        config, workdir, values,
        sweep.settings(config, values, 'halving', eta=eta, holdout=holdout, monitor=monitor),
        writer)
    record.setdefault('rungs', [])
    with sweep.ctrl_c_stops_the_sweep():
      return _halve(workdir, record, configs, values, rungs, changes, metrics, writer, log)


def _halve(workdir, record: dict, configs: dict, values: list[str], rungs, changes: dict,
           metrics: tuple[str, ...], writer: bool, log) -> dict:
  """run_halving's rungs, from the first that `record` has not scored."""
  alive = list(values)
  for k, (step, count) in enumerate(rungs):
    last = k == len(rungs) - 1
    if k == len(record['rungs']):
      record['rungs'].append({'step': step, 'candidates': alive, 'scores': {}, 'results': {}})
    rung = record['rungs'][k]
    for value in alive:
      run_dir = workdir / f'tau-{value}'
      if value in rung['scores'] or (last and sweep.finished(run_dir, configs[value])):
        continue
      reached = checkpoints.complete_step(run_dir) or 0
      if reached > step:
        raise errors.ConfigError(f'{run_dir} has trained to step {reached}, past this rung '
                                 f'({step}); a halving sweep needs a new workdir')
      log(f'jaxcl sweep: rung {k + 1}/{len(rungs)}: tau-{value} to step {step}')
      sweep.timed_train(configs[value], run_dir, writer, until_step=None if last else step)
      if last:
        break
      at, results = trained.evaluate_checkpoint(run_dir, changes)
      metric, score = monitor_score(metrics, results)
      if metric is None:
        raise errors.ConfigError(
            f'the monitor scored nothing for tau-{value}: none of {metrics} in '
            f'its held-out evaluation ({", ".join(results) or "none"}); halving needs labels there')
      log(f'jaxcl sweep: tau-{value} at step {at}: {metric} {score} on held-out data')
      rung['scores'][value], rung['results'][value] = score, results
      record['metric'] = metric
      if writer:
        _write(workdir, record, values, rungs)
    if not last:
      alive = survivors(rung['scores'], alive, rungs[k + 1][1])
  record['winner'] = alive[0]
  if writer:
    _write(workdir, record, values, rungs)
    plot_rungs(workdir, record)
  return record


def _write(workdir, record: dict, values: list[str], rungs) -> None:
  """sweep.json and sweep.csv: the record with one row per candidate."""
  reached, rows = _reached(record, rungs), []
  for value in values:
    run_dir = workdir / f'tau-{value}'
    row = (sweep.summarize(run_dir, value) if run_dir.is_dir()
           else {'run': f'tau-{value}', 'tau': value})
    scores = [r['scores'][value] for r in record['rungs'] if value in r['scores']]
    row.update(steps=reached.get(value), monitor=scores[-1] if scores else None)
    rows.append(row)
  record.update(columns=search_records.columns(rows, extra=('steps', 'monitor')), rows=rows,
                steps_trained=sum(reached.values()))
  search_records.write_table(workdir, record)


def _reached(record: dict, rungs) -> dict:
  """{candidate: the step it has trained to}: its last scored rung, the
  winner's total_steps once chosen."""
  reached = {}
  for rung in record['rungs']:
    for value in rung['scores']:
      reached[value] = rung['step']
  if 'winner' in record:
    reached[record['winner']] = rungs[-1][0]
  return reached


def plot_rungs(workdir, record: dict) -> None:
  """DIR/sweep.png: each candidate's held-out score at each rung it
  reached, and the first rung's scores against τ."""
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for i, value in enumerate(record['candidates']):
    points = [(r['step'], r['scores'][value]) for r in record['rungs']
              if r['scores'].get(value) is not None]
    if points:
      axes[0].plot(*zip(*points), 'o-', color=f'C{i}', label=f'τ {value}'
                   + (' (chosen)' if value == record.get('winner') else ''))
  axes[0].set_xscale('log', base=2)
  axes[0].set_xlabel('step (rungs)')
  axes[0].set_ylabel(f'{record.get("metric")}, held-out')
  axes[0].set_title('successive halving: the monitor at each rung')
  axes[0].legend(fontsize=7)
  axes[0].grid(alpha=0.3)
  first = record['rungs'][0]['scores'] if record['rungs'] else {}
  fixed = sorted((float(v), s) for v, s in first.items()
                 if v != search_records.LEARNABLE and s is not None)
  if fixed:
    axes[1].plot(*zip(*fixed), 'o-', color='C0', label='fixed τ')
  if first.get(search_records.LEARNABLE) is not None:
    axes[1].axhline(first[search_records.LEARNABLE], color='C3', ls='--', label='learnable τ')
  axes[1].set_xscale('log')
  axes[1].set_xlabel('τ')
  axes[1].set_title(f'first rung (step {record["rungs"][0]["step"] if record["rungs"] else 0})')
  axes[1].legend(fontsize=7)
  axes[1].grid(alpha=0.3)
  fig.tight_layout()
  report.save_figure(fig, epath.Path(workdir) / files.SWEEP_PNG)
