"""A real 2-process run (2 local processes x 4 simulated CPU devices, gloo
collectives, coordinator on 127.0.0.1) trains like 1 process with 8 devices."""

import json
import os
import socket
import subprocess
import sys

import numpy as np

from helpers import DIGITS_CONFIG, REPO, jaxcl, tiny_overrides

RUN = ['--config.total_steps=6', '--config.log_every_steps=1', '--config.checkpoint_every_steps=3',
       '--config.eval_every_steps=1000', '--config.eval.probe_steps=20']


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _losses(workdir):
  rows = [json.loads(line) for line in open(workdir / 'metrics.jsonl')]
  return {r['step']: (r['loss'], r['temperature'], r['grad_norm']) for r in rows if 'loss' in r}


def test_two_processes_train_like_one(tmp_path):
  single = tmp_path / 'one_process'
  jaxcl('train', '--config', DIGITS_CONFIG, '--workdir', str(single), *tiny_overrides(), *RUN,
        devices=8)

  workdir = tmp_path / 'two_processes'
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4',
             JAX_PLATFORMS='cpu')
  procs = [subprocess.Popen(
      [sys.executable, '-m', 'jaxcl.cli', 'train', '--config', DIGITS_CONFIG, '--workdir',
       str(workdir), *tiny_overrides(), *RUN, f'--coordinator_address=127.0.0.1:{port}',
       '--num_processes=2', f'--process_id={i}'],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  outputs = [p.communicate(timeout=300) for p in procs]
  for p, (out, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  # Process 0 reports the whole job and writes the files; process 1 stays quiet.
  assert '8 cpu device(s), 2 process(es)' in outputs[0][0]
  assert 'device(s)' not in outputs[1][0]

  one, two = _losses(single), _losses(workdir)
  assert sorted(one) == sorted(two) == list(range(1, 7))
  np.testing.assert_allclose([two[s] for s in sorted(two)], [one[s] for s in sorted(one)],
                             rtol=2e-5)
  assert (workdir / 'eval.json').exists()
  assert sorted(p.name for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit()) == [
      '3', '6']
