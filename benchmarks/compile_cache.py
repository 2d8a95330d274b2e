"""What the persistent compilation cache buys a user: compile seconds and
wall time of a first and a second start, and a halving sweep without and
with the cache.

  python benchmarks/compile_cache.py [--parts digits,shapes,vit_b16,halving]
      [--json benchmarks/compile_cache.json]

digits, shapes: `jaxcl train` of configs/simclr_digits.py and
  configs/clip_shapes.py for 2 steps and their final evaluation, started
  three times in new workdirs: without a cache (compilation_cache_dir=none),
  then twice with one new cache folder (cold, then warm: a restart). Each
  row gives the step's compile seconds (compiled_step.json) and the
  process's wall time. The dataset is prepared before the first start.
vit_b16: the train step of configs/clip_vit_b16.py (ViT-B/16 CLIP at 224
  px, batch 8 on one device) compiled in a new process, cold then warm; not
  run (a CPU would take minutes per step), only compiled.
halving: `jaxcl sweep --search halving` on digits (4 candidates, 200 steps,
  eta 2) without a cache and with a new one; the wall time of each.

Every process runs on this machine's CPU; the figures are for the machine
they ran on (printed with the table).
"""

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

from absl import app, flags

_PARTS = flags.DEFINE_string('parts', 'digits,shapes,vit_b16,halving', 'Comma-separated parts.')
_JSON = flags.DEFINE_string('json', 'benchmarks/compile_cache.json', 'Where to write the rows.')
_CHILD = flags.DEFINE_string('child', '', 'Internal: compile the ViT-B/16 step and print seconds.')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_CONFIGS = {'digits': 'configs/simclr_digits.py', 'shapes': 'configs/clip_shapes.py'}
SHORT_RUN = ['--config.total_steps=2', '--config.eval_every_steps=1000',
             '--config.log_every_steps=1']
HALVING = ['--search', 'halving', '--temperatures=0.1,0.5,1.0,learnable', '--eta', '2',
           '--config.total_steps=200']


def _jaxcl(*args, cache: str) -> float:
  """Seconds `jaxcl ARGS --config.compilation_cache_dir=CACHE` took."""
  env = {k: v for k, v in os.environ.items() if k != 'JAX_COMPILATION_CACHE_DIR'}
  t0 = time.perf_counter()
  subprocess.run([sys.executable, '-m', 'jaxcl.cli', *args,
                  f'--config.compilation_cache_dir={cache}'], check=True, cwd=REPO, env=env,
                 stdout=subprocess.DEVNULL)
  return round(time.perf_counter() - t0, 1)


def _train_starts(name: str, root: str) -> list[dict]:
  config = os.path.join(REPO, RUN_CONFIGS[name])
  cache = os.path.join(root, f'{name}_cache')
  rows = []
  _jaxcl('train', '--config', config, '--workdir', os.path.join(root, f'{name}_prepare'),
         '--config.total_steps=0', cache='none')  # the dataset, prepared beforehand
  for start, where in (('no cache', 'none'), ('cold cache', cache), ('warm cache', cache)):
    workdir = os.path.join(root, f'{name}_{where == "none"}_{len(rows)}')
    wall = _jaxcl('train', '--config', config, '--workdir', workdir, *SHORT_RUN, cache=where)
    with open(os.path.join(workdir, 'compiled_step.json'), encoding='utf-8') as f:
      record = json.load(f)
    rows.append({'part': name, 'start': start, 'step_compile_s': record['compile_seconds'],
                 'from_cache': record['from_compilation_cache'], 'wall_s': wall})
  return rows


def _vit_b16_child() -> None:
  import jax  # noqa: PLC0415  (after the flags are parsed)

  from jaxcl.config import config_files  # noqa: PLC0415  (as jax)
  from jaxcl.trainer import compilation_cache, synthetic, train_step  # noqa: PLC0415  (as jax)
  compilation_cache.enable(_CHILD.value, None)
  config = config_files.load(os.path.join(REPO, 'configs/clip_vit_b16.py'))
  config.batch_size = 8
  config.text.update(tokenizer='bytes', normalize='', pad_id=-1)  # no vocabulary file here
  exp = synthetic.setup(config, devices=jax.devices()[:1])
  t0, hits = time.perf_counter(), compilation_cache.hits()
  train_step.compile_step(exp)
  print(json.dumps({'compile_s': round(time.perf_counter() - t0, 1),
                    'from_cache': compilation_cache.hits() > hits}))


def _vit_b16(root: str) -> list[dict]:
  cache, rows = os.path.join(root, 'vit_cache'), []
  for start in ('cold cache', 'warm cache'):
    out = subprocess.run([sys.executable, __file__, f'--child={cache}'], check=True,
                         capture_output=True, text=True, cwd=REPO,
                         env=dict(os.environ, JAX_PLATFORMS='cpu'))
    record = json.loads(out.stdout.strip().splitlines()[-1])
    rows.append({'part': 'vit_b16', 'start': start, 'step_compile_s': record['compile_s'],
                 'from_cache': record['from_cache'], 'wall_s': None})
  return rows


def _halving(root: str) -> list[dict]:
  config = os.path.join(REPO, RUN_CONFIGS['digits'])
  rows = []
  for start, where in (('no cache', 'none'), ('cold cache', os.path.join(root, 'sweep_cache'))):
    wall = _jaxcl('sweep', '--config', config,
                  '--workdir', os.path.join(root, f'sweep_{len(rows)}'), *HALVING, cache=where)
    rows.append({'part': 'halving', 'start': start, 'step_compile_s': None, 'from_cache': None,
                 'wall_s': wall})
  return rows


def main(argv):
  del argv
  if _CHILD.value:
    _vit_b16_child()
    return
  root = tempfile.mkdtemp(prefix='jaxcl-compile-cache-bench-')
  parts = {'digits': lambda: _train_starts('digits', root),
           'shapes': lambda: _train_starts('shapes', root),
           'vit_b16': lambda: _vit_b16(root), 'halving': lambda: _halving(root)}
  rows = []
  try:
    for part in _PARTS.value.split(','):
      rows += parts[part]()
      print(json.dumps(rows[-1]), flush=True)
  finally:
    shutil.rmtree(root, ignore_errors=True)
  machine = f'{platform.machine()}, {os.cpu_count()} cores, CPU only'
  print(f'\n{"part":<9} {"start":<11} {"step compile s":>15} {"from cache":>11} {"wall s":>8}'
        f'   ({machine})')
  for r in rows:
    print(f'{r["part"]:<9} {r["start"]:<11} {r["step_compile_s"] or "":>15} '
          f'{"" if r["from_cache"] is None else r["from_cache"]!s:>11} {r["wall_s"] or "":>8}')
  with open(_JSON.value, 'w', encoding='utf-8') as f:
    json.dump({'machine': machine, 'rows': rows}, f, indent=2)


if __name__ == '__main__':
  app.run(main)
