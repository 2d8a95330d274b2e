"""What the per-example τ and SogCLR tables cost in communication at scale:
the collectives of the compiled training step on simulated CPU devices.

  python benchmarks/per_example_comm.py [--devices 256] [--rows_per_device 16]
      [--examples 1000000,10000000] [--json benchmarks/per_example_comm.json]

For the CLIP shapes config with towers of one small block (so that the
tables, not the weights, dominate), a global batch of devices x
rows_per_device, and each dataset size, the step is compiled (never run)
with loss.estimator=batch (no tables), sogclr (one moving average u per
example) and sogclr with temperature.mode=individual (u and τ per example).
Every collective of the partitioned HLO is counted with the bytes of its
result on one device (all-gather: what each device receives; all-reduce,
reduce-scatter, all-to-all, collective-permute: what each device holds
after the exchange). The tables' cost is the difference from the batch
estimator's row. Prints a table and writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

DTYPE_BYTES = {'f32': 4, 's32': 4, 'u32': 4, 'f16': 2, 'bf16': 2, 'pred': 1, 'u8': 1, 's8': 1,
               'f64': 8, 's64': 8, 'u64': 8}
COLLECTIVES = ('all-gather', 'all-reduce', 'reduce-scatter', 'all-to-all', 'collective-permute')
# One HLO instruction: `%name = TYPE[dims]{layout} op(` or a tuple of such results.
_INSTRUCTION = re.compile(r'=\s*(\(.*?\)|\S+)\s+(' + '|'.join(COLLECTIVES) + r')(-start)?\(')
_SHAPE = re.compile(r'(\w+)\[([\d,]*)\]')
VARIANTS = {
    'batch': {},
    'sogclr': {'loss.estimator': 'sogclr'},
    'sogclr + individual τ': {'loss.estimator': 'sogclr', 'temperature.mode': 'individual'},
}


def collectives(hlo: str) -> dict:
  """{op: [count, bytes on one device]} of the collectives in an HLO module's text."""
  found = {op: [0, 0] for op in COLLECTIVES}
  for match in _INSTRUCTION.finditer(hlo):
    result, op = match.group(1), match.group(2)
    size = 0
    for dtype, dims in _SHAPE.findall(result):
      count = 1
      for dim in filter(None, dims.split(',')):
        count *= int(dim)
      size += count * DTYPE_BYTES.get(dtype, 4)
    found[op][0] += 1
    found[op][1] += size
  return found


def compile_case(overrides: dict, devices: int, rows_per_device: int, examples: int) -> dict:
  """The collectives of one configuration's compiled step."""
  import dataclasses  # noqa: PLC0415  (jax is imported once XLA_FLAGS is set: main)

  from jaxcl import data  # noqa: PLC0415
  from jaxcl.config import config_files  # noqa: PLC0415
  from jaxcl.trainer import experiment, train_step, validation  # noqa: PLC0415
  config = config_files.load('configs/clip_shapes.py')
  config.update_from_flattened_dict({
      'model.vit.patch_size': 8, 'model.vit.width': 32, 'model.vit.depth': 1,
      'model.vit.heads': 2, 'model.vit.mlp_dim': 64, 'model.embed_dim': 16,
      'text.max_length': 16, 'text.width': 32, 'text.depth': 1, 'text.heads': 2,
      'text.mlp_dim': 64, 'batch_size': devices * rows_per_device, **overrides})
  validation.validate(config, check_data=False)
  exp = experiment.setup(config, info=data.DatasetInfo((32, 32, 3), 24))
  exp = dataclasses.replace(exp, train_examples=examples)
  compiled = train_step.make_train_step(exp).lower(
      exp.abstract_state(), train_step.abstract_batch(exp)).compile()
  found = collectives(compiled.as_text())
  return {'collectives': {op: {'count': c, 'bytes': b} for op, (c, b) in found.items() if c},
          'total_bytes': sum(b for _, b in found.values())}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--devices', type=int, default=256)
  parser.add_argument('--rows_per_device', type=int, default=16)
  parser.add_argument('--examples', default='1000000,10000000')
  parser.add_argument('--json', default='benchmarks/per_example_comm.json')
  args = parser.parse_args(argv)
  os.environ['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={args.devices}'
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  sys.path.insert(0, os.getcwd())
  rows = []
  for examples in [int(n) for n in args.examples.split(',')]:
    for name, overrides in VARIANTS.items():
      row = {'devices': args.devices, 'global_batch': args.devices * args.rows_per_device,
             'examples': examples, 'variant': name,
             **compile_case(overrides, args.devices, args.rows_per_device, examples)}
      rows.append(row)
      print(f"{examples:>11,} examples  {name:<22} "
            + '  '.join(f"{op} x{v['count']} {v['bytes'] / 2**20:.2f} MiB"
                        for op, v in row['collectives'].items()), flush=True)
  with open(args.json, 'w') as f:
    json.dump(rows, f, indent=1)
  print(f'wrote {args.json}')


if __name__ == '__main__':
  main()
