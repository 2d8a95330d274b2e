"""Every shipped config validates (pod recipes up to their unprepared
placeholder dataset) and builds its model; the ViT-B/16 tower has the
published parameter count."""

import glob
import os

import jax
import pytest
from flax import nnx

from helpers import REPO, tiny_config
from jaxcl import config as config_lib
from jaxcl import data, methods, models, tokenizers

# finetune.py takes a workdir (FILE:ARG): tests/test_finetune.py checks it on a run.
CONFIGS = sorted(p for p in glob.glob(os.path.join(REPO, 'configs', '*.py'))
                 if not p.endswith('finetune.py'))


@pytest.mark.parametrize('path', CONFIGS, ids=os.path.basename)
def test_config_validates_and_builds(path):
  config = tiny_config(path, tiny={})
  try:
    config_lib.validate(config, num_devices=8, process_count=1)
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
  import json  # pylint: disable=g-import-not-at-top
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
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  code = ('import sys; import jaxcl.config, jaxcl.presets, jaxcl.errors, jaxcl.files; '
          'print(sorted(m for m in ("jax", "flax", "tensorflow_datasets", "grain", "optax", '
          '"orbax") if m in sys.modules))')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == '[]'
