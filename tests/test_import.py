"""`jaxcl import`: published CLIP and SigLIP checkpoints, exactly.

The references are the source frameworks themselves: open_clip and
transformers build each model at random initialization and small size
(nothing is downloaded), save it in the layout the model hubs use, and
their own forward passes (float32, CPU) give the embeddings jaxcl's
imported model must reproduce within 1e-4.
"""

import functools
import hashlib
import io
import json
import os
import re
import shutil
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import sentencepiece
from flax import nnx

import helpers
from jaxcl import cli, config as config_lib, errors, export, files, presets
from jaxcl.hub import (
  big_vision_layout as bv,
  importer,
  open_clip_layout as layout,
  tensors,
  transformers_layout,
)
from jaxcl.models import transformer
from jaxcl.trainer import checkpoints
from jaxcl.workdir import run_files

TOLERANCE = 1e-4  # embeddings are unit vectors: absolute = relative
IMAGE_SIZE = 32
TEXTS = ['a photo of a cat.', 'Two RED squares, one circle!', '', 'x ' * 60,
         'Café “quoted” 東京 ☕ & more']


def _perturbed(model):
  """Random weights everywhere: the frameworks initialize some biases and
  LayerNorms to constants, which would hide a swapped tensor."""
  import torch
  torch.manual_seed(1)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.05)
  return model.eval()


def _bpe_vocab():
  import open_clip
  return open_clip.tokenizer.default_bpe()


def _sentencepiece(path):
  """A tiny unigram model with the special ids of Google's c4_en: pad 0, EOS 1, unk 2."""
  model = io.BytesIO()
  corpus = [t.lower() for t in TEXTS + ['a small blue triangle', 'the green circle']] * 8
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(corpus), model_writer=model, vocab_size=64, model_type='unigram',
      pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, minloglevel=2)
  path.write_bytes(model.getvalue())
  return path


def _save_open_clip(model, model_cfg, directory, mean_std=None, exist_ok=False):
  from safetensors.torch import save_file
  directory.mkdir(exist_ok=exist_ok)
  save_file({k: v.contiguous() for k, v in model.state_dict().items()},
            str(directory / 'open_clip_model.safetensors'))
  preprocess = {'mean': list(mean_std[0]), 'std': list(mean_std[1])} if mean_std else {}
  (directory / 'open_clip_config.json').write_text(
      json.dumps({'model_cfg': model_cfg, 'preprocess_cfg': preprocess}))


def make_hf_clip(directory):
  from transformers import CLIPConfig, CLIPModel
  cfg = CLIPConfig(
      text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=20,
                       hidden_act='quick_gelu'),
      vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=8,
                         hidden_act='quick_gelu'),
      projection_dim=24)
  model = _perturbed(CLIPModel(cfg))
  model.save_pretrained(str(directory))
  shutil.copy(_bpe_vocab(), directory / 'bpe_simple_vocab_16e6.txt.gz')
  return model


def make_hf_siglip(directory):
  from transformers import SiglipConfig, SiglipModel
  directory.mkdir()
  vocab = _sentencepiece(directory / 'spiece.model')
  size = sentencepiece.SentencePieceProcessor(model_file=str(vocab)).get_piece_size()
  cfg = SiglipConfig(
      text_config=dict(vocab_size=size, hidden_size=48, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16),
      vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=8))
  model = _perturbed(SiglipModel(cfg))
  model.save_pretrained(str(directory))
  (directory / 'preprocessor_config.json').write_text(
      json.dumps({'image_mean': [0.5, 0.5, 0.5], 'image_std': [0.5, 0.5, 0.5]}))
  return model


def make_open_clip(directory):
  import open_clip
  cfg = dict(embed_dim=24, quick_gelu=True,
             vision_cfg=dict(image_size=IMAGE_SIZE, layers=2, width=64, patch_size=8,
                             head_width=16),
             text_cfg=dict(context_length=20, vocab_size=49408, width=32, heads=4, layers=2))
  model = _perturbed(open_clip.CLIP(**cfg))
  _save_open_clip(model, cfg, directory, ((0.4, 0.5, 0.6), (0.2, 0.3, 0.25)))
  shutil.copy(_bpe_vocab(), directory / 'bpe_simple_vocab_16e6.txt.gz')
  return model


def make_open_clip_siglip(directory, siglip2=False):
  """open_clip's SigLIP: a timm image tower (at this test's size: one block
  of timm's vit_base_patch16_siglip definition, whose MLP computes exact
  GELU) and open_clip's text tower; siglip2: its ViT-*-SigLIP2 configs' text
  (Gemma's tokenizer, tanh GELU, canonicalized text)."""
  import open_clip
  import torch
  from timm.models.vision_transformer import VisionTransformer
  if siglip2:
    directory.mkdir()
    size = _gemma_sentencepiece(directory / 'tokenizer.model')
  else:
    spm = _sentencepiece(directory.parent / 'oc_siglip_spiece.model')
    size = sentencepiece.SentencePieceProcessor(model_file=str(spm)).get_piece_size()
  text_cfg = dict(context_length=16, vocab_size=size, width=48, heads=4, layers=2,
                  no_causal_mask=True, proj_bias=True, pool_type='last',
                  norm_kwargs={'eps': 1e-6})  # exact GELU, as the published configs
  if siglip2:  # as open_clip's ViT-B-16-SigLIP2.json
    text_cfg['act_kwargs'] = {'approximate': 'tanh'}
  vision_cfg = dict(image_size=IMAGE_SIZE, timm_model_name='vit_base_patch16_siglip_224',
                    timm_model_pretrained=False, timm_pool='map', timm_proj='none')
  model = open_clip.CustomTextCLIP(embed_dim=768, vision_cfg=vision_cfg, text_cfg=text_cfg,
                                   init_logit_bias=-10)
  model.visual.trunk = VisionTransformer(
      img_size=IMAGE_SIZE, patch_size=16, embed_dim=768, depth=1, num_heads=12, mlp_ratio=4,
      class_token=False, global_pool='map', num_classes=0, act_layer='gelu',
      norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6))
  model = _perturbed(model)
  tokenizer = {'hf_tokenizer_name': 'timm/ViT-B-16-SigLIP2' if siglip2 else 'timm/ViT-B-16-SigLIP',
               'tokenizer_kwargs': {'clean': 'canonicalize'}}
  cfg = dict(embed_dim=768, init_logit_bias=-10, custom_text=True, vision_cfg=vision_cfg,
             text_cfg=dict(text_cfg, **tokenizer))
  _save_open_clip(model, cfg, directory, exist_ok=siglip2)
  if not siglip2:
    shutil.copy(spm, directory / 'spiece.model')
  return model


def make_big_vision_siglip(directory):
  """big_vision's SigLIP .npz, written from a transformers SiglipModel by the
  name mapping of transformers' convert_siglip_to_hf.py, read backwards:
  attention kernels keep their heads axis ([width, heads, head dim])."""
  model = make_hf_siglip(directory.parent / 'bv_reference')
  directory.mkdir()
  shutil.copy(directory.parent / 'bv_reference' / 'spiece.model', directory / 'c4_en.model')
  _write_big_vision(model, directory / 'siglip_b8_32.npz')
  return model


def make_big_vision_siglip2(directory):
  """big_vision's SigLIP 2 NaFlex .npz (naflex_vit.py: the patch embedding a
  Dense over flattened patches, the position embeddings a [g, g, width]
  grid), written from a transformers Siglip2Model as convert_siglip2_to_hf.py
  reads it, backwards; Gemma's tokenizer beside it."""
  model = make_hf_siglip2(directory.parent / 'bv2_reference')
  directory.mkdir()
  shutil.copy(directory.parent / 'bv2_reference' / 'tokenizer.model', directory)
  _write_big_vision(model, directory / 'siglip_b8_32.npz')
  return model


def _write_big_vision(model, path):
  w = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  heads = model.config.vision_config.num_attention_heads
  out = {}

  def dense(name, key):
    out[f'{name}/kernel'], out[f'{name}/bias'] = w[f'{key}.weight'].T, w[f'{key}.bias']

  def norm(name, key):
    out[f'{name}/scale'], out[f'{name}/bias'] = w[f'{key}.weight'], w[f'{key}.bias']

  def attention(name, weights, biases, out_key, h):
    for part, weight, bias in zip(('query', 'key', 'value'), weights, biases):
      out[f'{name}/{part}/kernel'] = weight.T.reshape(weight.shape[1], h, -1)
      out[f'{name}/{part}/bias'] = bias.reshape(h, -1)
    out_weight = w[f'{out_key}.weight']
    out[f'{name}/out/kernel'] = out_weight.T.reshape(h, -1, out_weight.shape[0])
    out[f'{name}/out/bias'] = w[f'{out_key}.bias']

  def block(name, key, h):
    norm(f'{name}/LayerNorm_0', f'{key}.layer_norm1')
    norm(f'{name}/LayerNorm_1', f'{key}.layer_norm2')
    dense(f'{name}/MlpBlock_0/Dense_0', f'{key}.mlp.fc1')
    dense(f'{name}/MlpBlock_0/Dense_1', f'{key}.mlp.fc2')
    attention(f'{name}/MultiHeadDotProductAttention_0',
              [w[f'{key}.self_attn.{x}_proj.weight'] for x in 'qkv'],
              [w[f'{key}.self_attn.{x}_proj.bias'] for x in 'qkv'], f'{key}.self_attn.out_proj', h)

  v, x = 'vision_model', 'text_model'
  patch_embedding = w[f'{v}.embeddings.patch_embedding.weight']
  positions = w[f'{v}.embeddings.position_embedding.weight']
  if patch_embedding.ndim == 2:  # NaFlex: Dense [p p C, width], a [g, g, width] grid
    side = int(np.sqrt(positions.shape[0]))
    out['params/img/embedding/kernel'] = patch_embedding.T
    out['params/img/pos_embedding'] = positions.reshape(side, side, -1)
  else:
    out['params/img/embedding/kernel'] = patch_embedding.transpose(2, 3, 1, 0)
    out['params/img/pos_embedding'] = positions[None]
  out['params/img/embedding/bias'] = w[f'{v}.embeddings.patch_embedding.bias']
  for i in range(model.config.vision_config.num_hidden_layers):
    block(f'params/img/Transformer/encoderblock_{i}', f'{v}.encoder.layers.{i}', heads)
  norm('params/img/Transformer/encoder_norm', f'{v}.post_layernorm')
  out['params/img/MAPHead_0/probe'] = w[f'{v}.head.probe']
  in_w, in_b = w[f'{v}.head.attention.in_proj_weight'], w[f'{v}.head.attention.in_proj_bias']
  attention('params/img/MAPHead_0/MultiHeadDotProductAttention_0', np.split(in_w, 3),
            np.split(in_b, 3), f'{v}.head.attention.out_proj', heads)
  norm('params/img/MAPHead_0/LayerNorm_0', f'{v}.head.layernorm')
  dense('params/img/MAPHead_0/MlpBlock_0/Dense_0', f'{v}.head.mlp.fc1')
  dense('params/img/MAPHead_0/MlpBlock_0/Dense_1', f'{v}.head.mlp.fc2')
  out['params/txt/Embed_0/embedding'] = w[f'{x}.embeddings.token_embedding.weight']
  out['params/txt/pos_embedding'] = w[f'{x}.embeddings.position_embedding.weight'][None]
  for i in range(model.config.text_config.num_hidden_layers):
    block(f'params/txt/Encoder_0/encoderblock_{i}', f'{x}.encoder.layers.{i}',
          model.config.text_config.num_attention_heads)
  norm('params/txt/Encoder_0/encoder_norm', f'{x}.final_layer_norm')
  dense('params/txt/head', f'{x}.head')
  out['params/t'], out['params/b'] = w['logit_scale'], w['logit_bias']
  np.savez(path, **out)


def _gemma_sentencepiece(path):
  """A tiny model with the Gemma tokenizer's options and special pieces: BPE with
  byte fallback, pad 0, EOS 1, BOS 2, unk 3 (test_tokenizers_published.py checks its
  ids against transformers' Siglip2Tokenizer)."""
  model = io.BytesIO()
  corpus = [t.lower() for t in TEXTS + ['a small blue triangle', 'the green circle']] * 8
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(corpus), model_writer=model, vocab_size=340, model_type='bpe',
      pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece='<pad>', eos_piece='<eos>',
      bos_piece='<bos>', unk_piece='<unk>', byte_fallback=True, add_dummy_prefix=False,
      remove_extra_whitespaces=False, normalization_rule_name='identity', split_digits=True,
      hard_vocab_limit=False, minloglevel=2)
  path.write_bytes(model.getvalue())
  return sentencepiece.SentencePieceProcessor(model_file=str(path)).get_piece_size()


SIGLIP2_TEXT = dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, max_position_embeddings=16)
SIGLIP2_VISION = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, patch_size=8)


def make_hf_siglip2(directory):
  """SigLIP 2's NaFlex layout (model_type siglip2): a 4 x 4 learned position grid."""
  from transformers import Siglip2Config, Siglip2Model
  directory.mkdir()
  size = _gemma_sentencepiece(directory / 'tokenizer.model')
  cfg = Siglip2Config(text_config=dict(vocab_size=size, **SIGLIP2_TEXT),
                      vision_config=dict(num_patches=(IMAGE_SIZE // 8) ** 2, **SIGLIP2_VISION))
  model = _perturbed(Siglip2Model(cfg))
  model.save_pretrained(str(directory))
  (directory / 'preprocessor_config.json').write_text(json.dumps(
      {'image_mean': [0.5, 0.5, 0.5], 'image_std': [0.5, 0.5, 0.5], 'patch_size': 8,
       'max_num_patches': (IMAGE_SIZE // 8) ** 2}))
  return model


def make_hf_siglip2_fixed(directory):
  """SigLIP 2 at a fixed resolution: SiglipModel's layout, Gemma's tokenizer."""
  from transformers import SiglipConfig, SiglipModel
  directory.mkdir()
  size = _gemma_sentencepiece(directory / 'tokenizer.model')
  cfg = SiglipConfig(text_config=dict(vocab_size=size, **SIGLIP2_TEXT),
                     vision_config=dict(image_size=IMAGE_SIZE, **SIGLIP2_VISION))
  model = _perturbed(SiglipModel(cfg))
  model.save_pretrained(str(directory))
  (directory / 'tokenizer_config.json').write_text(json.dumps(
      {'tokenizer_class': 'GemmaTokenizer', 'add_bos_token': False, 'add_eos_token': True}))
  return model


MAKERS = {'transformers_clip': make_hf_clip, 'transformers_siglip': make_hf_siglip,
          'transformers_siglip2': make_hf_siglip2,
          'transformers_siglip2_fixed': make_hf_siglip2_fixed,
          'open_clip': make_open_clip, 'open_clip_siglip': make_open_clip_siglip,
          'big_vision_siglip': make_big_vision_siglip,
          'big_vision_siglip2': make_big_vision_siglip2,
          'open_clip_siglip2': functools.partial(make_open_clip_siglip, siglip2=True)}


@pytest.fixture(scope='module')
def sources(tmp_path_factory):
  """{name: (source directory, the torch model)}."""
  root = tmp_path_factory.mktemp('sources')
  return {name: (root / name, make(root / name)) for name, make in MAKERS.items()}


def _reference_ids(name, directory, texts, length):
  """Token ids from the source's own tokenizer."""
  if name.startswith('open_clip_siglip'):  # open_clip's HFTokenizer, the hub's settings
    import open_clip
    hub = ({'tokenizer_class': 'GemmaTokenizer', 'add_bos_token': False, 'add_eos_token': True,
            'padding_side': 'right'} if name.endswith('2') else
           {'tokenizer_class': 'SiglipTokenizer', 'eos_token': '</s>', 'pad_token': '</s>'})
    (directory / 'tokenizer_config.json').write_text(json.dumps(hub))
    tok = open_clip.tokenizer.HFTokenizer(str(directory), context_length=length,
                                          clean='canonicalize')
    with warnings.catch_warnings():
      warnings.simplefilter('ignore')
      return tok(texts).numpy()
  if 'siglip2' in name:  # with the published checkpoints' tokenizer settings
    from transformers import Siglip2Tokenizer
    tok = Siglip2Tokenizer.from_pretrained(directory, add_bos_token=False, add_eos_token=True,
                                           padding_side='right')
    return np.asarray(tok(texts, padding='max_length', max_length=length,
                          truncation=True)['input_ids'])
  if 'siglip' in name:
    from transformers import SiglipTokenizer
    vocab = directory / ('c4_en.model' if name.startswith('big_vision') else 'spiece.model')
    tok = SiglipTokenizer(vocab_file=str(vocab))
    with warnings.catch_warnings():
      warnings.simplefilter('ignore')
      return np.asarray(tok(texts, padding='max_length', max_length=length,
                            truncation=True)['input_ids'])
  import open_clip
  return open_clip.tokenize(texts, context_length=length).numpy()


def _reference_embeddings(name, model, images, ids):
  """L2-normalized image and text embeddings of the source framework;
  images: float [b, H, W, C], already normalized."""
  import torch
  pixels = torch.tensor(np.asarray(images, np.float32)).permute(0, 3, 1, 2)
  ids = torch.tensor(np.asarray(ids, np.int64))
  with torch.no_grad():
    if name.startswith('open_clip'):
      return (model.encode_image(pixels, normalize=True).numpy(),
              model.encode_text(ids, normalize=True).numpy())
    if type(model).__name__ == 'Siglip2Model':  # a square image is the full grid of patches
      image = _siglip2_image_features(model, *_full_grid_patches(images))
    else:
      image = model.get_image_features(pixel_values=pixels)
    text = model.get_text_features(input_ids=ids)
    image, text = (getattr(x, 'pooler_output', x) for x in (image, text))
    normalize = lambda x: torch.nn.functional.normalize(x, dim=-1).numpy()
    return normalize(image), normalize(text)


def _full_grid_patches(images, patch=8):
  """Images [b, H, W, C] as Siglip2's processor lays out patches: [b, N, p p C] by
  rows of patches, each flattened by (row, column, channel); and their grids."""
  b, h, w, c = images.shape
  patches = images.reshape(b, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
  return patches.reshape(b, -1, patch * patch * c), np.tile([h // patch, w // patch], (b, 1))


def _siglip2_image_features(model, patches, grids):
  """transformers' Siglip2 image features of patches [b, N, p p C] whose first
  rows x columns are the image's (the rest padding)."""
  import torch
  mask = np.arange(patches.shape[1])[None] < np.prod(grids, axis=1)[:, None]
  with torch.no_grad():
    out = model.get_image_features(pixel_values=torch.tensor(np.asarray(patches, np.float32)),
                                   pixel_attention_mask=torch.tensor(mask),
                                   spatial_shapes=torch.tensor(np.asarray(grids, np.int64)))
  return getattr(out, 'pooler_output', out)


@pytest.fixture(scope='module')
def imported(sources):
  """{name: (Experiment, state)} of each source, imported in-process."""
  out = {}
  for name, (directory, _) in sources.items():
    if name.startswith('big_vision'):  # SOURCE is the .npz itself (or its folder)
      directory = directory / 'siglip_b8_32.npz'
    _, _, exp, state = importer.load_source(directory)
    out[name] = exp, state
  return out


@pytest.mark.slow  # too long for the quick loop (conftest.py: QUICK_TEST_S): the sources, imported
@pytest.mark.parametrize('name', sorted(MAKERS))
def test_embeddings_equal_the_source_framework(name, sources, imported):
  directory, reference = sources[name]
  exp, state = imported[name]
  model = nnx.merge(exp.eval_graphdef, state.params, state.batch_stats)
  images = np.random.default_rng(0).normal(size=(3, IMAGE_SIZE, IMAGE_SIZE, 3))
  length = exp.tokenizer.max_length
  ids = exp.tokenizer.encode(TEXTS)
  np.testing.assert_array_equal(ids, _reference_ids(name, directory, TEXTS, length))
  want_image, want_text = _reference_embeddings(name, reference, images, ids)
  got_image = np.asarray(model.embed_image(jnp.asarray(images, jnp.float32)))
  got_text = np.asarray(model.embed_text(jnp.asarray(ids)))
  np.testing.assert_allclose(got_image, want_image, atol=TOLERANCE, rtol=0)
  np.testing.assert_allclose(got_text, want_text, atol=TOLERANCE, rtol=0)
  # τ = 1 / exp(logit scale); SigLIP's bias carried over.
  scale = float(reference.logit_scale.detach().reshape(()))
  np.testing.assert_allclose(float(model.temperature()), np.exp(-scale), rtol=1e-6)
  if 'siglip' in name:
    np.testing.assert_allclose(float(model.bias()),
                               float(reference.logit_bias.detach().reshape(())), rtol=1e-6)
  else:
    assert model.bias is None


@pytest.mark.slow  # too long for the quick loop (conftest.py: QUICK_TEST_S)
@pytest.mark.parametrize('name', sorted(MAKERS))
def test_architecture_read_from_the_source(name, imported):
  """Each family's switches, as the published models have them."""
  exp, _ = imported[name]
  c = exp.config
  siglip = 'siglip' in name
  assert c.method == ('siglip' if siglip else 'clip')
  assert c.model.vit.pool == ('map' if siglip else 'cls')
  assert (c.text.pool, c.text.causal) == (('last', False) if siglip else ('eot', True))
  assert c.model.image_projection is not siglip and c.text.projection_bias is siglip
  assert c.text.tokenizer == ('sentencepiece' if siglip else 'clip_bpe')
  expected_mean = {'open_clip': (0.4, 0.5, 0.6), 'transformers_clip': (0.48145466, 0.4578275,
                   0.40821073)}.get(name, (0.5, 0.5, 0.5))
  np.testing.assert_allclose(c.dataset.mean, expected_mean)
  # SigLIP 2: Gemma's ids of lower-cased text padded with its pad, 0; SigLIP: SiglipTokenizer's.
  assert (c.text.normalize, c.text.pad_id) == (
      ('open_clip_canonicalize', 1 if name.endswith('siglip') else -1)
      if name.startswith('open_clip_siglip') else ('lower', -1) if 'siglip2' in name
      else ('siglip', 1) if siglip else ('', -1))
  assert c.augment.image_size == IMAGE_SIZE  # NaFlex: the learned grid's side in pixels
  assert (c.dataset.resolution, tuple(c.dataset.max_patches)) == (
      ('naflex', (16,)) if name == 'transformers_siglip2' else
      ('naflex', (256,)) if name == 'big_vision_siglip2' else ('square', (256,)))


@pytest.mark.slow  # imports the NaFlex source
@pytest.mark.parametrize('name', ['transformers_siglip2', 'big_vision_siglip2'])
def test_siglip2_naflex_patches_equal_transformers(name, sources, imported):
  """Images of several grids in one batch, padded to one patch budget: each
  grid's resized position embeddings and the masks of attention and pooling,
  against transformers' Siglip2 (not on 1-column grids, where torch's resize
  differs from big_vision's: test_naflex.py)."""
  _, reference = sources[name]
  exp, state = imported[name]
  model = nnx.merge(exp.eval_graphdef, state.params, state.batch_stats)
  grids = np.array([[4, 4], [3, 5], [2, 8], [5, 3], [1, 6]])
  patches = np.random.default_rng(1).normal(size=(len(grids), 20, 8 * 8 * 3))
  patches[np.arange(20)[None] >= np.prod(grids, axis=1)[:, None]] = 0
  want = _siglip2_image_features(reference, patches, grids).numpy()
  want /= np.linalg.norm(want, axis=-1, keepdims=True)
  got = model.image_encoder(jnp.asarray(patches, jnp.float32), jnp.asarray(grids))
  got = np.asarray(got / jnp.linalg.norm(got, axis=-1, keepdims=True))
  np.testing.assert_allclose(got, want, atol=TOLERANCE, rtol=0)


@pytest.fixture(scope='module')
def workdirs(sources, tmp_path_factory):
  """{name: workdir} written by `jaxcl import` (open_clip through the CLI)."""
  root = tmp_path_factory.mktemp('imported')
  out = {}
  for name, (directory, _) in sources.items():
    out[name] = root / name
    if name == 'open_clip':
      proc = helpers.jaxcl('import', str(directory), '--output', str(out[name]))
      assert 'wrote' in proc.stdout and 'clip' in proc.stdout, proc.stdout
    else:
      importer.import_checkpoint(directory, out[name])
  return out


@pytest.mark.slow  # lowers both towers for export
@pytest.mark.parametrize('name', ['open_clip', 'transformers_siglip'])
def test_exported_embedders_equal_the_source(name, sources, workdirs, tmp_path):
  """uint8 images at the model's resolution in, the source's embeddings
  of those images (its preprocessing: /255, mean, std) out."""
  directory, reference = sources[name]
  output = tmp_path / 'encoder.jaxexport'
  metadata = export.export_encoder(workdirs[name], output)
  assert metadata['input']['shape'] == ['b', IMAGE_SIZE, IMAGE_SIZE, 3]
  config = config_lib.load_saved(workdirs[name])
  images = np.random.default_rng(1).integers(0, 256, (4, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
  normalized = (images / 255.0 - np.asarray(config.dataset.mean)) / np.asarray(config.dataset.std)
  ids = _reference_ids(name, directory, TEXTS, config.text.max_length)
  want_image, want_text = _reference_embeddings(name, reference, normalized, ids)
  embed = jax.export.deserialize(output.read_bytes())
  embed_text = jax.export.deserialize((tmp_path / metadata['text']['file']).read_bytes())
  # The tokenizer's vocabulary or model travels with the artifacts.
  spec = metadata['tokenizer']
  copied = tmp_path / spec['vocab_file' if spec['type'] == 'clip_bpe' else 'model_file']
  assert hashlib.sha256(copied.read_bytes()).hexdigest() == spec['sha256']
  np.testing.assert_allclose(np.asarray(embed.call(images)), want_image, atol=TOLERANCE, rtol=0)
  np.testing.assert_allclose(np.asarray(embed_text.call(ids.astype(np.int32))), want_text,
                             atol=TOLERANCE, rtol=0)


@pytest.mark.slow  # too long for the quick loop (conftest.py: QUICK_TEST_S)
def test_imported_workdir_is_a_run_at_step_zero(workdirs):
  """The workdir has what eval, export and training read: the config, the
  tokenizer (its vocabulary copied in), data facts and checkpoint 0."""
  for name, workdir in workdirs.items():
    assert files.is_run(workdir), name
    assert checkpoints.complete_step(workdir) == 0, name
    assert run_files.saved_tokenizer(workdir) is not None, name
    assert run_files.saved_data_facts(workdir)['image_shape'] == [IMAGE_SIZE, IMAGE_SIZE, 3]
    leftovers = [p for p in workdir.parent.iterdir() if p.name.startswith('.')]
    assert not leftovers, leftovers


# ------------------------------------------------------------ bad sources ---
def _without(src, dst, drop=(), reshape=()):
  """A copy of the open_clip source `src` without the tensors `drop` and
  with the tensors `reshape` cut in half along their first axis."""
  shutil.copytree(src, dst)
  weights = safetensors.numpy.load_file(str(src / 'open_clip_model.safetensors'))
  weights = {k: (v[:v.shape[0] // 2] if k in reshape else v) for k, v in weights.items()
             if k not in drop}
  safetensors.numpy.save_file(weights, str(dst / 'open_clip_model.safetensors'))
  return dst


@pytest.mark.slow  # a dozen CLI processes
def test_bad_sources_are_one_line_and_write_nothing(sources, tmp_path):
  src = sources['open_clip'][0]
  hf_src = sources['transformers_clip'][0]
  torch_dir = tmp_path / 'torch_only'
  torch_dir.mkdir()
  shutil.copy(hf_src / 'config.json', torch_dir / 'config.json')
  (torch_dir / 'pytorch_model.bin').write_bytes(b'not read')
  missing = _without(src, tmp_path / 'missing', drop=['visual.ln_pre.weight'])
  extra = tmp_path / 'extra'
  _without(src, extra)
  weights = safetensors.numpy.load_file(str(extra / 'open_clip_model.safetensors'))
  weights['visual.mystery'] = np.zeros(3, np.float32)
  safetensors.numpy.save_file(weights, str(extra / 'open_clip_model.safetensors'))
  misshapen = _without(src, tmp_path / 'misshapen',
                       reshape=['transformer.resblocks.1.mlp.c_fc.weight'])
  unknown = tmp_path / 'unknown'
  shutil.copytree(src, unknown)
  cfg = json.loads((unknown / 'open_clip_config.json').read_text())
  cfg['model_cfg']['vision_cfg']['ls_init_value'] = 1e-5
  (unknown / 'open_clip_config.json').write_text(json.dumps(cfg))
  no_tokenizer = tmp_path / 'no_tokenizer'
  shutil.copytree(src, no_tokenizer)
  (no_tokenizer / 'bpe_simple_vocab_16e6.txt.gz').unlink()
  not_empty = tmp_path / 'not_empty'
  not_empty.mkdir()
  (not_empty / 'keep.txt').write_text('mine')
  malformed = tmp_path / 'malformed'
  malformed.mkdir()
  (malformed / 'config.json').write_text('{"model_type": "clip",')
  (malformed / 'model.safetensors').write_bytes(b'')
  truncated = tmp_path / 'truncated'
  shutil.copytree(hf_src, truncated)
  (truncated / 'model.safetensors').write_bytes((hf_src / 'model.safetensors').read_bytes()[:5])
  out = tmp_path / 'out'
  cases = {
      'cannot read the checkpoint (JSONDecodeError': [str(malformed), '--output', str(out)],
      'header': [str(truncated), '--output', str(out)],
      'pytorch_model.bin': [str(torch_dir), '--output', str(out)],
      "no tensor 'visual.ln_pre.weight'": [str(missing), '--output', str(out)],
      'visual.mystery': [str(extra), '--output', str(out)],
      'transformer.resblocks.1.mlp.c_fc.weight': [str(misshapen), '--output', str(out)],
      'ls_init_value': [str(unknown), '--output', str(out)],
      '--tokenizer FILE': [str(no_tokenizer), '--output', str(out)],
      'not an empty directory': [str(src), '--output', str(not_empty)],
      'holds no checkpoint': [str(tmp_path), '--output', str(out)],
      'needs SOURCE': ['--output', str(out)],
  }
  results = helpers.cli_in_forks([['import', *argv] for argv in cases.values()])
  for (expected, argv), result in zip(cases.items(), results):
    lines = result['stderr'].strip().splitlines()
    assert result['code'] == 2, (argv, result)
    assert len(lines) == 1 and lines[0].startswith('jaxcl: error:'), (argv, lines)
    assert expected in lines[0], (expected, lines[0])
  assert not out.exists()
  assert sorted(p.name for p in not_empty.iterdir()) == ['keep.txt']
  assert not [p for p in tmp_path.iterdir() if p.name.startswith('.out')]


def _json_nodes(value, path=()):
  """(path, value) of every node of a JSON value, the root first."""
  yield path, value
  if isinstance(value, dict):
    for key, child in value.items():
      yield from _json_nodes(child, (*path, key))


def _replaced(value, path, new):
  if not path:
    return new
  return {**value, path[0]: _replaced(value[path[0]], path[1:], new)}


@pytest.mark.slow  # too long for the quick loop (conftest.py: QUICK_TEST_S)
def test_config_json_of_any_wrong_shape_is_one_line(sources, tmp_path):
  """Each object of each config file a layout reads, replaced by a list, a
  number, a string, a boolean and null: the import succeeds or is refused in
  one line (a ConfigError), never another error.
  (open_clip's config gets the optional objects too: act_kwargs, norm_kwargs
  and a jaxcl export's tokenizer record.)"""
  refusals = {}
  for name, file in (('open_clip', 'open_clip_config.json'), ('transformers_clip', 'config.json'),
                     ('transformers_siglip', 'config.json'),
                     ('transformers_siglip', 'preprocessor_config.json')):
    source = tmp_path / name
    if not source.exists():
      shutil.copytree(sources[name][0], source)
    config = json.loads((sources[name][0] / file).read_text())
    if name == 'open_clip':
      config['model_cfg']['vision_cfg'].update(act_kwargs={}, norm_kwargs={'eps': 1e-5})
      config['jaxcl'] = {'tokenizer': {'type': 'clip_bpe'}}
    for path, value in list(_json_nodes(config)):
      if not isinstance(value, dict):
        continue
      for new in ([], 7, 'x', True, None):
        (source / file).write_text(json.dumps(_replaced(config, path, new)))
        try:
          importer.load_source(source)
        except errors.ConfigError as e:
          assert '\n' not in str(e), (file, path, new, str(e))
          refusals[(name, file, path, json.dumps(new))] = str(e)
    (source / file).write_text(json.dumps(config))
  oc, hf = ('open_clip', 'open_clip_config.json'), ('transformers_clip', 'config.json')
  assert refusals[(*oc, (), '[]')].endswith('open_clip_config.json holds a list, not a JSON object')
  assert refusals[(*oc, ('model_cfg', 'vision_cfg'), '7')] == (
      'open_clip_config.json: model_cfg.vision_cfg is a number, not an object')
  assert refusals[(*hf, ('text_config',), '"x"')] == (
      'config.json: text_config is a string, not an object')
  # transformers reads a null tower config as its defaults (a ViT-B/32), as here:
  assert 'the config implies' in refusals[(*hf, ('vision_config',), 'null')]
  # open_clip reads null act_kwargs and norm_kwargs as none given (model.py), as here:
  for key in ('act_kwargs', 'norm_kwargs'):
    assert (*oc, ('model_cfg', 'vision_cfg', key), 'null') not in refusals, key


def test_import_help_names_every_layout(capsys):
  assert cli.run(['jaxcl', 'import', '--help']) == 0
  summary = capsys.readouterr().out.split('\n\n')[1]
  assert all(name in summary for name in ('open_clip', 'transformers', 'big_vision', '.npz'))


def test_preset_architectures_match_open_clip_configs():
  """presets.ARCHITECTURES against open_clip's published model configs."""
  import open_clip
  folder = os.path.join(os.path.dirname(open_clip.__file__), 'model_configs')
  for name, values in presets.ARCHITECTURES.items():
    with open(os.path.join(folder, f'{name}.json')) as f:
      cfg = json.load(f)
    v, x = cfg['vision_cfg'], cfg['text_cfg']
    assert values['model.embed_dim'] == cfg['embed_dim'], name
    assert values['augment.image_size'] == v['image_size'], name
    assert values['text.max_length'] == x['context_length'], name
    assert values['text.width'] == x['width'] and values['text.heads'] == x['heads'], name
    assert values['text.depth'] == x['layers'], name
    assert values['text.mlp_dim'] == int(x['width'] * x.get('mlp_ratio', 4.0)), name
    if 'timm_model_name' in v:
      assert f'patch{values["model.vit.patch_size"]}' in v['timm_model_name'], name
      assert values['method'] == 'siglip' and 'init_logit_bias' in cfg, name
    else:
      assert values['model.vit.width'] == v['width'], name
      assert values['model.vit.depth'] == v['layers'], name
      assert values['model.vit.patch_size'] == v['patch_size'], name
      assert values['model.vit.heads'] == v['width'] // v.get('head_width', 64), name
      assert (values['model.vit.act'] == 'quick_gelu') == bool(cfg.get('quick_gelu')), name


@pytest.mark.parametrize('family', ['clip', 'siglip'])
def test_transformers_defaults_fill_a_sparse_config_json(family, tmp_path):
  """A config.json that leaves sizes out (Google's SigLIP releases do) means
  transformers' defaults; jaxcl reads the same sizes."""
  import transformers
  (tmp_path / 'config.json').write_text(json.dumps({'model_type': family}))
  values = transformers_layout.architecture(tmp_path)
  config = (transformers.CLIPConfig() if family == 'clip' else transformers.SiglipConfig())
  v, x = config.vision_config, config.text_config
  acts = transformers_layout.ACTIVATIONS
  assert values['model.vit.width'] == v.hidden_size
  assert values['model.vit.depth'] == v.num_hidden_layers
  assert values['model.vit.heads'] == v.num_attention_heads
  assert values['model.vit.mlp_dim'] == v.intermediate_size
  assert values['model.vit.patch_size'] == v.patch_size
  assert values['augment.image_size'] == v.image_size
  assert values['model.vit.act'] == acts[v.hidden_act] and values['text.act'] == acts[x.hidden_act]
  assert values['model.vit.norm_eps'] == v.layer_norm_eps
  assert values['text.norm_eps'] == x.layer_norm_eps
  assert values['text.width'] == x.hidden_size and values['text.depth'] == x.num_hidden_layers
  assert values['text.heads'] == x.num_attention_heads
  assert values['text.mlp_dim'] == x.intermediate_size
  assert values['text.max_length'] == x.max_position_embeddings
  if family == 'clip':
    assert values['model.embed_dim'] == config.projection_dim


def test_half_precision_tensors_read_as_torch_widens_them(tmp_path):
  """bfloat16 (which numpy lacks, read from the file's own offsets) and
  float16 tensors become the float32 values torch gives."""
  import torch
  from safetensors.torch import save_file
  torch.manual_seed(0)
  saved = {'a': torch.randn(3, 5).to(torch.bfloat16), 'b': torch.randn(7).half(),
           'c': torch.randn(2, 2)}
  save_file(saved, str(tmp_path / 'w.safetensors'))
  read = tensors.Tensors(tmp_path / 'w.safetensors')
  for key, value in saved.items():
    np.testing.assert_array_equal(read[key], value.float().numpy())
    assert read.shapes[key] == tuple(value.shape)


def test_timm_siglip_definitions_as_the_importer_reads_them():
  """Heads and activation of every timm SigLIP ViT with the map pool, as
  timm defines them (built on the meta device: no weights)."""
  import timm
  import torch
  names = [n for n in timm.list_models('vit_*siglip*') if '_gap_' not in n]
  assert len(names) > 10
  for name in names:
    size = re.fullmatch(layout.TIMM_SIGLIP_NAME, name).group(1)
    with torch.device('meta'):
      model = timm.create_model(name)
    act = model.blocks[0].mlp.act
    tanh = type(act).__name__ == 'GELUTanh' or getattr(act, 'approximate', '') == 'tanh'
    assert tanh == (name in layout.TIMM_SIGLIP_TANH), name
    assert model.blocks[0].attn.num_heads == layout.TIMM_SIGLIP_HEADS[size], name


def test_big_vision_attention_layout_is_flax_linens():
  """big_vision's attention is flax.linen's MultiHeadDotProductAttention:
  its kernels, converted by the big_vision rules, give jaxcl's Attention
  the same outputs (an independent check of the heads-axis convention the
  .npz test above writes by hand)."""
  width, heads = 24, 4
  x = jax.random.normal(jax.random.key(0), (2, 5, width))
  linen = nn.MultiHeadDotProductAttention(num_heads=heads, qkv_features=width, out_features=width)
  variables = linen.init(jax.random.key(1), x, x)
  variables = jax.tree.map(lambda v: v + 0.1 * jax.random.normal(jax.random.key(2), v.shape),
                           variables)
  want = linen.apply(variables, x, x)
  p = {k: np.asarray(v) for k, v in
       ((f'{name}/{leaf}', variables['params'][name][leaf])
        for name in ('query', 'key', 'value', 'out') for leaf in ('kernel', 'bias'))}
  rules = {r.target: r for r in bv._attention('attn', 'mhdpa')}
  ours = transformer.Attention(width, heads, rngs=nnx.Rngs(0), dtype=jnp.float32)
  for target in rules:
    r = rules[target]
    value = r.convert(*(p[s.removeprefix('mhdpa/')] for s in r.sources))
    module = ours.qkv if '/qkv/' in target else ours.out
    getattr(module, target.rsplit('/', 1)[1])[...] = jnp.asarray(value)
  np.testing.assert_allclose(np.asarray(ours(x)), np.asarray(want), atol=1e-5)
