"""Shared by the tests: a tiny version of the digits config and a CLI runner."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS_CONFIG = os.path.join(REPO, 'configs', 'simclr_digits.py')

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


def tiny_overrides(**extra):
  values = dict(TINY, **{k: str(v) for k, v in extra.items()})
  return [f'--config.{k}={v}' for k, v in values.items()]


def tiny_config(**extra):
  """The same tiny config as a ConfigDict, for in-process tests."""
  import ast  # pylint: disable=g-import-not-at-top
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location('simclr_digits', DIGITS_CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  for key, value in dict(TINY, **{k: str(v) for k, v in extra.items()}).items():
    *path, last = key.split('.')
    node = config
    for part in path:
      node = node[part]
    try:
      node[last] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      node[last] = value
  return config


def jaxcl(*args, devices=1, check=True, **kwargs):
  """Runs the `jaxcl` CLI in a fresh process with `devices` CPU devices."""
  env = dict(os.environ)
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  env['JAX_PLATFORMS'] = 'cpu'
  proc = subprocess.run([sys.executable, '-m', 'jaxcl.cli', *args], capture_output=True,
                        text=True, env=env, cwd=REPO, **kwargs)
  if check and proc.returncode != 0:
    raise AssertionError(f'jaxcl {" ".join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}')
  return proc
