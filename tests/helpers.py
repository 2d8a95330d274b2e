"""Shared by the tests: tiny versions of the digits (SimCLR) and shapes (CLIP)
configs, and a CLI runner."""

import ast
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np

import forks
from jaxcl import files
from jaxcl.workdir import metrics_log

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS_CONFIG = os.path.join(REPO, 'configs', 'simclr_digits.py')
CLIP_CONFIG = os.path.join(REPO, 'configs', 'clip_shapes.py')
SIGLIP_CONFIG = os.path.join(REPO, 'configs', 'siglip_shapes.py')

# A small encoder and few probe steps: each compiles in seconds on 2 cores.
TINY = {
    'model.stage_sizes': '(1,1)',
    'model.width': '8',
    'model.head_hidden': '32',
    'model.head_out': '16',
    'augment.image_size': '8',
    'batch_size': '32',
    'eval.probe_steps': '50',
    'eval.batch_size': '512',
}


# Two towers of one small block each.
TINY_TWO_TOWER = {
    'model.vit.patch_size': '8',
    'model.vit.width': '32',
    'model.vit.depth': '1',
    'model.vit.heads': '2',
    'model.vit.mlp_dim': '64',
    'model.embed_dim': '16',
    'text.max_length': '48',
    'text.width': '32',
    'text.depth': '1',
    'text.heads': '2',
    'text.mlp_dim': '64',
    'batch_size': '32',
    'eval.batch_size': '256',
}


def tiny_overrides(tiny=None, **extra):
  values = dict(TINY if tiny is None else tiny, **{k: str(v) for k, v in extra.items()})
  return [f'--config.{k}={v}' for k, v in values.items()]


def tiny_config(config_file=DIGITS_CONFIG, tiny=None, **extra):
  """A config file with the tiny overrides as a ConfigDict, for in-process tests."""
  spec = importlib.util.spec_from_file_location('config_module', config_file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  tiny = TINY if tiny is None else tiny
  for key, value in dict(tiny, **{k: str(v) for k, v in extra.items()}).items():
    *path, last = key.split('.')
    node = config
    for part in path:
      node = node[part]
    try:
      node[last] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      node[last] = value
  return config


# Added to the test process's own XLA_FLAGS only (conftest.py says why).
IN_PROCESS_XLA_FLAGS = '--xla_backend_optimization_level=0'


def xla_flags(devices: int) -> str:
  """XLA_FLAGS for a process of the tests with `devices` simulated CPU devices."""
  return f'--xla_force_host_platform_device_count={devices}'


# The most a jaxcl command of the tests may take (the longest take ~30 s on 2
# cores): a hang becomes a failure, not a suite that never ends.
JAXCL_TIMEOUT_S = 900


def jaxcl(*args, devices=1, check=True, timeout=JAXCL_TIMEOUT_S):
  """`jaxcl ARGS` with `devices` CPU devices, as a new process runs it (in a
  fork of one that imported jaxcl: tests/forks.py), as a CompletedProcess;
  subprocess.TimeoutExpired past `timeout` seconds."""
  result = forks.run(args, _cli_env(devices), REPO, timeout=timeout)
  if result['timed_out']:
    raise subprocess.TimeoutExpired(['jaxcl', *args], timeout, result['stdout'], result['stderr'])
  proc = _completed(args, result)
  if check and proc.returncode != 0:
    raise AssertionError(f'jaxcl {" ".join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}')
  return proc


def _completed(args, result: dict) -> subprocess.CompletedProcess:
  return subprocess.CompletedProcess(['jaxcl', *args], result['code'], result['stdout'],
                                     result['stderr'])


def _cli_env(devices: int) -> dict:
  return dict(os.environ, XLA_FLAGS=xla_flags(devices), JAX_PLATFORMS='cpu')


def free_port() -> int:
  """A TCP port free on 127.0.0.1 now, for a multi-process job's coordinator."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def start_job(args, *, devices: int, processes: int = 2, output=None, env=None) -> list:
  """`jaxcl ARGS` as a job of local processes with `devices` CPU devices each,
  joined through a coordinator on a free 127.0.0.1 port; returns the Popens.
  output(i): process i's Popen output keywords (default: pipes, as text)."""
  port = free_port()
  env = dict(env or os.environ, XLA_FLAGS=xla_flags(devices),
             JAX_PLATFORMS='cpu')
  output = output or (lambda i: dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  return [subprocess.Popen(
      [sys.executable, '-m', 'jaxcl.cli', *args, f'--coordinator_address=127.0.0.1:{port}',
       f'--num_processes={processes}', f'--process_id={i}'], cwd=REPO, env=env, **output(i))
      for i in range(processes)]


# The reference run of the kill/resume tests (RUN_STEPS tiny steps on 2
# devices, conftest's `uninterrupted` fixture) and its interrupted twins.
RUN_STEPS = 80
RUN = [f'--config.total_steps={RUN_STEPS}', '--config.checkpoint_every_steps=5',
       '--config.log_every_steps=5', '--config.eval_every_steps=1000']


def final_params(workdir):
  """(step, params) of the newest checkpoint in `workdir`."""
  import jax  # noqa: PLC0415  (conftest imports helpers before it sets XLA_FLAGS)

  from jaxcl.trainer import trained  # noqa: PLC0415  (as jax)
  _, state = trained.load_trained(str(workdir))
  return int(state.step), jax.device_get(state.params)


# A bound for how long the tiny RUN takes to reach a checkpoint (compilation
# and tens of steps, ~10 s on 2 cores): generous for a machine several times
# slower, still an error, not a hang, when the run stalls.
CHECKPOINT_WAIT_S = 300


def newest_checkpoint(workdir) -> int | None:
  """The newest complete checkpoint's step (on object stores, where orbax
  writes in place, one with its commit marker)."""
  ckpts = workdir / 'checkpoints'
  steps = [int(p.name) for p in ckpts.iterdir() if p.name.isdigit() and (
      not files.is_object_store(p) or (p / files.CHECKPOINT_DONE).exists())
           ] if ckpts.exists() else []
  return max(steps, default=None)


def logged_steps(workdir) -> list[int]:
  """The steps of the training rows in the workdir's metrics log so far."""
  rows = []
  for line in metrics_log.read_lines(workdir):
    try:
      rows.append(json.loads(line))
    except ValueError:  # a line being written
      pass
  return [r['step'] for r in rows if 'loss' in r]


def run_until_checkpoint(workdir, min_step: int, extra=(), *, config_file=DIGITS_CONFIG,
                         overrides=None, devices=2, **popen_kwargs):
  """Starts the RUN training (2 devices; or `config_file` with `overrides`
  in place of the tiny ones and RUN) in `workdir` and returns the process,
  stopped (SIGSTOP), as soon as it has a checkpoint at min_step or later.

  Stopped, so that it cannot run on to its end while the test looks at it and
  decides what to do: send SIGCONT (after SIGTERM, say) or SIGKILL. How far it
  got is logged_steps(workdir)[-1] (to at most log_every_steps - 1 steps
  more). Fails if the run ends first or takes longer than CHECKPOINT_WAIT_S."""
  env = dict(os.environ, XLA_FLAGS=xla_flags(devices))
  overrides = [*tiny_overrides(), *RUN] if overrides is None else overrides
  cmd = [sys.executable, '-m', 'jaxcl.cli', 'train', '--config', config_file, '--workdir',
         str(workdir), *overrides, *extra]
  proc = subprocess.Popen(cmd, env=env, cwd=REPO, **popen_kwargs)
  deadline = time.monotonic() + CHECKPOINT_WAIT_S
  while proc.poll() is None:
    newest = newest_checkpoint(workdir)
    if newest is not None and newest >= min_step:
      proc.send_signal(signal.SIGSTOP)
      if proc.poll() is None:
        return proc
      break
    if time.monotonic() > deadline:
      proc.kill()
      proc.wait()
      raise AssertionError(f'no checkpoint of step {min_step} or later after '
                           f'{CHECKPOINT_WAIT_S} s (newest: {newest_checkpoint(workdir)})')
    time.sleep(0.05)
  raise AssertionError(f'the run exited ({proc.returncode}) before a checkpoint of step '
                       f'{min_step}: newest {newest_checkpoint(workdir)}')


def upload_tree(local, remote) -> None:
  """Copies local folder `local` to `remote` (an epath, gs:// say), file by file."""
  for path in local.rglob('*'):
    if path.is_file():
      (remote / str(path.relative_to(local))).write_bytes(path.read_bytes())


def preempt(proc, timeout_s: float, err_path) -> None:
  """SIGTERM to a run stopped by run_until_checkpoint, then SIGCONT: asserts
  it exits 0 within timeout_s (its stderr, in err_path, says why not)."""
  try:
    proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    proc.send_signal(signal.SIGCONT)
    assert proc.wait(timeout=timeout_s) == 0, open(err_path).read()[-3000:]
    assert time.monotonic() - sent < timeout_s
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()


# ------------------------------------------------------------ float results ---
F32_EPS = 1.2e-7  # float32's machine epsilon (np.finfo(np.float32).eps = 1.19e-7)


def two_tower_batch(exp, n, seed=0):
  """n random uint8 images of the dataset's shape (a NaFlex run's: patches on
  random grids within its largest budget) and tokenized random captions (and
  a teacher's ids of them, with its own tokenizer)."""
  rng = np.random.default_rng(seed)
  if exp.patching is None:
    images = rng.integers(0, 256, size=(n, *exp.info.image_shape), dtype=np.uint8)
  else:
    from jaxcl.data import naflex  # noqa: PLC0415  (conftest imports helpers before XLA_FLAGS)
    budget, patch = exp.patching.eval_budget, exp.patching.patch_size
    grids = np.array([naflex.grid_for_budget(*rng.integers(1, 64, 2), patch, budget)
                      for _ in range(n)], np.int32)
    patches = rng.integers(0, 256, size=(n, budget, patch * patch * 3), dtype=np.uint8)
    patches[np.arange(budget)[None] >= np.prod(grids, axis=1)[:, None]] = 0
    images = {'patches': patches, 'grid': grids}
  words = ['red', 'blue', 'circle', 'square', 'small', 'top', 'left', 'a', 'the']
  captions = [' '.join(rng.choice(words, size=rng.integers(1, 8))) for _ in range(n)]
  from jaxcl.data import pipeline  # noqa: PLC0415  (as naflex)
  return {'image': images, **pipeline.tokenized(exp.caption_fields(), captions)}


def qkv_biases(tree):
  """{path: each attention's qkv bias}: columns [q | k | v] (models.Attention)."""
  import jax  # noqa: PLC0415  (conftest imports helpers before it sets XLA_FLAGS)
  return {jax.tree_util.keystr(path): np.asarray(x)
          for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
          if "['qkv']['bias']" in jax.tree_util.keystr(path)}


def without_key_bias(params):
  """params with the key biases set to 0. A key bias b adds q·b to all of a
  query's logits alike, which softmax ignores: its gradient is 0 in exact
  arithmetic, so float32 rounding noise, and Adam's m/sqrt(v) turns that noise
  into steps of ±learning rate that differ from one mesh to another."""
  import jax  # noqa: PLC0415  (conftest imports helpers before it sets XLA_FLAGS)

  def zero(path, x):
    if "['qkv']['bias']" not in jax.tree_util.keystr(path):
      return x
    x, width = np.array(x), x.shape[-1] // 3
    x[width:2 * width] = 0
    return x
  return jax.tree_util.tree_map_with_path(zero, params)


def assert_close(actual, desired, *, rtol: float, what: str = ''):
  """Asserts that float results computed in float32 by different reduction
  orders (sharded vs one device, ring or blockwise vs dense, float32 vs a
  float64 reference) agree to within what that rounding allows.

  The rule, per leaf of `desired` (a scalar, an array, or a pytree of them,
  e.g. gradients or a metrics dict; `actual` must have the same structure):

      |actual - desired| <= rtol * scale,   scale = max |desired| over the leaf

  - rtol fits float32 and the reduction: a sum of n float32 terms reordered
    moves by a few F32_EPS * sqrt(n) of its scale; a step through a network
    (forward, backward, optimizer) compounds that. Each call states its rtol
    and why; keep it as tight as the computation honestly allows.
  - the absolute floor rtol * scale is what a reordered sum's rounding is
    relative to: the size of the leaf, not of each element, so a near-zero
    element of a large array (a gradient entry that nearly cancels) is held
    to the leaf's scale, and a scalar (scale = |desired|) to a relative
    tolerance whatever its magnitude: never an absolute-only tolerance.
  - integer and boolean leaves must be equal; NaN never matches.
  """
  import jax  # noqa: PLC0415  (conftest imports helpers before it sets XLA_FLAGS)
  paths_d, tree_d = jax.tree_util.tree_flatten_with_path(desired)
  leaves_a, tree_a = jax.tree_util.tree_flatten(actual)
  assert tree_a == tree_d, f'{what}: structures differ: {tree_a} vs {tree_d}'
  for (path, d), a in zip(paths_d, leaves_a):
    name = what + jax.tree_util.keystr(path)
    a, d = np.asarray(jax.device_get(a)), np.asarray(jax.device_get(d))
    if not (np.issubdtype(d.dtype, np.inexact) or np.issubdtype(a.dtype, np.inexact)):
      np.testing.assert_array_equal(a, d, err_msg=name)
      continue
    assert a.shape == d.shape, f'{name}: shapes differ: {a.shape} vs {d.shape}'
    d64, a64 = d.astype(np.float64), a.astype(np.float64)
    scale = float(np.max(np.abs(d64))) if d64.size else 0.0
    error = float(np.max(np.abs(a64 - d64))) if d64.size else 0.0  # NaN fails below
    assert error <= rtol * scale, (
        f'{name}: max |actual - desired| = {error:.3g} > rtol {rtol:g} x scale {scale:.6g}')


def copy_without_dataset(workdir, destination):
  """A copy of the run in `workdir` whose saved config points at a dataset
  folder that does not exist: what export sees after the data was deleted."""
  shutil.copytree(workdir, destination)
  config_file = os.path.join(destination, 'config.json')
  with open(config_file) as f:
    config = json.load(f)
  config['dataset']['data_dir'] = os.path.join(str(destination), 'deleted-tfds')
  with open(config_file, 'w') as f:
    json.dump(config, f)
  return destination


def cli_in_forks(cases, devices: int = 1, parse_only: bool = False) -> list:
  """[{'code': exit code, 'stderr', 'stdout': text, 'config'}] of `jaxcl ARGV` for each
  ARGV in `cases` (tests/forks.py), each killed if it runs past 60 s (an input
  that was not refused started training). parse_only: each parses ARGV as
  `jaxcl` does and stops; 'config' is the config it read, flattened
  ({dotted key: value}, as config.json holds it), or None."""
  return [forks.run(argv, _cli_env(devices), REPO, timeout=60, parse_only=parse_only)
          for argv in cases]


def jaxcl_each(argvs, devices: int = 1) -> list:
  """`jaxcl ARGV` for each ARGV in turn, as helpers.jaxcl(..., check=False)
  returns it (a CompletedProcess), each killed past 60 s."""
  return [_completed(argv, r) for argv, r in zip(argvs, cli_in_forks(argvs, devices=devices))]
