"""The measured tables the docs show, from the rows that benchmarks/seeds.py
(benchmarks/seeds.json) and the other benchmarks (benchmarks/NAME.json)
wrote: each figure a mean [min, max] over seeds, with the commits the runs
ran on. docs/generate.py puts them between their page's markers.
"""

from __future__ import annotations

import functools
import json
import pathlib

REPO = pathlib.Path(__file__).resolve().parent.parent
SEEDS_JSON = REPO / 'benchmarks' / 'seeds.json'
# What the results table shows of each run's eval.json, by column.
RESULT_METRICS = ('knn_top1', 'linear_top1', 'zeroshot_top1', 'i2t_r1', 't2i_r1')


def _mean_range(values: list, digits: int = 3, bold: bool = False) -> str:
  """'mean [min, max]' of values ('' for none), the mean in bold if asked."""
  if not values:
    return ''
  mean = f'{sum(values) / len(values):.{digits}f}'
  if len(values) == 1:  # one seed: no range to give
    return f'**{mean}**' if bold else mean
  return f'{f"**{mean}**" if bold else mean} [{min(values):.{digits}f}, {max(values):.{digits}f}]'


def seed_results() -> str:
  """The shipped configs' final evaluations: mean [min, max] over seeds."""
  rows = json.loads(SEEDS_JSON.read_text()).get('results', []) if SEEDS_JSON.exists() else []
  if not rows:
    return '(not measured yet: python benchmarks/seeds.py --group results --seeds 0,1,2)'
  metrics = [m for m in RESULT_METRICS if any(m in r for r in rows)]
  out = ['| config | seeds | ' + ' | '.join(f'`{m}`' for m in metrics) + ' | τ at the end '
         '| wall time | commit |', '|---' * (len(metrics) + 5) + '|']
  for variant in dict.fromkeys(r['variant'] for r in rows):
    mine = [r for r in rows if r['variant'] == variant]
    cells = []
    for m in metrics:
      values = [r[m] for r in mine if m in r]
      cells.append(_mean_range(values, bold=True))
    taus = [r['temperature'] for r in mine if 'temperature' in r]
    walls = [r['wall_s'] for r in mine if r.get('wall_s')]
    commits = sorted({r.get('commit', '?') for r in mine})
    settings = ''.join(f' `--config.{k}={v}`' for k, v in mine[0].get('overrides', {}).items())
    out.append(f'| `{mine[0]["config"]}`{settings} | {",".join(str(r["seed"]) for r in mine)} | '
               + ' | '.join(cells)
               + (f' | {min(taus):.3g}-{max(taus):.3g} | ' if taus else ' | (untrained) | ')
               + (f'{min(walls) / 60:.1f}-{max(walls) / 60:.1f} min' if walls else '')
               + f' | {", ".join(commits)} |')
  return '\n'.join(out)


# The image-text configs' evaluation in detail (docs/results.md), one row each.
TWO_TOWER_ROWS = (('zeroshot_top1', '`zeroshot_top1` (694 single-shape test images, 24 classes)'),
                  ('zeroshot_top5', '`zeroshot_top5`'),
                  ('i2t_r1', '`i2t_r1` (1,000 images, 3,000 captions)'), ('i2t_r5', '`i2t_r5`'),
                  ('i2t_r10', '`i2t_r10`'), ('t2i_r1', '`t2i_r1`'), ('t2i_r5', '`t2i_r5`'),
                  ('t2i_r10', '`t2i_r10`'), ('temperature', 'τ at the end'),
                  ('bias', 'SigLIP\'s bias at the end (from -10)'))


def _group(name: str) -> list:
  return json.loads(SEEDS_JSON.read_text()).get(name, []) if SEEDS_JSON.exists() else []


def _side_by_side(rows: list, variants: list, row_specs, missing: str) -> str:
  """A column per variant, a row per (key, label) of row_specs: mean [min, max]
  over the variant's seeds; `missing` where nothing was measured."""
  if not variants:
    return missing
  runs = {v: [r for r in rows if r['variant'] == v] for v in variants}
  out = ['| over seeds ' + ', '.join(sorted({str(r['seed']) for v in variants for r in runs[v]}))
         + ' | ' + ' | '.join(f'`{runs[v][0]["config"]}`' for v in variants) + ' |',
         '|---' * (len(variants) + 1) + '|']
  for key, label in row_specs:
    cells = [_mean_range([r[key] for r in runs[v] if key in r], 2 if key == 'bias' else 3)
             for v in variants]
    if any(cells):
      out.append(f'| {label} | ' + ' | '.join(cells) + ' |')
  commits = sorted({r.get('commit', '?') for v in variants for r in runs[v]})
  return '\n'.join(out + ['', f'Commit: {", ".join(commits)}.'])


def two_tower_results() -> str:
  """CLIP's and SigLIP's final evaluations side by side, mean [min, max]."""
  rows = _group('results')
  variants = [v for v in dict.fromkeys(r['variant'] for r in rows)  # the configs as shipped
              if any('zeroshot_top1' in r and not r.get('overrides') for r in rows
                     if r['variant'] == v)]
  return _side_by_side(rows, variants, TWO_TOWER_ROWS,
                       '(not measured yet: python benchmarks/seeds.py --group results '
                       '--variants clip_shapes,siglip_shapes --seeds 0,1,2)')


# NaFlex against the square resize on the non-square shapes (docs/naflex.md).
NAFLEX_ROWS = (('zeroshot_top1', '`zeroshot_top1` (at the run\'s own 16 patches)'),
               ('zeroshot_top5', '`zeroshot_top5`'), ('i2t_r1', '`i2t_r1`'),
               ('i2t_r5', '`i2t_r5`'), ('t2i_r1', '`t2i_r1`'), ('t2i_r5', '`t2i_r5`'),
               *((f'max_patches/{n}/{key}', f'`{key}` evaluated at {n} patches')
                 for n in (9, 25) for key in ('zeroshot_top1', 'i2t_r1')),
               ('temperature', 'τ at the end'), ('bias', 'bias at the end (from -10)'))


# docs/temperature.md's tables: (key, header, 'range' for mean [min, max] or 'mean', digits).
_TAU_END = ('temperature', 'τ at the end', 'mean', 3)
TAU_TABLES = {
    'tau-grid': ('digits_grid', (
        _TAU_END, ('train_entropy', 'entropy', 'mean', 2),
        ('train_effective_negatives', 'eff. negatives', 'mean', 0),
        ('train_positive_prob', 'p(positive)', 'mean', 3),
        ('train_contrastive_top1', 'contrastive top-1', 'range', 3),
        ('train_hardest_negative_share', 'hardest share', 'mean', 3),
        ('train_alignment', 'alignment', 'mean', 3), ('train_uniformity', 'uniformity', 'mean', 2),
        ('knn_top1', '`knn_top1`', 'range', 3), ('linear_top1', '`linear_top1`', 'range', 3))),
    'tau-digits-modes': ('digits_modes', (
        ('knn_top1', '`knn_top1`', 'range', 3), ('linear_top1', '`linear_top1`', 'range', 3),
        ('tolerance', 'tolerance', 'mean', 3), ('test_uniformity', 'test uniformity', 'mean', 3),
        _TAU_END, ('temperature_p10', 'batch τ p10', 'mean', 3),
        ('temperature_p90', 'batch τ p90', 'mean', 3))),
    'tau-shapes-modes': ('shapes_modes', (
        ('zeroshot_top1', '`zeroshot_top1`', 'range', 3), ('i2t_r1', '`i2t_r1`', 'range', 3),
        ('t2i_r1', '`t2i_r1`', 'range', 3), ('zeroshot_ece', 'ECE', 'mean', 3),
        ('zeroshot_ece_fitted', 'ECE, fitted τ', 'mean', 3),
        ('zeroshot_fitted_temperature', 'fitted τ', 'mean', 3),
        ('tolerance', 'tolerance', 'mean', 3), ('test_uniformity', 'test uniformity', 'mean', 3),
        _TAU_END, ('temperature_t2i', 'τ t2i', 'mean', 4))),
    'tau-sogclr': ('sogclr_batch', (
        ('knn_top1', '`knn_top1`', 'range', 3), ('linear_top1', '`linear_top1`', 'range', 3),
        _TAU_END)),
}


def _variant_rows(group: str, columns) -> str:
  """A row per variant of a benchmarks/seeds.py group: its seeds, then each
  column's mean [min, max] or mean over them, then the commits they ran on."""
  rows = _group(group)
  if not rows:
    return f'(not measured yet: python benchmarks/seeds.py --group {group} --seeds 0,1,2)'
  present = [c for c in columns if any(c[0] in r for r in rows)]
  out = ['| variant | seeds | ' + ' | '.join(c[1] for c in present) + ' | commit |',
         '|---' * (len(present) + 3) + '|']
  for variant in dict.fromkeys(r['variant'] for r in rows):
    mine = [r for r in rows if r['variant'] == variant]
    cells = []
    for key, _, kind, digits in present:
      values = [r[key] for r in mine if r.get(key) is not None  # τ-free logs no τ
                and not (key.startswith('temperature') and _mode(r) == 'free')]
      mean = f'{sum(values) / len(values):.{digits}f}' if values else '—'
      cells.append(_mean_range(values, digits) if kind == 'range' and len(values) > 1
                   else mean)
    commits = sorted({r.get('commit', 'not recorded') for r in mine})
    out.append(f'| {variant} | {",".join(str(r["seed"]) for r in mine)} | '
               + ' | '.join(cells) + f' | {", ".join(commits)} |')
  return '\n'.join(out)


def _mode(row: dict) -> str:
  return (row.get('overrides') or {}).get('temperature.mode', '')


def halving_results() -> str:
  """Each seed's halving choice on digits against the same seed's full grid."""
  searches = [r for r in _group('halving') if r['variant'] == 'digits']
  grid = _group('digits_grid')
  if not searches:
    return '(not measured yet: python benchmarks/seeds.py --group halving --variants digits)'
  out = ['| seed | halving chose | its `linear_top1` | the grid\'s best (by `linear_top1`) | '
         'its `linear_top1` | points from the best | steps trained | wall time | commit |',
         '|---|---|---|---|---|---|---|---|---|']
  for r in sorted(searches, key=lambda r: r['seed']):
    same_seed = [g for g in grid if g['seed'] == r['seed'] and 'linear_top1' in g]
    best = max(same_seed, key=lambda g: g['linear_top1']) if same_seed else None
    best_cells = (f'{best["variant"]} | {best["linear_top1"]:.3f} | '
                  f'{100 * (best["linear_top1"] - r["linear_top1"]):.1f}' if best else '— | — | —')
    wall = f'{r["wall_s"] / 60:.1f} min' if r.get('wall_s') else '— (resumed)'
    out.append(f'| {r["seed"]} | τ {r["winner"]} | {r["linear_top1"]:.3f} | {best_cells} | '
               f'{r["steps_trained"]:,} ({r["steps_trained"] / r["total_steps"]:.3f} runs) | '
               f'{wall} | {r.get("commit", "?")} |')
  return '\n'.join(out)


def _benchmark(name: str):
  """benchmarks/NAME.json, or None where it is not measured yet."""
  path = REPO / 'benchmarks' / f'{name}.json'
  return json.loads(path.read_text()) if path.exists() else None


def _table(columns: list[str], rows: list[list]) -> str:
  """A Markdown table of `rows` (cells already formatted) under `columns`."""
  lines = ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
  return '\n'.join(lines + ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows])


def naflex_budgets() -> str:
  """benchmarks/naflex_budgets.json (benchmarks/step_throughput.py's rows)."""
  rows = _benchmark('naflex_budgets')
  if rows is None:
    return '(not measured yet)'
  cells = []
  for row in rows:
    changed = row['variant'].removeprefix('dataset.')
    what = ('squares of 32 px (16 patches)' if 'square' in changed else
            f'NaFlex, {changed.split("=(")[1].rstrip(",)") if "=" in changed else 16} patches')
    cells.append([what, f'{row["step_ms"]:.0f}', f'{row["examples_per_sec"]:.0f}',
                  f'{row["gflops_per_example"]:.3f}', f'{row["peak_mib"]:.0f}'])
  return _table(['images as', 'step ms', 'examples/s', 'GFLOP per example',
                 'peak MiB per device'], cells)


def naflex_max_batch() -> str:
  """benchmarks/max_batch_siglip2_naflex.json: the largest batch per budget."""
  measured = _benchmark('max_batch_siglip2_naflex')
  if measured is None:
    return '(not measured yet: python benchmarks/max_batch.py --models siglip2_b16_naflex256,...)'
  rows = measured['rows']
  patches = lambda row: int(row['model'].removeprefix('siglip2_b16_naflex'))
  cells = []
  for row in sorted(rows, key=lambda row: (patches(row), row['budget_gb'])):
    fits = row['checked'] and row['batch_size']
    cells.append([f'{patches(row):,}', f'{row["budget_gb"]:g} GB',
                  *([f'{row["batch_size"]:,}', f'{row["peak_bytes"] / 1e9:.1f}'] if fits
                    else ['none fits', '—'])])
  return _table(['patches per image', 'device memory', 'largest batch per device',
                 'its peak GB'], cells)


def per_example_comm() -> str:
  """benchmarks/per_example_comm.json: the step's collectives per device."""
  rows = _benchmark('per_example_comm')
  if rows is None:
    return '(not measured yet: python benchmarks/per_example_comm.py)'
  cells = [[f'{row["examples"]:,}', row['variant'],
            ', '.join(f'{v["count"]} {op}' for op, v in row['collectives'].items()),
            f'{row["total_bytes"] / 1024:,.0f}'] for row in rows]
  return _table(['examples', 'estimator', 'collectives', 'KiB exchanged per device and step'],
                cells)


def tau_sogclr_floor() -> str:
  """benchmarks/tau_sogclr_floor.json: the two objectives' shapes in τ."""
  rows = _benchmark('tau_sogclr_floor')
  if rows is None:
    return '(not measured yet: python benchmarks/tau_sogclr_floor.py --workdir RUN)'
  at = lambda row, key, tau: row[key][min(range(len(row['taus'])),
                                          key=lambda i: abs(row['taus'][i] - tau))]
  return _table(['batch', 'positive outranks every negative', 'mean margin',
                 'InfoNCE least at τ', 'negatives-only least at τ',
                 'negatives-only at τ 0.1 / 0.046 / 0.01'],
                [[f'{row["batch"]}', f'{row["positive_top1"]:.3f}', f'{row["mean_margin"]:.3f}',
                  f'{row["info_nce_argmin"]:.3f}', f'{row["negatives_only_argmin"]:.3f}',
                  ' / '.join(f'{at(row, "negatives_only", t):.1f}' for t in (0.1, 0.046, 0.01))]
                 for row in rows])


def naflex_results() -> str:
  rows = _group('naflex')
  variants = list(dict.fromkeys(r['variant'] for r in rows))
  return _side_by_side(rows, variants, NAFLEX_ROWS,
                       '(not measured yet: python benchmarks/seeds.py --group naflex '
                       '--seeds 0,1,2)')


TABLES = {'seed-results': seed_results, 'two-tower-results': two_tower_results,
          'naflex-results': naflex_results, 'naflex-budgets': naflex_budgets,
          'naflex-max-batch': naflex_max_batch, 'tau-halving': halving_results,
          'per-example-comm': per_example_comm, 'tau-sogclr-floor': tau_sogclr_floor,
          **{name: functools.partial(_variant_rows, group, columns)
             for name, (group, columns) in TAU_TABLES.items()}}


# docs/siglip2_recipe.md: what each of SigLIP 2's terms buys on the shapes (seeds' siglip2 group).
SIGLIP2_COLUMNS = (
    ('zeroshot_top1', '`zeroshot_top1`', 'range', 3), ('i2t_r1', '`i2t_r1`', 'range', 3),
    ('t2i_r1', '`t2i_r1`', 'range', 3), ('patch_probe_top1', 'patch probe', 'range', 3),
    ('refer_accuracy', 'referring accuracy', 'range', 3),
    ('decoder_perplexity', 'caption perplexity', 'range', 2),
    ('train_step_time', 's per step at the end', 'mean', 2),
    ('peak_mib', 'compiled peak MiB', 'mean', 0))

# The terms each benchmarks/step_throughput.py variant of siglip2_shapes.py leaves on.
SIGLIP2_TERMS = {'base': 'decoder + SILC + TIPS',
                 'self_distill.masked_weight=0.0': 'decoder + SILC',
                 'self_distill.weight=0.0': 'decoder + TIPS',
                 'self_distill.weight=0.0,self_distill.masked_weight=0.0': 'decoder',
                 'decoder.weight=0.0,self_distill.weight=0.0,self_distill.masked_weight=0.0':
                     'SigLIP alone'}


def siglip2_costs() -> str:
  """benchmarks/step_throughput_siglip2_shapes.json: each term's step, side by side."""
  rows = _benchmark('step_throughput_siglip2_shapes')
  if rows is None:
    return '(not measured yet: see docs/siglip2_recipe.md for the command)'
  alone = next((r for r in rows if SIGLIP2_TERMS.get(r['variant']) == 'SigLIP alone'), None)
  cells = [[SIGLIP2_TERMS.get(r['variant'], r['variant']), f'{r["step_ms"]:,.0f}',
            f'{r["step_ms"] / alone["step_ms"]:.2f}x' if alone else '—',
            f'{r["gflops_per_example"]:.3f}', f'{r["peak_mib"]:,.0f}'] for r in rows]
  return _table(['terms on', 'step ms', 'of SigLIP alone', 'GFLOP per example',
                 'peak MiB per device'], cells)


TABLES.update({'siglip2-costs': siglip2_costs,
               'siglip2-results': functools.partial(_variant_rows, 'siglip2', SIGLIP2_COLUMNS)})


def siglip2_max_batch() -> str:
  """benchmarks/max_batch_siglip2_recipe.json: SigLIP B/16 alone and with
  SigLIP 2's recipe terms, the largest batch per device per budget."""
  measured = _benchmark('max_batch_siglip2_recipe')
  if measured is None:
    return ('(not measured yet: python benchmarks/max_batch.py --models '
            'siglip_b16,siglip2_b16_recipe --losses blockwise --microbatch_sizes 0 '
            '--remats full --nomoonshot --json benchmarks/max_batch_siglip2_recipe.json)')
  names = {'siglip_b16': 'SigLIP B/16', 'siglip2_b16_recipe': 'with the decoder and the '
                                                               'EMA teacher\'s terms'}
  cells = []
  for row in sorted(measured['rows'], key=lambda r: (r['budget_gb'], r['model'] != 'siglip_b16')):
    fits = row['checked'] and row['batch_size']
    cells.append([names.get(row['model'], row['model']), f'{row["budget_gb"]:g} GB',
                  *([f'{row["batch_size"]:,}', f'{row["peak_bytes"] / 1e9:.1f}',
                     f'{row["state_bytes"] / 1e9:.2f}'] if fits else ['none fits', '—', '—'])])
  return _table(['model', 'device memory', 'largest batch per device', 'its peak GB',
                 'parameters and AdamW state GB'], cells)


TABLES['siglip2-max-batch'] = siglip2_max_batch
