"""Train-step throughput and memory of a config on this machine's devices.

  python benchmarks/step_throughput.py --config configs/simclr_digits.py \
      --batch_sizes 64,256 [--steps 20] [--json OUT.json] [--config.KEY=VALUE ...] \
      [--variants 'microbatch_size=256;model.remat=full,model.scan_layers=True']
  python benchmarks/step_throughput.py --config configs/clip_vit_b16.py --architecture ViT-B-16

Times the compiled train step of the config's method (augmentation, towers,
the gathered loss, the update) on synthetic data (jaxcl.trainer.synthetic: random
uint8 images of the config's input size and, for CLIP/SigLIP, random captions
in a table of the tokenizer's published size; no dataset is read), after one
warm-up step, and prints a table: compile time, step time, examples/s, the
compiled step's temporaries and peak memory per device, the towers'
activations (what their forward keeps for the backward: jaxcl.trainer.step_memory),
FLOPs per example, achieved TFLOP/s per device and MFU (where the device's
peak is known). --variants: ';'-separated sets of 'KEY=VALUE,...' overrides,
each measured beside the config itself in the same run, so their ratios
compare like with like. --architecture: a published architecture
(presets.ARCHITECTURES) set on the config. Writes the same rows as JSON.
"""

import ast
import json
import re
import sys
import time

import jax
from absl import app, flags
from ml_collections import config_flags

from jaxcl import parallel
from jaxcl.config import recipes
from jaxcl.trainer import step_memory, synthetic, throughput, train_step

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/simclr_digits.py')
_BATCHES = flags.DEFINE_string('batch_sizes', '256', 'Comma-separated global batch sizes.')
_STEPS = flags.DEFINE_integer('steps', 20, 'Timed steps per batch size.')
_VARIANTS = flags.DEFINE_string('variants', '', "';'-separated 'KEY=VALUE,...' override sets.")
_ARCHITECTURE = flags.DEFINE_string('architecture', '', 'A presets.ARCHITECTURES name.')
_JSON = flags.DEFINE_string('json', 'benchmarks/step_throughput.json', 'Where to write the rows.')


def variant_configs(config, variants: str, architecture: str = ''):
  """[(name, config)]: the config itself, then one per override set."""
  config = config.copy_and_resolve_references()
  if architecture:
    recipes.architecture(config, architecture)
  out = [('base', config)]
  for variant in filter(None, variants.split(';')):
    changed = config.copy_and_resolve_references()
    for item in re.split(r',(?![^()]*\))', variant):  # not the commas of a '(9, 16)'
      key, value = item.split('=', 1)
      changed.update_from_flattened_dict({key: _literal(value)})
    out.append((variant, changed))
  return out


def _literal(value: str):
  """'256' -> 256, 'True' -> True, '(1, 2)' -> (1, 2); anything else stays a string."""
  try:
    return ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return value


def measure(config, batch_size, steps, name='base'):
  config = config.copy_and_resolve_references()
  config.batch_size = batch_size
  exp = synthetic.setup(config)
  state = exp.init_state()
  batch = parallel.put_batch(exp.mesh, synthetic.batch(exp, batch_size))
  t0 = time.perf_counter()
  step = train_step.compile_step(exp)
  memory = step_memory.analysis(step, exp)
  state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(steps):
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  step_s = (time.perf_counter() - t0) / steps
  kind = jax.devices()[0].device_kind
  rates = throughput.metrics(memory['flops_per_device'], jax.device_count(), batch_size, step_s,
                             kind)
  return {'config': config.name, 'variant': name, 'batch_size': batch_size,
          'devices': jax.device_count(), 'device_kind': kind, 'compile_s': round(compile_s, 2),
          'step_ms': round(1000 * step_s, 1), 'examples_per_sec': round(batch_size / step_s, 1),
          'temp_mib': round(memory['temp_bytes'] / 2**20, 1),
          'activation_mib': round(step_memory.activation_bytes(exp) / 2**20, 1),
          'peak_mib': round(memory['peak_bytes'] / 2**20, 1),
          'gflops_per_example': round(rates.get('flops_per_example', 0) / 1e9, 4),
          'tflops_per_device': round(rates.get('tflops_per_device', 0), 4),
          'mfu': round(rates['mfu'], 4) if 'mfu' in rates else None}


def main(argv):
  del argv
  rows = [measure(config, int(b), _STEPS.value, name)
          for b in _BATCHES.value.split(',')
          for name, config in variant_configs(_CONFIG.value, _VARIANTS.value,
                                              _ARCHITECTURE.value)]
  header = ('config', 'variant', 'batch_size', 'devices', 'device_kind', 'compile_s', 'step_ms',
            'examples_per_sec', 'temp_mib', 'activation_mib', 'peak_mib', 'gflops_per_example',
            'tflops_per_device', 'mfu')
  print(' | '.join(header))
  for row in rows:
    print(' | '.join(str(row[h]) for h in header), flush=True)
  with open(_JSON.value, 'w') as f:
    json.dump(rows, f, indent=2)
  print(f'wrote {_JSON.value}', file=sys.stderr)


if __name__ == '__main__':
  app.run(main)
