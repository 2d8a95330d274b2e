"""Train-step throughput of a config on this machine's devices.

  python benchmarks/step_throughput.py --config configs/simclr_digits.py \
      --batch_sizes 64,256 [--steps 20] [--json OUT.json] [--config.KEY=VALUE ...]

Times the compiled train step of the config's method (augmentation, towers,
the gathered loss, the update) on random uint8 images of the dataset's shape
(and, for CLIP/SigLIP, a typical tokenized caption), after one warm-up step,
and prints a table: compile time, step time, examples/s, XLA's FLOPs per
example, achieved TFLOP/s per device and MFU (where the device's peak is
known). Writes the same rows as JSON.
"""

import json
import sys
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from jaxcl import experiment, parallel, throughput, train_step

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/simclr_digits.py')
_BATCHES = flags.DEFINE_string('batch_sizes', '256', 'Comma-separated global batch sizes.')
_STEPS = flags.DEFINE_integer('steps', 20, 'Timed steps per batch size.')
_JSON = flags.DEFINE_string('json', 'benchmarks/step_throughput.json', 'Where to write the rows.')


def measure(config, batch_size, steps):
  config = config.copy_and_resolve_references()
  config.batch_size = batch_size
  exp = experiment.setup(config)
  state = exp.init_state()
  step = train_step.make_train_step(exp)
  images = np.random.default_rng(0).integers(0, 256, (batch_size, *exp.info.image_shape),
                                             dtype=np.uint8)
  batch = {'image': images}
  if exp.method.text_tower:  # captions of typical length
    batch['text'] = exp.tokenizer.encode(['a small red circle in the top left'] * batch_size)
  batch = parallel.put_batch(exp.mesh, batch)
  t0 = time.perf_counter()
  step = step.lower(state, batch).compile()
  flops = throughput.step_flops(step)
  state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(steps):
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  step_s = (time.perf_counter() - t0) / steps
  kind = jax.devices()[0].device_kind
  rates = throughput.metrics(flops, jax.device_count(), batch_size, step_s, kind)
  return {'config': config.name, 'batch_size': batch_size, 'devices': jax.device_count(),
          'device_kind': kind, 'compile_s': round(compile_s, 2),
          'step_ms': round(1000 * step_s, 1), 'examples_per_sec': round(batch_size / step_s, 1),
          'gflops_per_example': round(rates.get('flops_per_example', 0) / 1e9, 4),
          'tflops_per_device': round(rates.get('tflops_per_device', 0), 4),
          'mfu': round(rates['mfu'], 4) if 'mfu' in rates else None}


def main(argv):
  del argv
  rows = [measure(_CONFIG.value, int(b), _STEPS.value) for b in _BATCHES.value.split(',')]
  header = ('config', 'batch_size', 'devices', 'device_kind', 'compile_s', 'step_ms',
            'examples_per_sec', 'gflops_per_example', 'tflops_per_device', 'mfu')
  print(' | '.join(header))
  for row in rows:
    print(' | '.join(str(row[h]) for h in header))
  with open(_JSON.value, 'w') as f:
    json.dump(rows, f, indent=2)
  print(f'wrote {_JSON.value}', file=sys.stderr)


if __name__ == '__main__':
  app.run(main)
