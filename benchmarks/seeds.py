"""Configs and their variants over seeds, side by side: one table per group.

  python benchmarks/seeds.py --group results --seeds 0,1,2  # docs/results.md
  python benchmarks/seeds.py --group digits_modes --seeds 0,1,2 [--root workdirs/seeds]
  python benchmarks/seeds.py --group shapes_modes --seeds 0
  python benchmarks/seeds.py --group sogclr_batch --seeds 0,1,2
  python benchmarks/seeds.py --group halving --seeds 0,1,2  # jaxcl sweep --search halving
  python benchmarks/seeds.py --group naflex --seeds 0,1,2  # docs/naflex.md
  python benchmarks/seeds.py --group distill --seeds 0,1,2  # docs/pretrained.md
  python benchmarks/seeds.py --group siglip2 --seeds 0,1,2  # docs/siglip2_recipe.md

Each group is a list of variants: a config and its `--config.KEY=VALUE`
overrides (VARIANTS below). Every (variant, seed) trains with `jaxcl train`
in ROOT/GROUP/VARIANT-seedS, one after the other; a run whose eval.json is at
total_steps is not trained again, so a killed benchmark resumes where it
stopped (and a killed run from its checkpoint). Prints a Markdown table (one
row per variant: each seed's final evaluation and the mean, the last log
step's τ, its batch p10-p90 for the per-anchor modes) and writes every run's
row, with the commit it ran on, to JSON (merged with the file's other
groups); docs/generate.py makes docs/results.md's table from the `results`
group. Accuracy figures are
deterministic for a seed and package set; wall seconds are only comparable
within one run on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from etils import epath

from jaxcl import config as config_lib, report

DIGITS = 'configs/simclr_digits.py'
SHAPES = 'configs/clip_shapes.py'
SOGCLR = {'loss.estimator': 'sogclr'}
# iSogCLR's settings: LibAUC's for unimodal data on digits; on the captioned
# shapes its image-text τ range and init (τ in [0.005, 0.05] from 0.01) with
# ρ 4, not its 6-8: τ_i's gradient is ρ - KL(softmax over the negatives ‖
# uniform) and that KL is at most log 255 = 5.5 at batch 256, so ρ 6 sends
# every τ_i to the minimum (LibAUC's batches are 1,024).
INDIVIDUAL = {**SOGCLR, 'temperature.mode': 'individual'}
DIGITS_INDIVIDUAL = {**INDIVIDUAL, 'temperature.min': 0.05, 'temperature.max': 0.7}
SHAPES_INDIVIDUAL = {**INDIVIDUAL, 'temperature.individual_rho': 4.0, 'temperature.init': 0.01,
                     'temperature.min': 0.005, 'temperature.max': 0.05}


# A CLIP of a tenth of the shapes CLIP's width, one block per tower: the student.
SMALL_CLIP = {'model.vit.width': 32, 'model.vit.depth': 1, 'model.vit.heads': 2,
              'model.vit.mlp_dim': 64, 'text.width': 32, 'text.depth': 1, 'text.heads': 2,
              'text.mlp_dim': 64}


def _equal_epochs(batch_size: int, steps: int) -> dict:
  """The digits config at another batch, warm-up a sixth of the steps."""
  half = steps // 2
  return {'batch_size': batch_size, 'total_steps': steps, 'optimizer.warmup_steps': steps // 6,
          'eval_every_steps': half, 'checkpoint_every_steps': half}


VARIANTS = {
    'results': {  # the shipped configs as they are (docs/results.md)
        'simclr_digits': (DIGITS, {}),
        'clip_shapes': (SHAPES, {}),
        'siglip_shapes': ('configs/siglip_shapes.py', {}),
        # the same models untrained: what training adds
        'simclr_digits-untrained': (DIGITS, {'total_steps': 0}),
        'clip_shapes-untrained': (SHAPES, {'total_steps': 0}),
    },
    'digits_grid': {  # docs/temperature.md's sweep: the fixed τ of `jaxcl sweep` and learnable
        **{f'fixed-{tau}': (DIGITS, {'temperature.mode': 'fixed', 'temperature.init': tau})
           for tau in (0.05, 0.1, 0.2, 0.5, 1.0)},
        'learnable': (DIGITS, {}),
    },
    'digits_modes': {
        'learnable': (DIGITS, {}),
        'fixed-0.5': (DIGITS, {'temperature.mode': 'fixed', 'temperature.init': 0.5}),
        'free': (DIGITS, {'temperature.mode': 'free'}),
        'predicted': (DIGITS, {'temperature.mode': 'predicted', 'temperature.min': 0.05}),
        'individual': (DIGITS, DIGITS_INDIVIDUAL),
        'individual-eta0.1': (DIGITS, {**DIGITS_INDIVIDUAL, 'temperature.individual_eta': 0.1}),
    },
    'shapes_modes': {
        'learnable': (SHAPES, {}),
        'free': (SHAPES, {'temperature.mode': 'free'}),
        'per-direction': (SHAPES, {'temperature.per_direction': True}),
        'sogclr': (SHAPES, SOGCLR),
        'predicted': (SHAPES, {'temperature.mode': 'predicted'}),
        'individual': (SHAPES, SHAPES_INDIVIDUAL),
        'individual-eta0.001': (SHAPES, {**SHAPES_INDIVIDUAL,
                                         'temperature.individual_eta': 0.001}),
        'individual-rho1': (SHAPES, {**SHAPES_INDIVIDUAL, 'temperature.individual_rho': 1.0,
                                     'temperature.individual_eta': 0.001}),
    },
    'sogclr_batch': {  # equal epochs (about 102) at batch 64 and 512
        'b64-batch': (DIGITS, _equal_epochs(64, 2400)),
        'b64-sogclr': (DIGITS, {**_equal_epochs(64, 2400), **SOGCLR}),
        'b512-batch': (DIGITS, _equal_epochs(512, 300)),
        'b512-sogclr': (DIGITS, {**_equal_epochs(512, 300), **SOGCLR}),
    },
    'naflex': {  # docs/naflex.md: NaFlex against the square resize, the same compute
        'naflex': ('configs/siglip_flex_shapes.py:naflex', {'eval.max_patches': (9, 16, 25)}),
        'square': ('configs/siglip_flex_shapes.py:square', {}),
    },
    'distill': {  # docs/pretrained.md: the small CLIP alone, and taught by its seed's shapes CLIP
        'teacher': (SHAPES, {}),
        'alone': (SHAPES, SMALL_CLIP),
        # {group_root}, {seed}: this group's folder and the run's seed (main)
        'taught': (SHAPES, {**SMALL_CLIP, 'distill.teacher': '{group_root}/teacher-seed{seed}'}),
    },
    'siglip2': {  # docs/siglip2_recipe.md: what SigLIP 2's terms buy, the same 1,000 steps
        'siglip': ('configs/siglip_shapes.py', {}),
        'decoder': ('configs/siglip2_shapes.py', {'self_distill.weight': 0.0,
                                                  'self_distill.masked_weight': 0.0}),
        'all': ('configs/siglip2_shapes.py', {}),
    },
    'halving': {  # `jaxcl sweep --search halving` over the default candidates
        'digits': (DIGITS, {}),
        'shapes': (SHAPES, {}),
    },
}
# Groups whose variants are searches: `jaxcl sweep` with these arguments, the
# row being the chosen candidate's run (DIR/tau-WINNER) and the search's cost.
SEARCHES = {'halving': ['--search', 'halving']}
ACCURACY = ('knn_top1', 'linear_top1', 'zeroshot_top1', 'i2t_r1', 't2i_r1')
EXTRA = ('tolerance', 'test_uniformity', 'zeroshot_ece', 'zeroshot_ece_fitted',
         'zeroshot_fitted_temperature', 'zeroshot_top5', 'i2t_r5', 'i2t_r10', 't2i_r5',
         't2i_r10', 'patch_probe_top1', 'refer_accuracy', 'decoder_perplexity')
# The last log step's view of the softmax (docs/temperature.md's sweep table).
TRAINING = ('entropy', 'effective_negatives', 'positive_prob', 'contrastive_top1',
            'hardest_negative_share', 'alignment', 'uniformity')
TAU = ('temperature', 'temperature_t2i', 'temperature_p10', 'temperature_p90', 'bias')
# The last log step's recipe terms and its seconds per step (SigLIP 2's terms run last).
RECIPE = ('decoder_loss', 'self_distill_loss', 'masked_loss', 'step_time')
WALL = 'benchmark_wall.json'


def _read_json(path):
  try:
    return json.loads(epath.Path(path).read_text())
  except (OSError, ValueError):
    return None


def train(group: str, config: str, overrides: dict, seed: int, run_dir: epath.Path) -> None:
  """`jaxcl train` (or the group's `jaxcl sweep`) for one run unless it is
  finished; its wall seconds recorded when it trained from the start in this call."""
  if _finished(group, run_dir):
    return
  fresh = not run_dir.exists()
  command = (['jaxcl', 'sweep', *SEARCHES[group]] if group in SEARCHES else ['jaxcl', 'train'])
  command += ['--config', config, '--workdir', str(run_dir), f'--config.seed={seed}',
              *(f'--config.{k}={v}' for k, v in overrides.items())]
  print(' '.join(command), flush=True)
  start, commit = time.perf_counter(), _commit()
  subprocess.run(command, check=True)
  if fresh:
    (run_dir / WALL).write_text(json.dumps({'seconds': time.perf_counter() - start,
                                            'commit': commit}))


def _chosen_run(group: str, run_dir: epath.Path) -> epath.Path | None:
  """The run whose evaluation is the row: a search's winner, else the run itself."""
  if group not in SEARCHES:
    return run_dir
  winner = (_read_json(run_dir / 'sweep.json') or {}).get('winner')
  return run_dir / f'tau-{winner}' if winner else None


def _finished(group: str, run_dir: epath.Path) -> bool:
  chosen = _chosen_run(group, run_dir)
  results = _read_json(chosen / 'eval.json') if chosen else None
  return bool(results) and results.get('step') == config_lib.read_saved(chosen).get(
      'total_steps')


def _commit() -> str:
  """The checkout's commit, with '+' when it has uncommitted changes."""
  def git(*args):
    return subprocess.run(['git', *args], capture_output=True, text=True,
                          check=False).stdout.strip()
  # (this script's own output, benchmarks/seeds.json, is no change to the code)
  return (git('rev-parse', '--short', 'HEAD') or 'unknown') + (
      '+' if git('status', '--porcelain', '--untracked-files=no', '--', '.',
                 ':!benchmarks/seeds.json') else '')


def summarize(group: str, run_dir: epath.Path) -> dict:
  """The (chosen) run's final evaluation and the last log step's τ; for a
  search, what it chose and the steps it trained."""
  chosen = _chosen_run(group, run_dir)
  results = _read_json(chosen / 'eval.json') or {}
  train_rows = [r for r in report.read_metrics(chosen) if 'loss' in r]
  last = train_rows[-1] if train_rows else {}
  wall = _read_json(run_dir / WALL)
  compiled = _read_json(chosen / 'compiled_step.json')
  search = _read_json(run_dir / 'sweep.json') if group in SEARCHES else None
  return {'step': results.get('step'),
          **({'winner': search['winner'], 'steps_trained': search['steps_trained'],
              'total_steps': search['total_steps']} if search else {}),
          **{k: results[k] for k in (*ACCURACY, *EXTRA) if k in results},
          **{k: v for k, v in results.items() if k.startswith('max_patches/')},
          **{k: last[k] for k in TAU if k in last},
          **{f'train_{k}': last[k] for k in TRAINING + RECIPE if k in last},
          **({'peak_mib': compiled['peak_bytes'] / 2**20} if compiled else {}),
          'wall_s': wall['seconds'] if wall else None,
          **({'commit': wall['commit']} if wall and 'commit' in wall else {})}


def table(group: str, rows: list[dict]) -> str:
  """Markdown: a row per variant, each seed's accuracies and their mean."""
  metrics = [m for m in ACCURACY + EXTRA if any(m in r for r in rows)]
  lines = ['| variant | seeds | ' + ' | '.join(metrics) + ' | τ at the end | τ p10-p90 |',
           '|---' * (len(metrics) + 4) + '|']
  for variant in VARIANTS[group]:
    mine = [r for r in rows if r['variant'] == variant]
    if not mine:
      continue
    cells = []
    for m in metrics:
      values = [r[m] for r in mine if m in r]
      text = ' / '.join(f'{v:.3f}' for v in values)
      cells.append(text + (f' (**{sum(values) / len(values):.3f}**)' if len(values) > 1 else ''))
    taus = ' / '.join(f"{r['temperature']:.3g}" for r in mine if 'temperature' in r)
    if any('temperature_t2i' in r for r in mine):
      taus += ' (t2i ' + ' / '.join(f"{r['temperature_t2i']:.3g}" for r in mine) + ')'
    spread = ' / '.join(f"{r['temperature_p10']:.3g}-{r['temperature_p90']:.3g}"
                        for r in mine if 'temperature_p10' in r)
    seeds = ','.join(str(r['seed']) for r in mine)
    lines.append(f'| {variant} | {seeds} | ' + ' | '.join(cells) + f' | {taus} | {spread} |')
  return '\n'.join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--group', required=True, choices=sorted(VARIANTS))
  parser.add_argument('--seeds', default='0')
  parser.add_argument('--variants', default='', help='a comma-separated subset of the group')
  parser.add_argument('--root', default='workdirs/seeds')
  parser.add_argument('--json', default='benchmarks/seeds.json')
  args = parser.parse_args()
  seeds = [int(s) for s in args.seeds.split(',')]
  chosen = args.variants.split(',') if args.variants else list(VARIANTS[args.group])
  unknown = sorted(set(chosen) - set(VARIANTS[args.group]))
  if unknown:
    sys.exit(f'--variants: {unknown} not in group {args.group}: {sorted(VARIANTS[args.group])}')
  root = epath.Path(args.root) / args.group
  for seed in seeds:  # every variant at a seed before the next seed
    for variant in chosen:
      config, overrides = VARIANTS[args.group][variant]
      overrides = {k: v.format(group_root=root, seed=seed) if isinstance(v, str) else v
                   for k, v in overrides.items()}
      train(args.group, config, overrides, seed, root / f'{variant}-seed{seed}')
  out = epath.Path(args.json)
  everything = _read_json(out) or {}
  rows = [r for r in everything.get(args.group, [])  # other runs of variants still defined
          if r['variant'] in VARIANTS[args.group]
          and (r['variant'], r['seed']) not in {(v, s) for v in chosen for s in seeds}]
  commit = _commit()  # for runs that did not record theirs when they trained
  for variant in chosen:
    config, overrides = VARIANTS[args.group][variant]
    for seed in seeds:
      rows.append({'variant': variant, 'seed': seed, 'config': config, 'overrides': overrides,
                   'commit': commit, **summarize(args.group, root / f'{variant}-seed{seed}')})
  rows.sort(key=lambda r: (list(VARIANTS[args.group]).index(r['variant']), r['seed']))
  everything[args.group] = rows
  out.write_text(json.dumps(everything, indent=2) + '\n')
  print(table(args.group, rows))
  print(f'wrote {out}')


if __name__ == '__main__':
  main()
