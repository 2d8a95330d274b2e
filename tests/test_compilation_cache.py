"""The persistent compilation cache: where each setting puts it, and a second
start of a run loading its step from it instead of compiling it again."""

import json
import os

import jax
import pytest

from helpers import DIGITS_CONFIG, jaxcl, tiny_overrides
from jaxcl import errors, files
from jaxcl.trainer import compilation_cache


def test_where_each_setting_puts_the_cache(monkeypatch, tmp_path):
  monkeypatch.delenv(compilation_cache.JAX_ENV, raising=False)
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
  assert compilation_cache.resolve('none', 'runs/a') is None
  assert compilation_cache.resolve('/data/xla', 'runs/a') == '/data/xla'
  assert compilation_cache.resolve('', 'runs/a') == str(tmp_path / 'xdg' / 'jaxcl' / 'compilation')
  # On a pod the VMs come and go; the workdir's bucket stays (never the workdir itself:
  # a run refused or killed in its first compile must leave nothing there).
  assert compilation_cache.resolve('', 'gs://bucket/runs/a') == (
      'gs://bucket/jaxcl_compilation_cache')
  monkeypatch.setenv(compilation_cache.JAX_ENV, '/env/cache')
  assert compilation_cache.resolve('', 'gs://bucket/runs/a') == '/env/cache'
  assert compilation_cache.resolve('/data/xla', 'runs/a') == '/data/xla'  # the config wins


def test_a_folder_that_cannot_be_made(tmp_path):
  """Named by the config: refused before anything runs. Saved in a workdir
  read on another machine (eval, export): no cache, and the command goes on."""
  blocker = tmp_path / 'a_file'
  blocker.write_text('')
  with pytest.raises(errors.ConfigError, match='a_file is a file, not a folder'):
    compilation_cache.enable(str(blocker / 'cache'), None)
  before = compilation_cache.folder()
  try:
    assert compilation_cache.enable(str(blocker / 'cache'), None, strict=False) is None
    assert compilation_cache.folder() is None
  finally:  # this test process's own cache goes on
    jax.config.update('jax_compilation_cache_dir', before)
  assert sorted(p.name for p in tmp_path.iterdir()) == ['a_file']  # nothing written


@pytest.mark.slow  # two `jaxcl train` processes: the second start is what users get
def test_a_second_start_loads_its_step_from_the_cache(tmp_path):
  """A second process training the same config (a run restarted after a
  preemption compiles the same program) compiles nothing the first
  compiled: its log and compiled_step.json say the step came from the cache,
  in less time than the first compile."""
  cache = tmp_path / 'cache'
  args = ['--config', DIGITS_CONFIG, *tiny_overrides(), '--config.total_steps=2',
          '--config.eval_every_steps=1000', '--config.eval.probe_steps=5',
          f'--config.compilation_cache_dir={cache}']
  first = jaxcl('train', '--workdir', str(tmp_path / 'first'), *args)
  record = json.loads((tmp_path / 'first' / files.COMPILED_STEP_FILE).read_text())
  assert f'(compiled; cached in {cache})' in first.stdout, first.stdout
  assert not record['from_compilation_cache']
  assert os.listdir(cache)
  second = jaxcl('train', '--workdir', str(tmp_path / 'second'), *args)
  again = json.loads((tmp_path / 'second' / files.COMPILED_STEP_FILE).read_text())
  assert f'(from the compilation cache in {cache})' in second.stdout, second.stdout
  assert again['from_compilation_cache']
  assert again['compile_seconds'] < record['compile_seconds']
