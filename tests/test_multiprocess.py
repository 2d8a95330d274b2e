"""Real 2-process runs (2 local processes x 4 simulated CPU devices, gloo
collectives, coordinator on 127.0.0.1): they train like 1 process with 8
devices; SIGTERM to one process stops both at one step; a killed process
stops the other in seconds; the job then resumes."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import helpers
import numpy as np

from helpers import DIGITS_CONFIG, REPO, jaxcl, tiny_overrides
from jaxcl import train

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


def _start_job(workdir, logs, extra=()):
  """Both processes of a 2 x 4-device job; their output goes to logs/p{0,1}.{out,err}."""
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4',
             JAX_PLATFORMS='cpu')
  logs.mkdir(exist_ok=True)
  procs = []
  for i in range(2):
    procs.append(subprocess.Popen(
        [sys.executable, '-m', 'jaxcl.cli', 'train', '--config', DIGITS_CONFIG, '--workdir',
         str(workdir), *tiny_overrides(), *helpers.RUN, *extra, '--heartbeat_timeout=10',
         f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2', f'--process_id={i}'],
        cwd=REPO, env=env, stdout=open(logs / f'p{i}.out', 'w'),
        stderr=open(logs / f'p{i}.err', 'w')))
  return procs


def _wait_for_checkpoint(workdir, procs, after: int):
  deadline = time.time() + 240
  ckpts = workdir / 'checkpoints'
  while time.time() < deadline and all(p.poll() is None for p in procs):
    steps = [int(p.name) for p in ckpts.iterdir() if p.name.isdigit()] if ckpts.exists() else []
    if steps and max(steps) > after:
      return max(steps)
    time.sleep(0.05)
  raise AssertionError(f'no checkpoint after step {after}: {[p.poll() for p in procs]}')


def test_sigterm_to_one_process_then_a_lost_process_then_resume(tmp_path):
  workdir = tmp_path / 'run'
  # Preemption notice on one host only: both processes stop at the same step.
  procs = _start_job(workdir, tmp_path / 'logs1')
  _wait_for_checkpoint(workdir, procs, 9)
  procs[1].send_signal(signal.SIGTERM)
  codes = [p.wait(timeout=60) for p in procs]
  out = (tmp_path / 'logs1' / 'p0.out').read_text()
  assert codes == [0, 0], (tmp_path / 'logs1' / 'p0.err').read_text()[-2000:]
  preempted = int(out.split('checkpoint of step ')[1].split()[0])
  assert max(int(p.name) for p in (workdir / 'checkpoints').iterdir()) == preempted

  # A process dies (SIGKILL): the other stops within seconds, non-zero. Who
  # notices first is a race: jaxcl (the next collective fails: exit 1 and
  # its one line) or jax's coordination service (abort, exit 134, with
  # "another task died").
  procs = _start_job(workdir, tmp_path / 'logs2')
  _wait_for_checkpoint(workdir, procs, preempted + 4)
  assert f'resuming from step {preempted}' in (tmp_path / 'logs2' / 'p0.out').read_text()
  procs[1].kill()
  killed = time.time()
  code = procs[0].wait(timeout=60)
  assert time.time() - killed < 30
  err = (tmp_path / 'logs2' / 'p0.err').read_text()
  if code == 1:
    assert err.strip().splitlines()[-1].startswith(
        'jaxcl: error: process 0: lost another process of the job')
  else:
    assert code == -signal.SIGABRT and 'another task died' in err, (code, err[-2000:])

  # Running the job again resumes from the last complete checkpoint.
  last = train.complete_step(workdir)
  procs = _start_job(workdir, tmp_path / 'logs3', [f'--config.total_steps={last + 5}'])
  assert [p.wait(timeout=240) for p in procs] == [0, 0]
  assert f'resuming from step {last}' in (tmp_path / 'logs3' / 'p0.out').read_text()
  assert json.loads((workdir / 'eval.json').read_text())['step'] == last + 5
