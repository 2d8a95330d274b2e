"""Shared by the tests: tiny versions of the digits (SimCLR) and shapes (CLIP)
configs, and a CLI runner."""

import os
import subprocess
import sys

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
  import ast  # pylint: disable=g-import-not-at-top
  import importlib.util  # pylint: disable=g-import-not-at-top
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
