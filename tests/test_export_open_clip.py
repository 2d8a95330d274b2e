"""`jaxcl export --format open_clip`: a workdir as an open_clip directory.

Round trips through open_clip itself (float32, CPU; nothing downloaded):
a random open_clip model (tests/test_import.py's) is imported into a jaxcl
workdir and exported back; open_clip loads the export strictly and gives
jaxcl's embeddings within 1e-4, and the exported tensors are the source
file's bit for bit. A CLIP trained-from-scratch shape (jaxcl init, other
switches) goes the same way; what open_clip cannot build is refused in one
line before anything is written.
"""

import functools
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

import helpers
import test_import as ti
from jaxcl import data, errors, methods
from jaxcl.hub import importer, open_clip_export, open_clip_plan
from jaxcl.models import param_groups
from jaxcl.text import tokenizers
from jaxcl.trainer import experiment, validation
from jaxcl.trainer.trained import load_trained
from jaxcl.workdir import run_files

TOLERANCE = 1e-4
ASCII_TEXTS = ti.TEXTS[:4]  # open_clip's HFTokenizer also runs ftfy, which rewrites the 5th


@pytest.fixture(scope='module')
def sources(tmp_path_factory):
  """{name: (open_clip source directory, its torch model)}."""
  root = tmp_path_factory.mktemp('oc_sources')
  return {'clip': (root / 'clip', ti.make_open_clip(root / 'clip')),
          'siglip': (root / 'siglip', ti.make_open_clip_siglip(root / 'siglip')),
          'siglip2': (root / 'siglip2', ti.make_open_clip_siglip(root / 'siglip2', siglip2=True))}


@pytest.fixture(scope='module')
def workdirs(sources, tmp_path_factory):
  root = tmp_path_factory.mktemp('oc_workdirs')
  return {name: importer.import_checkpoint(directory, root / name)['workdir']
          for name, (directory, _) in sources.items()}


def _embed(exp, state, images, texts):
  """(image, text embeddings, token ids, params {path: array}) of jaxcl's model."""

  @jax.jit  # one compilation, not one per operation
  def embed(params, images, ids):
    model = nnx.merge(exp.eval_graphdef, params, state.batch_stats)
    return model.embed_image(images), model.embed_text(ids)

  ids = exp.tokenizer.encode(texts)
  image, text = embed(state.params, jnp.asarray(images, jnp.float32), jnp.asarray(ids))
  params = {param_groups.path_name(k): np.asarray(v)
            for k, v in jax.tree_util.tree_flatten_with_path(jax.device_get(state.params))[0]}
  return np.asarray(image), np.asarray(text), ids, params


def _load(workdir):
  """(Experiment, state) of the workdir's newest checkpoint."""
  return load_trained(workdir, open_data=False)


_torch_embeddings = functools.partial(ti._reference_embeddings, 'open_clip')


def _images(size=ti.IMAGE_SIZE):
  return np.random.default_rng(0).normal(size=(3, size, size, 3))


def _load_strict(model, directory):
  from safetensors.torch import load_file
  model.load_state_dict(load_file(str(directory / 'open_clip_model.safetensors')), strict=True)
  return model.eval()


def _assert_bitwise_equal(exported, source):
  got = safetensors.numpy.load_file(str(exported / 'open_clip_model.safetensors'))
  want = safetensors.numpy.load_file(str(source / 'open_clip_model.safetensors'))
  assert sorted(got) == sorted(want)
  for name, value in want.items():
    assert got[name].dtype == np.float32 and got[name].shape == value.shape, name
    np.testing.assert_array_equal(got[name].view(np.uint32), value.view(np.uint32), err_msg=name)


def _assert_reimports_equal(exported, exp, state):
  """`jaxcl import` of the export is the model exported: the same tokenizer
  (its spec, file hashes included), the same parameters exactly, and so the
  same token ids and embeddings of the same images and texts."""
  _, tokenizer, back_exp, back_state = importer.load_source(exported)
  assert tokenizer.spec() == exp.tokenizer.spec()
  images = _images(exp.config.augment.image_size)
  *embeddings, ids, params = _embed(exp, state, images, ti.TEXTS)
  *back_embeddings, back_ids, back = _embed(back_exp, back_state, images, ti.TEXTS)
  if 'temperature/log_tau' not in params:  # τ fixed: imported as learnable from its value
    back.pop('temperature/log_tau')
  assert sorted(back) == sorted(params)
  for name, value in params.items():
    np.testing.assert_array_equal(back[name], value, err_msg=name)
  np.testing.assert_array_equal(back_ids, ids)
  for got, want in zip(back_embeddings, embeddings):
    np.testing.assert_array_equal(got, want)


@pytest.fixture(scope='module')
def clip_export(workdirs, tmp_path_factory):
  out = tmp_path_factory.mktemp('oc_exports') / 'clip'
  return out, open_clip_export.export_open_clip(workdirs['clip'], out)


@pytest.mark.slow  # too long for the quick loop (conftest.py: QUICK_TEST_S)
def test_clip_round_trip(sources, workdirs, clip_export):
  import open_clip
  source, reference = sources['clip']
  out, summary = clip_export
  assert (summary['model'], summary['timm_model_name'], summary['notes']) == ('CLIP', None, [])
  assert sorted(p.name for p in out.iterdir()) == [
      'bpe_simple_vocab_16e6.txt.gz', 'open_clip_config.json', 'open_clip_model.safetensors']
  cfg = json.loads((out / 'open_clip_config.json').read_text())
  source_cfg = json.loads((source / 'open_clip_config.json').read_text())['model_cfg']
  assert cfg['model_cfg']['vision_cfg'] == {**source_cfg['vision_cfg'], 'mlp_ratio': 4.0}
  assert cfg['preprocess_cfg'] == {'mean': [0.4, 0.5, 0.6], 'std': [0.2, 0.3, 0.25],
                                   'size': ti.IMAGE_SIZE, 'interpolation': 'bicubic',
                                   'resize_mode': 'squash'}
  _assert_bitwise_equal(out, source)
  images = _images()
  exp, state = _load(workdirs['clip'])
  image, text, ids, _ = _embed(exp, state, images, ti.TEXTS)
  np.testing.assert_array_equal(open_clip.get_tokenizer(f'local-dir:{out}')(ti.TEXTS), ids)
  built = _load_strict(open_clip.CLIP(**cfg['model_cfg']), out)
  created = open_clip.create_model(f'local-dir:{out}').eval()  # loads the weights itself
  want = _torch_embeddings(reference, images, ids)
  for model in (built, created):
    got = _torch_embeddings(model, images, ids)
    for g, w, jax_value in zip(got, want, (image, text)):
      np.testing.assert_array_equal(g, w)  # the source's own weights: the same computation
      np.testing.assert_allclose(g, jax_value, atol=TOLERANCE, rtol=0)
  _assert_reimports_equal(out, exp, state)


def _siglip_model(model_cfg, directory):
  """The exported SigLIP as tests/test_import.py builds its source: open_clip's
  CustomTextCLIP with a one-block timm trunk at 32 px, the export's weights
  loaded strictly. No timm name has those sizes (from the name open_clip would
  build a 12-block 224 px trunk), so the export names vit_base_patch16_siglip_224
  only when asked to, and the test builds the trunk itself."""
  import open_clip
  import torch
  from safetensors.torch import load_file
  from timm.models.vision_transformer import VisionTransformer
  cfg = {k: v for k, v in model_cfg.items() if k != 'custom_text'}
  with torch.device('meta'):  # no weights made: all of them are loaded
    model = open_clip.CustomTextCLIP(**cfg)
    model.visual.trunk = VisionTransformer(
        img_size=ti.IMAGE_SIZE, patch_size=16, embed_dim=768, depth=1, num_heads=12,
        mlp_ratio=4, class_token=False, global_pool='map', num_classes=0,
        act_layer='gelu', norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6))
  weights = load_file(str(directory / 'open_clip_model.safetensors'))
  model.load_state_dict(weights, strict=True, assign=True)
  return model.eval()


@pytest.mark.slow  # too long for the quick loop (conftest.py: QUICK_TEST_S)
@pytest.mark.parametrize('name', ['siglip', 'siglip2'])
def test_siglip_round_trip(name, sources, workdirs, tmp_path):
  """SigLIP, and SigLIP 2 with Gemma's tokenizer, out to open_clip and back."""
  import open_clip
  source, reference = sources[name]
  out = tmp_path / name
  with pytest.raises(errors.ConfigError, match='no timm SigLIP ViT has patch 16 at 32 px'):
    open_clip_export.export_open_clip(workdirs[name], out)
  assert not out.exists()
  summary = open_clip_export.export_open_clip(workdirs[name], out,
                                              timm_model_name='vit_base_patch16_siglip_224')
  tokenizer = 'GemmaTokenizer' if name == 'siglip2' else 'SiglipTokenizer'
  assert summary['model'] == 'CustomTextCLIP' and tokenizer in summary['tokenizer']
  cfg = json.loads((out / 'open_clip_config.json').read_text())
  m = cfg['model_cfg']
  assert m['custom_text'] and m['vision_cfg']['image_size'] == ti.IMAGE_SIZE
  assert m['init_logit_bias'] == float(reference.logit_bias.detach().reshape(()))
  # exact GELU as SigLIP's source said, tanh as SigLIP 2's
  assert m['text_cfg'].get('act_kwargs') == ({'approximate': 'tanh'} if name == 'siglip2'
                                             else None)
  assert m['text_cfg']['hf_tokenizer_name'] == str(out.absolute())
  assert cfg['preprocess_cfg']['mean'] == [0.5, 0.5, 0.5]
  _assert_bitwise_equal(out, source)
  images = _images()
  exp, state = _load(workdirs[name])
  image, text, ids, _ = _embed(exp, state, images, ASCII_TEXTS)
  np.testing.assert_array_equal(open_clip.get_tokenizer(f'local-dir:{out}')(ASCII_TEXTS), ids)
  model = _siglip_model(m, out)
  got = _torch_embeddings(model, images, ids)
  want = _torch_embeddings(reference, images, ids)
  for g, w, jax_value in zip(got, want, (image, text)):
    np.testing.assert_array_equal(g, w)
    np.testing.assert_allclose(g, jax_value, atol=TOLERANCE, rtol=0)
  _assert_reimports_equal(out, exp, state)


# ------------------------------------------------- models made by jaxcl ---
def _experiment(config, image_size):
  """(Experiment, state at step 0) of `config`: random parameters, perturbed
  so that no LayerNorm or bias is a constant that would hide a swapped tensor."""
  validation.validate(config, num_devices=1, check_data=False)
  # One device: the suite's 8 simulated ones would hold 8 replicas of a ViT-B's state.
  exp = experiment.setup(config, devices=jax.devices()[:1],
                         info=data.DatasetInfo((image_size, image_size, 3), 0, ()))
  state = exp.init_state()
  rng = np.random.default_rng(2)
  noisy = lambda x: jax.device_put(
      x + np.float32(0.05) * rng.standard_normal(x.shape, np.float32), x.sharding)
  return exp, state.replace(params=jax.tree.map(noisy, state.params))


def _run_files(config, workdir, image_size):
  """A workdir's config, tokenizer and data facts, no checkpoint: for a
  refusal, which comes before the checkpoint is read."""
  text_tower = methods.get(config.method).text_tower
  tokenizer = tokenizers.build_tokenizer(config.text) if text_tower else None
  info = data.DatasetInfo((image_size, image_size, 3), 0, ())
  run_files.write_run_start(workdir, config, [[0, config.batch_size]], tokenizer,
                            run_files.data_facts(info, {}), 0)
  return workdir


def _clip_config(config_file=helpers.CLIP_CONFIG, **changes):
  """A small CLIP from scratch that open_clip expresses with switches the
  imported model lacks: tanh GELU in the image tower (act_kwargs), exact
  GELU in the text tower, eps 1e-6, text pooled at the last position with a
  biased projection (open_clip's Linear), τ fixed (the logit scale holds it)."""
  import open_clip
  config = helpers.tiny_config(config_file, helpers.TINY_TWO_TOWER)
  config.model.vit.update(pool='cls', act='gelu_tanh', pre_norm=True, patch_bias=False)
  config.text.update(tokenizer='clip_bpe', vocab_file=open_clip.tokenizer.default_bpe(),
                     max_length=20, pool='last', act='gelu', projection_bias=True)
  config.temperature.update(mode='fixed', init=0.05)
  for key, value in changes.items():
    *path, last = key.split('.')
    functools.reduce(lambda node, part: node[part], path, config)[last] = value
  return config


@pytest.mark.slow  # too long for the quick loop (conftest.py: QUICK_TEST_S)
def test_clip_made_by_jaxcl(tmp_path):
  """A model jaxcl made (in memory: write_open_clip, the writer behind
  export_open_clip), through open_clip.create_model's own loading."""
  import open_clip
  config = _clip_config()
  exp, state = _experiment(config, config.augment.image_size)
  out = tmp_path / 'oc'
  plan = open_clip_plan.plan(config, exp.tokenizer, str(out))
  open_clip_export.write_open_clip(exp, state, out, plan)
  m = json.loads((out / 'open_clip_config.json').read_text())['model_cfg']
  assert m['quick_gelu'] is False and m['vision_cfg']['act_kwargs'] == {'approximate': 'tanh'}
  assert m['vision_cfg']['norm_kwargs'] == {'eps': 1e-6}
  assert m['text_cfg']['pool_type'] == 'last' and m['text_cfg']['proj_bias']
  scale = safetensors.numpy.load_file(str(out / 'open_clip_model.safetensors'))['logit_scale']
  assert scale.shape == () and np.isclose(scale, -np.log(0.05), rtol=1e-6)
  images = _images(config.augment.image_size)
  image, text, ids, _ = _embed(exp, state, images, ti.TEXTS)
  model = open_clip.create_model(f'local-dir:{out}').eval()
  got = _torch_embeddings(model, images, ids)
  np.testing.assert_allclose(got[0], image, atol=TOLERANCE, rtol=0)
  np.testing.assert_allclose(got[1], text, atol=TOLERANCE, rtol=0)
  _assert_reimports_equal(out, exp, state)


# Every tokenizer kind of the shipped configs (bytes: clip_shapes.py and
# siglip_shapes.py) and of imported models (CLIP's BPE, SentencePiece with and
# without SigLIP's text handling), pooled at end-of-text (open_clip's argmax
# or eos_id) or at the last position: {name: config changes, given tmp_path}.
TOKENIZER_KINDS = {
    'bytes, clip_shapes': lambda _: {'text.tokenizer': 'bytes', 'text.pool': 'eot'},
    'bytes, siglip_shapes': lambda _: {'config_file': helpers.SIGLIP_CONFIG,
                                       'text.tokenizer': 'bytes', 'text.causal': False},
    'clip_bpe': lambda _: {'text.pool': 'eot'},
    'sentencepiece': lambda tmp: {'text.tokenizer': 'sentencepiece', 'text.pool': 'eot',
                                  'text.sentencepiece_model': str(ti._sentencepiece(
                                      tmp / 'spiece.model'))},
    'sentencepiece, siglip': lambda tmp: {
        'config_file': helpers.SIGLIP_CONFIG, 'text.tokenizer': 'sentencepiece',
        'text.normalize': 'siglip', 'text.pad_id': 1, 'text.causal': False,
        'text.sentencepiece_model': str(ti._sentencepiece(tmp / 'spiece.model'))},
}


@pytest.mark.slow  # too long for the quick loop (conftest.py: QUICK_TEST_S)
@pytest.mark.parametrize('kind', sorted(TOKENIZER_KINDS))
def test_import_of_an_export_is_the_model_exported(kind, tmp_path):
  """Export and import are inverses, whatever the tokenizer: the export
  records jaxcl's tokenizer where open_clip has none (bytes, plain
  SentencePiece) and `jaxcl import` reads it back."""
  config = _clip_config(**TOKENIZER_KINDS[kind](tmp_path))
  exp, state = _experiment(config, config.augment.image_size)
  out = tmp_path / 'oc'
  open_clip_export.write_open_clip(exp, state, out,
                                   open_clip_plan.plan(config, exp.tokenizer, str(out)))
  _assert_reimports_equal(out, exp, state)


@pytest.mark.slow  # timm's smallest SigLIP tower: 86M parameters at 224 px
def test_siglip_made_by_jaxcl_loads_by_its_timm_name(tmp_path):
  """A SigLIP whose image tower is exactly timm's vit_base_patch16_siglip_224
  (exact GELU) is written under that name, and open_clip.create_model builds
  it from the config alone, loads it strictly and gives jaxcl's embeddings."""
  import open_clip
  spm = ti._sentencepiece(tmp_path / 'spiece.model')
  config = helpers.tiny_config(helpers.SIGLIP_CONFIG, helpers.TINY_TWO_TOWER)
  config.model.update(embed_dim=768, image_projection=False)
  config.model.vit.update(patch_size=16, width=768, depth=12, heads=12, mlp_dim=3072, pool='map',
                          act='gelu', norm_eps=1e-6, pre_norm=False, patch_bias=True)
  config.augment.image_size = 224
  config.text.update(tokenizer='sentencepiece', sentencepiece_model=str(spm), pad_id=1,
                     normalize='siglip', max_length=16, causal=False, pool='last',
                     projection_bias=True)
  exp, state = _experiment(config, 224)
  out = tmp_path / 'oc'
  plan = open_clip_plan.plan(config, exp.tokenizer, str(out))
  assert plan.model_cfg['vision_cfg']['timm_model_name'] == 'vit_base_patch16_siglip_224'
  open_clip_export.write_open_clip(exp, state, out, plan)
  images = _images(224)[:2]
  image, text, ids, _ = _embed(exp, state, images, ASCII_TEXTS)
  model = open_clip.create_model(f'local-dir:{out}').eval()
  np.testing.assert_array_equal(open_clip.get_tokenizer(f'local-dir:{out}')(ASCII_TEXTS), ids)
  got = _torch_embeddings(model, images, ids)
  np.testing.assert_allclose(got[0], image, atol=TOLERANCE, rtol=0)
  np.testing.assert_allclose(got[1], text, atol=TOLERANCE, rtol=0)


def test_siglip_timm_names_are_looked_up():
  """A 'map' ViT of timm's exact sizes is named; tanh GELU against timm's
  exact GELU is named with a note; any other size is refused naming the
  nearest definition."""
  sizes = dict(patch_size=16, width=768, depth=12, heads=12, mlp_dim=3072)
  notes = []
  assert open_clip_plan.timm_trunk_name(sizes, 224, 'gelu', 1e-6, notes) == (
      'vit_base_patch16_siglip_224') and not notes
  assert open_clip_plan.timm_trunk_name(sizes, 256, 'gelu_tanh', 1e-6, notes) == (
      'vit_base_patch16_siglip_256') and 'exact GELU' in notes[0]
  assert open_clip_plan.timm_trunk_name(dict(sizes, patch_size=32), 256, 'gelu_tanh', 1e-6,
                                        []) == 'vit_base_patch32_siglip_256'
  with pytest.raises(errors.ConfigError, match=r'depth 11 \(vit_base_patch16_siglip_224: '
                                               r'depth 12\)'):
    open_clip_plan.timm_trunk_name(dict(sizes, depth=11), 224, 'gelu', 1e-6, [])


# ------------------------------------------------------------- refusals ---
@pytest.mark.slow  # too long for the quick loop (conftest.py: QUICK_TEST_S)
def test_refusals_are_one_line_and_write_nothing(workdirs, clip_export, tmp_path):
  shapes_run = _run_files(helpers.tiny_config(helpers.CLIP_CONFIG, helpers.TINY_TWO_TOWER),
                          tmp_path / 'clip_shapes', 32)
  simclr_run = _run_files(helpers.tiny_config(), tmp_path / 'simclr', 8)
  patch_bias_run = _run_files(_clip_config(**{'model.vit.patch_bias': True}),
                              tmp_path / 'patch_bias', 32)
  naflex_run = _run_files(_clip_config(**{'dataset.resolution': 'naflex'}), tmp_path / 'naflex',
                          0)
  earlier, _ = clip_export
  existing = tmp_path / 'existing'
  shutil.copytree(earlier, existing)
  (existing / 'open_clip_model.safetensors').write_bytes(b'stale')  # replaced below
  mine = tmp_path / 'mine'
  mine.mkdir()
  (mine / 'notes.txt').write_text('mine')
  a_file = tmp_path / 'a_file'
  a_file.write_text('mine')
  out = tmp_path / 'out'
  clip = workdirs['clip']
  export = lambda workdir, output, *more: ['export', '--workdir', str(workdir), '--output',
                                           str(output), '--format', 'open_clip', *more]
  cases = {
      "model.vit.pool 'gap'": export(shapes_run, out),
      'the simclr model has no text tower': export(simclr_run, out),
      'model.vit.patch_bias True': export(patch_bias_run, out),
      'open_clip has no NaFlex towers': export(naflex_run, out),
      'is not empty; pass --overwrite': export(clip, existing),
      'holds notes.txt: not an open_clip export': export(clip, mine, '--overwrite'),
      'is a file': export(clip, a_file),
      'keeps its own files': export(clip, f'{clip}/checkpoints'),
      '--format': ['export', '--workdir', clip, '--output', str(out), '--format', 'onnx'],
      'does not take --format': ['import', str(out), '--output', str(out), '--format', 'jax'],
  }
  # And one that is not refused: --overwrite replaces an earlier export.
  argvs = list(cases.values()) + [export(clip, existing, '--overwrite')]
  results = helpers.cli_in_forks(argvs)
  for (expected, argv), result in zip(cases.items(), results):
    lines = result['stderr'].strip().splitlines()
    assert result['code'] == 2, (argv, result)
    assert len(lines) == 1 and lines[0].startswith('jaxcl: error:'), (argv, lines)
    assert expected in lines[0], (expected, lines[0])
  assert results[-1]['code'] == 0, results[-1]
  assert not out.exists() and (mine / 'notes.txt').read_text() == 'mine'
  assert a_file.read_text() == 'mine'
  assert not (pathlib.Path(clip) / 'checkpoints' / 'open_clip_config.json').exists()
  assert sorted(p.name for p in existing.iterdir()) == sorted(p.name for p in earlier.iterdir())
  _assert_bitwise_equal(existing, earlier)
  assert not [p for p in tmp_path.iterdir() if p.name.startswith('.')]
