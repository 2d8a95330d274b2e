"""Loss + gradient: dense vs blockwise (and ring / all-gather on simulated devices).

  python benchmarks/loss_memory.py [--batches 1024,4096,16384,65536] [--dim 512]
      [--block_size 1024] [--devices 8] [--json benchmarks/loss_memory.json]

For every global batch N and implementation, a fresh subprocess builds
L2-normalized float32 embeddings a, b [N, dim], compiles
jax.value_and_grad of jaxcl.losses.clip_loss (both directions, gradients for
a, b and τ) and reports:

- compiled peak: the executable's memory analysis (arguments + outputs +
  temporaries, the bytes XLA plans to hold at once), before running it;
- process peak RSS (resource.getrusage) after running it: what the process
  really touched, jax and the inputs included;
- wall time: the median of 3 runs after a warm-up run, or for batches above
  --repeat_below a single run (the executable is compiled ahead of time, so
  the single run includes no compilation).

A case whose compiled peak exceeds --max_gb is not run (reported as such).
"one device" cases run on 1 CPU device; "sharded" cases on --devices
simulated CPU devices inside shard_map (the 'blockwise' all-gather version
and the 'ring' version; on simulated devices they share the host's cores, so
their times measure the work, not real interconnect overlap). Prints a table
and writes the rows as JSON.
"""

import argparse
import json
import os
import subprocess
import sys

CASE = r'''
import json, os, resource, sys, time
args = json.loads(sys.argv[1])
os.environ['XLA_FLAGS'] = f"--xla_force_host_platform_device_count={args['devices']}"
os.environ['JAX_PLATFORMS'] = args['platform']
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from jaxcl import losses

n, d, impl, block = args['batch'], args['dim'], args['impl'], args['block_size']
if args['devices'] > 1:
  mesh = jax.make_mesh((args['devices'],), ('data',), axis_types=(AxisType.Auto,))
  options = losses.LossOptions('data', impl, block)
  loss = jax.shard_map(lambda a, b, t: losses.clip_loss(a, b, t, options).loss,
                       mesh=mesh, in_specs=(P('data'), P('data'), P()), out_specs=P())
  sharding = NamedSharding(mesh, P('data'))
else:
  options = losses.LossOptions(None, impl, block)
  loss = lambda a, b, t: losses.clip_loss(a, b, t, options).loss
  sharding = None
step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
key_a, key_b = jax.random.split(jax.random.key(0))
def embeddings(key):
  x = jax.random.normal(key, (n, d), jnp.float32)
  return x / jnp.linalg.norm(x, axis=1, keepdims=True)
a = jax.jit(embeddings, out_shardings=sharding)(key_a)
b = jax.jit(embeddings, out_shardings=sharding)(key_b)
compiled = step.lower(a, b, jnp.float32(0.07)).compile()
mem = compiled.memory_analysis()
planned = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
           - mem.alias_size_in_bytes)
row = {'compiled_peak_bytes': int(planned), 'temp_bytes': int(mem.temp_size_in_bytes)}
if planned > args['max_gb'] * 2**30:
  row['ran'] = False
else:
  repeats = 3 if n <= args['repeat_below'] else 1
  if repeats > 1:
    jax.block_until_ready(compiled(a, b, jnp.float32(0.07)))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(a, b, jnp.float32(0.07)))
    times.append(time.perf_counter() - t0)
  row.update(ran=True, seconds=sorted(times)[len(times) // 2], runs=repeats,
             peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
print('ROW ' + json.dumps(row))
'''


def run_case(batch, dim, impl, block_size, devices, max_gb, timeout, repeat_below, platform):
  args = dict(batch=batch, dim=dim, impl=impl, block_size=block_size, devices=devices,
              platform=platform, max_gb=max_gb, repeat_below=repeat_below)
  env = dict(os.environ)
  env.pop('XLA_FLAGS', None)
  try:
    proc = subprocess.run([sys.executable, '-c', CASE, json.dumps(args)], capture_output=True,
                          text=True, env=env, timeout=timeout, check=False)
  except subprocess.TimeoutExpired:
    return {**args, 'ran': False, 'error': f'timed out after {timeout}s'}
  rows = [line[4:] for line in proc.stdout.splitlines() if line.startswith('ROW ')]
  if not rows:
    last = (proc.stderr.strip().splitlines() or ['no output'])[-1]
    return {**args, 'ran': False, 'error': last[:200]}
  return {**args, **json.loads(rows[0])}


def _gb(x):
  return f'{x / 2**30:.3f}' if x is not None else '-'


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--batches', default='1024,4096,16384,65536')
  parser.add_argument('--dim', type=int, default=512)
  parser.add_argument('--block_size', type=int, default=1024)
  parser.add_argument('--devices', type=int, default=8, help='for the sharded cases; 0: none')
  parser.add_argument('--sharded_batches', default='1024,4096,16384')
  parser.add_argument('--max_gb', type=float, default=20.0)
  parser.add_argument('--timeout', type=int, default=1800)
  parser.add_argument('--repeat_below', type=int, default=16384)
  parser.add_argument('--json', default='benchmarks/loss_memory.json')
  parser.add_argument('--platform', default='cpu', help="jax's platform: cpu, or cuda / tpu "
                      '(with --devices 0: one real device)')
  args = parser.parse_args()

  cases = [(int(b), impl, 1) for b in args.batches.split(',') for impl in ('dense', 'blockwise')]
  if args.devices > 1:
    cases += [(int(b), impl, args.devices) for b in args.sharded_batches.split(',')
              for impl in ('blockwise', 'ring')]
  rows = []
  print(f'clip_loss value+grad, dim {args.dim}, block {args.block_size}, float32, '
        f'{args.platform}')
  print(f'{"devices":>7} | {"batch":>6} | {"impl":>9} | {"compiled peak GB":>16} | '
        f'{"peak RSS GB":>11} | {"seconds":>8}')
  for batch, impl, devices in cases:
    row = run_case(batch, args.dim, impl, args.block_size, devices, args.max_gb, args.timeout,
                   args.repeat_below, args.platform)
    rows.append(row)
    seconds = f'{row["seconds"]:.3f}' if row.get('ran') else (
        row.get('error') or f'not run: needs > {args.max_gb:g} GB')
    print(f'{devices:>7} | {batch:>6} | {impl:>9} | {_gb(row.get("compiled_peak_bytes")):>16} | '
          f'{_gb(row.get("peak_rss_bytes")):>11} | {seconds:>8}', flush=True)
  with open(args.json, 'w') as f:
    json.dump({'machine': os.uname().nodename, 'cpus': os.cpu_count(), 'rows': rows}, f,
              indent=2)
  print(f'wrote {args.json}')


if __name__ == '__main__':
  main()
