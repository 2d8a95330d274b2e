"""Experiment configs, the light layer: importing it loads no jax, flax,
TFDS or grain, so config files and `jaxcl --help` start at once.

The modules, each importing only those above it:

- config_files: config files and their command-line overrides.
- defaults: every key with its default (`base_config`).
- saved: the config a run saves and reads back, and which changes a
  resumed run may make.
- recipes: pieces the shipped config files share (imported by them, not here).

Checking a config against the data, the methods and the devices is the
trainer's (jaxcl.trainer.validation). This package re-exports defaults'
and saved's public names: ``config.base_config`` etc.
"""

from jaxcl.config.defaults import CONFIG_FILE, ConfigError, base_config
from jaxcl.config.saved import (
  KEYS_ADDED_LATER,
  RESUMABLE_CHANGES,
  check_resumable,
  flat_config,
  load_saved,
  read_saved,
  save,
)

__all__ = [
    'CONFIG_FILE', 'KEYS_ADDED_LATER', 'RESUMABLE_CHANGES', 'ConfigError', 'base_config',
    'check_resumable', 'flat_config', 'load_saved', 'read_saved', 'save',
]
