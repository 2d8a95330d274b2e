"""Every shipped config validates (pod recipes up to their unprepared
placeholder dataset) and builds its model; the ViT-B/16 tower has the
published parameter count."""

import glob
import json
import keyword
import os
import subprocess
import sys

import jax
import ml_collections
import pytest
from flax import nnx

from helpers import CLIP_CONFIG, REPO, cli_in_forks, tiny_config
from jaxcl import config as config_lib, data, methods, models
from jaxcl.config import config_files
from jaxcl.text import tokenizers
from jaxcl.trainer import validation

# finetune.py takes a workdir (FILE:ARG): tests/test_finetune.py checks it on a run.
CONFIGS = sorted(p for p in glob.glob(os.path.join(REPO, 'configs', '*.py'))
                 if not p.endswith('finetune.py'))


@pytest.mark.parametrize('path', CONFIGS, ids=os.path.basename)
def test_config_validates_and_builds(path):
  config = tiny_config(path, tiny={})
  try:
    validation.validate(config, num_devices=8, process_count=1)
  except config_lib.ConfigError as e:  # pod recipes name datasets the user prepares
    assert 'is not prepared' in str(e) and config.dataset.name not in data.EMBEDDED, e
  method = methods.get(config.method)
  tokenizer = tokenizers.build_tokenizer(config.text) if method.text_tower else None
  model = nnx.eval_shape(lambda: method.build_model(config, 3, nnx.Rngs(0), tokenizer))
  params = nnx.state(model, nnx.Param)
  assert sum(x.size for x in jax.tree.leaves(params)) > 0
  if config.method == 'siglip':
    assert float(config.temperature.bias_init) == -10.0 and config.temperature.init == 0.1
  if config.method == 'clip':
    assert config.temperature.init == 0.07 and 1 / config.temperature.min == pytest.approx(100)


def test_vit_b16_has_the_published_size():
  config = tiny_config(os.path.join(REPO, 'configs', 'clip_vit_b16.py'), tiny={})
  tower = nnx.eval_shape(lambda: models.build_image_encoder(config.model, 3, 224, nnx.Rngs(0)))
  count = sum(x.size for x in jax.tree.leaves(nnx.state(tower, nnx.Param)))
  # Patch embedding 16*16*3*768 + 768, class token and 197 positions of 768,
  # 12 blocks of (2 LayerNorms, qkv, output, 2 MLP layers), final LayerNorm.
  block = 2 * 2 * 768 + (768 * 2304 + 2304) + (768 * 768 + 768) + (768 * 3072 + 3072) + (
      3072 * 768 + 768)
  assert count == (16 * 16 * 3 * 768 + 768) + 768 + 197 * 768 + 12 * block + 2 * 768
  assert count == 85_798_656


def test_workdirs_saved_before_new_keys_still_load(tmp_path):
  """A run saved by an older jaxcl (no `method`, `text`, `model.vit` keys)
  loads with the defaults and resumes under today's config."""
  config = config_lib.base_config()
  saved = json.loads(config.to_json_best_effort())
  for key in ('method', 'text'):
    del saved[key]
  del saved['model']['vit']
  (tmp_path / config_lib.CONFIG_FILE).write_text(json.dumps(saved))
  loaded = config_lib.load_saved(tmp_path)
  assert loaded.method == 'simclr' and loaded.model.vit.pool == 'gap'
  config_lib.check_resumable(config, tmp_path)  # no error
  config.method = 'clip'
  with pytest.raises(config_lib.ConfigError, match='method'):
    config_lib.check_resumable(config, tmp_path)


def test_config_files_load_without_the_runtime():
  """`from jaxcl.config import base_config` (what config files do) loads no
  jax, flax, TFDS or grain: the config layer sits below them."""
  code = ('import sys; import jaxcl.config, jaxcl.presets, jaxcl.errors, jaxcl.files; '
          'print(sorted(m for m in ("jax", "flax", "tensorflow_datasets", "grain", "optax", '
          '"orbax") if m in sys.modules))')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == '[]'


# ------------------------------------------------- every key from the command line ---
# Each key of each shipped config set with --config.KEY=VALUE, as a user types
# it, through `jaxcl train`'s own parsing (config_files' checks, then
# ml_collections' config_flags), must arrive in the parsed config. The kinds of
# key: strings (empty ones too), integers, floats, booleans, tuples (empty, of
# numbers, of strings; finetune.py's, read back from a config.json, are lists),
# and None placeholders (dataset.data_dir: set to a path, or unset again with
# an empty value). Groups of keys (ConfigDicts) are set key by key. Booleans are
# written both as --config.KEY=True|False and as --config.KEY / --noconfig.KEY.


def _leaves(node, prefix=''):
  for key, value in node.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from _leaves(value, f'{prefix}{key}.')
    else:
      yield f'{prefix}{key}', value


def _typed(value) -> str:
  """VALUE as a user writes it after --config.KEY=."""
  if value is None or isinstance(value, str):
    return value or ''
  return repr(tuple(value)) if isinstance(value, (tuple, list)) else repr(value)


def _flag(key: str, value, bare: bool) -> str:
  """--config.KEY=VALUE; bare: a boolean as --config.KEY or --noconfig.KEY."""
  if bare and isinstance(value, bool):
    return f'--config.{key}' if value else f'--noconfig.{key}'
  return f'--config.{key}={_typed(value)}'


def _other(value):
  """A different value of the same kind: the flag must change the config."""
  if value is None:
    return '/data/tensorflow_datasets'
  if isinstance(value, bool):
    return not value
  if isinstance(value, (int, float)):
    return value + (1 if isinstance(value, int) else 0.5)
  if isinstance(value, str):
    return value + '_x'
  return tuple(value) + tuple(value[:1]) if value else ('x',)


def _as_saved(value):
  return list(value) if isinstance(value, (tuple, list)) else value


@pytest.fixture(scope='module')
def shipped_specs(tmp_path_factory):
  """Every configs/*.py as `jaxcl train --config` takes it (finetune.py with a workdir)."""
  workdir = tmp_path_factory.mktemp('imported')
  config_lib.save(config_files.load(CLIP_CONFIG), workdir)  # what finetune.py reads
  paths = sorted(glob.glob(os.path.join(REPO, 'configs', '*.py')))
  return [p + (f':{workdir}' if p.endswith('finetune.py') else '') for p in paths]


@pytest.mark.slow  # too long for the quick loop (conftest.py: QUICK_TEST_S)
def test_every_key_of_every_shipped_config_is_settable_from_the_command_line(
    shipped_specs, tmp_path):
  cases, wanted = [], []
  for spec in shipped_specs:
    keys = dict(_leaves(config_files.load(spec)))
    assert not [k for k in keys if any(keyword.iskeyword(p) for p in k.split('.'))], (
        f'{spec}: a key named by a Python keyword, which config_flags cannot parse')
    for values, bare in ((keys, False), ({k: _other(v) for k, v in keys.items()}, True)):
      cases.append(['train', '--config', spec, '--workdir', str(tmp_path / 'never'),
                    *(_flag(k, v, bare) for k, v in values.items())])
      wanted.append((spec, values))
  for (spec, values), result in zip(wanted, cli_in_forks(cases, parse_only=True)):
    assert result['code'] == 0, (spec, result['stderr'])
    got = result['config']
    wrong = {k: (v, got.get(k)) for k, v in values.items() if got.get(k) != _as_saved(v)}
    assert not wrong, (spec, wrong)
  assert not (tmp_path / 'never').exists()


def test_workdirs_saved_with_init_from_still_load_and_resume(tmp_path):
  """init.source was init.from until 2026-12-07: a config.json written
  before reads as init.source, and resumes under a config naming it so."""
  config = config_lib.base_config()
  config.init.update(source=str(tmp_path / 'pretrained'), load=('image',))
  saved = json.loads(config.to_json_best_effort())
  saved['init'] = {'from': saved['init'].pop('source'), 'load': saved['init']['load']}
  (tmp_path / config_lib.CONFIG_FILE).write_text(json.dumps(saved))
  loaded = config_lib.load_saved(tmp_path)
  assert loaded.init.source == str(tmp_path / 'pretrained') and 'from' not in loaded.init
  config_lib.check_resumable(config, tmp_path)  # no error
  config_lib.save(loaded, tmp_path / 'again')  # and it is saved under the new name
  assert json.loads((tmp_path / 'again' / config_lib.CONFIG_FILE).read_text())['init'] == {
      'source': str(tmp_path / 'pretrained'), 'load': ['image']}


def test_config_files_setting_init_from_still_work(tmp_path):
  """A config file written for the old name (any of the ways one sets it)
  loads with init.source set."""
  for i, line in enumerate(["config.init.update({'from': '/runs/a', 'load': ('image',)})",
                            "config.init['from'] = '/runs/a'",
                            "config.init = ml_collections.ConfigDict({'from': '/runs/a', "
                            "'load': ('image',)})"]):
    path = tmp_path / f'old{i}.py'
    path.write_text('import ml_collections\nfrom jaxcl.config import base_config\n\n'
                    f'def get_config():\n  config = base_config()\n  {line}\n  return config\n')
    config = config_files.load(str(path))
    assert config.init.source == '/runs/a' and 'from' not in config.init, line
  # The new name, set too (--config.init.source=DIR over such a file), wins.
  config = config_files.load(str(path))
  with config.unlocked():
    config.init['from'], config.init.source = '/runs/a', '/runs/b'
  config_files.use_new_names(config)
  assert config.init.source == '/runs/b' and 'from' not in config.init
