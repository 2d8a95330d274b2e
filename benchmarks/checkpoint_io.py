"""Checkpoint save and restore of the ViT-B/16 CLIP train state: local disk
against Google Cloud Storage (a local GCS server), with orbax's background
save as `jaxcl train` uses it.

  python benchmarks/checkpoint_io.py [--saves 3] [--json benchmarks/checkpoint_io.json]

The state is configs/clip_vit_b16.py's (open_clip's ViT-B-16 towers,
149.6M parameters, AdamW's two moments: 1.8 GB in float32) on one device,
filled with random values (zeros would compress). For each target it saves
--saves checkpoints through jaxcl.trainer.checkpoints as the training loop does and
measures:
- blocked: how long save_checkpoint keeps the loop (the copy of the state
  to host memory; the write itself runs in the background);
- written: from the call until the write is complete;
- restore: restoring the newest checkpoint onto the device;
- bytes: what the checkpoint holds on storage.
The GCS target is tests/gcs_server.py's server on 127.0.0.1 (in memory, one
request at a time): it measures the GCS code path (tensorstore's HTTP
uploads, gcsfs), not a real bucket's bandwidth.

The training loop's budget: blocked time under 5% of the time between two
checkpoints, checkpoint_every_steps (2,000 in the B/16 recipe) x the step
time. The table gives the shortest step time that meets it.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import socket
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
from etils import epath

from jaxcl import files
from jaxcl.config import config_files, recipes
from jaxcl.trainer import checkpoints, synthetic

REPO = pathlib.Path(__file__).resolve().parent.parent


def _state(exp):
  """The train state with random values in every floating leaf."""
  abstract = exp.abstract_state()
  leaves, tree = jax.tree.flatten(abstract)
  keys = jax.random.split(jax.random.key(0), len(leaves))

  def fill(key, leaf):
    make = (lambda: jax.random.normal(key, leaf.shape, leaf.dtype) * 0.02
            if jnp.issubdtype(leaf.dtype, jnp.floating) else jnp.zeros(leaf.shape, leaf.dtype))
    return jax.jit(make, out_shardings=leaf.sharding)()

  return jax.tree.unflatten(tree, [fill(k, leaf) for k, leaf in zip(keys, leaves)])


def measure(exp, state, workdir: str, saves: int) -> dict:
  manager = checkpoints.checkpoint_manager(workdir, exp.config.keep_checkpoints, cleanup=True)
  blocked, written = [], []
  for i in range(1, saves + 1):
    start = time.perf_counter()
    checkpoints.save_checkpoint(manager, state.replace(step=state.step + i))
    blocked.append(time.perf_counter() - start)
    checkpoints.finish_checkpoints(manager)
    written.append(time.perf_counter() - start)
  newest = manager.latest_step()
  start = time.perf_counter()
  restored = checkpoints.restore_checkpoint(manager, exp.abstract_state(), step=newest)
  jax.block_until_ready(restored)
  restore_s = time.perf_counter() - start
  manager.close()
  assert int(restored.step) == newest
  size = sum(p.stat().length for p in files.files_under(
      epath.Path(workdir) / files.CHECKPOINT_DIR / str(newest)))
  return {'blocked_s': min(blocked), 'blocked_all_s': blocked, 'written_s': min(written),
          'written_all_s': written, 'restore_s': restore_s, 'bytes': size}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--saves', type=int, default=3)
  parser.add_argument('--json', default='benchmarks/checkpoint_io.json')
  args = parser.parse_args()

  sys.path.insert(0, str(REPO / 'tests'))
  import gcs_server  # noqa: PLC0415  (from tests/, put on sys.path above)
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  scratch = tempfile.mkdtemp(prefix='jaxcl-ckpt-io-')
  server = gcs_server.start(port, os.path.join(scratch, 'server.log'))
  os.environ.update(gcs_server.environment(port))
  try:
    config = config_files.load(str(REPO / 'configs/clip_vit_b16.py'))
    recipes.architecture(config, 'ViT-B-16')
    config.batch_size = 16
    config.text.update(tokenizer='bytes', normalize='', pad_id=-1)
    exp = synthetic.setup(config, devices=jax.devices()[:1])
    state = _state(exp)
    interval = int(config.checkpoint_every_steps)
    targets = {'local disk': os.path.join(scratch, 'run'),
               'GCS (local server)': f'gs://{gcs_server.BUCKET}/run'}
    rows = {}
    for name, workdir in targets.items():
      rows[name] = measure(exp, state, workdir, args.saves)
      print(f'{name}: {rows[name]}', file=sys.stderr, flush=True)
  finally:
    server.kill()
    server.wait()
    shutil.rmtree(scratch, ignore_errors=True)

  print(f'ViT-B/16 CLIP state, {next(iter(rows.values()))["bytes"] / 1e9:.2f} GB on storage; '
        f'{jax.devices()[0].device_kind}, {os.cpu_count()} cores; best of {args.saves} saves')
  print('| target | blocked s | written s | restore s | GB | step time for blocked < 5% '
        f'at {interval:,} steps |')
  print('|---|---|---|---|---|---|')
  for name, row in rows.items():
    shortest = row['blocked_s'] / (0.05 * interval)
    print(f"| {name} | {row['blocked_s']:.2f} | {row['written_s']:.1f} | {row['restore_s']:.1f} "
          f"| {row['bytes'] / 1e9:.2f} | ≥ {shortest * 1e3:.1f} ms |")
  with open(args.json, 'w') as f:
    json.dump({'device': jax.devices()[0].device_kind, 'cores': os.cpu_count(),
               'checkpoint_every_steps': interval, 'saves': args.saves, 'rows': rows}, f,
              indent=2)
  print(f'wrote {args.json}', file=sys.stderr)


if __name__ == '__main__':
  main()
