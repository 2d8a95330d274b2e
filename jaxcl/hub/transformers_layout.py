"""transformers' CLIPModel, SiglipModel and Siglip2Model directories
(`config.json`, `model.safetensors`, optionally `preprocessor_config.json` and
the tokenizer's files): OpenAI's CLIP, Google's SigLIP and SigLIP 2 as the hub
serves them.

SigLIP 2 comes in two layouts. The fixed-resolution checkpoints
(`google/siglip2-*-224` ...) are SiglipModel directories whose tokenizer is
Gemma's (`tokenizer_config.json` names it); the NaFlex ones
(`google/siglip2-*-naflex`, model_type siglip2) embed flattened patches with a
linear map and resize a learned grid of position embeddings to each image's
patch grid, which jaxcl's ViT does when it is given patches and grids; its
workdir reads data as NaFlex patches within the processor's max_num_patches.
Either
way the text is Gemma's SentencePiece ids of lower-cased text, 64 of them,
padded with 0 (`text.normalize=lower`)."""

from __future__ import annotations

import math

from jaxcl import presets
from jaxcl.hub import tensors as t

CONFIG = 'config.json'
WEIGHTS = 'model.safetensors'
ACTIVATIONS = {'quick_gelu': 'quick_gelu', 'gelu': 'gelu', 'gelu_pytorch_tanh': 'gelu_tanh',
               'gelu_new': 'gelu_tanh'}


def matches(source) -> bool:
  if not (source / CONFIG).exists():
    return False
  return t.json_object(source / CONFIG).get('model_type') in ('clip', 'siglip', 'siglip2')


def _gemma_tokenizer(source, family) -> bool:
  """SigLIP 2's text: every siglip2 model, and a SiglipModel whose tokenizer is Gemma's."""
  if family == 'siglip2':
    return True
  tokenizer_config = source / 'tokenizer_config.json'
  name = (t.json_object(tokenizer_config).get('tokenizer_class') or ''
          if tokenizer_config.exists() else '')
  return name.startswith(('Gemma', 'Siglip2'))


def _act(name, where):
  if name not in ACTIVATIONS:
    raise t.SourceError(f'{CONFIG}: {where}.hidden_act {name!r} is not one jaxcl knows '
                        f'({sorted(ACTIVATIONS)})')
  return ACTIVATIONS[name]


def architecture(source, keys=None) -> dict:
  """The config values (flattened keys) of the model `source` holds."""
  del keys  # config.json says it all
  cfg = t.json_object(source / CONFIG)
  family = cfg['model_type']
  naflex = family == 'siglip2'
  family = 'siglip' if naflex else family
  # transformers' CLIPConfig and SiglipConfig read a null tower config as its defaults.
  v, x = (t.section(cfg, key, f'{CONFIG}: ', null_is_empty=True)
          for key in ('vision_config', 'text_config'))
  defaults = presets.ARCHITECTURES['ViT-B-16' if family == 'clip' else 'ViT-B-16-SigLIP']
  get = lambda group, key, fallback: group.get(key, fallback)
  width, text_width = get(v, 'hidden_size', 768), get(x, 'hidden_size', 512 if family == 'clip'
                                                      else 768)
  values = dict(defaults)
  values.update({
      'augment.image_size': get(v, 'image_size', 224),
      'model.vit.patch_size': get(v, 'patch_size', 32 if family == 'clip' else 16),
      'model.vit.width': width, 'model.vit.depth': get(v, 'num_hidden_layers', 12),
      'model.vit.heads': get(v, 'num_attention_heads', 12),
      'model.vit.mlp_dim': get(v, 'intermediate_size', 3072),
      'model.vit.act': _act(get(v, 'hidden_act', 'quick_gelu' if family == 'clip'
                                else 'gelu_pytorch_tanh'), 'vision_config'),
      'model.vit.norm_eps': get(v, 'layer_norm_eps', 1e-5 if family == 'clip' else 1e-6),
      'text.max_length': get(x, 'max_position_embeddings', 77 if family == 'clip' else 64),
      'text.width': text_width, 'text.depth': get(x, 'num_hidden_layers', 12),
      'text.heads': get(x, 'num_attention_heads', 8 if family == 'clip' else 12),
      'text.mlp_dim': get(x, 'intermediate_size', 2048 if family == 'clip' else 3072),
      'text.act': _act(get(x, 'hidden_act', 'quick_gelu' if family == 'clip'
                           else 'gelu_pytorch_tanh'), 'text_config'),
      'text.norm_eps': get(x, 'layer_norm_eps', 1e-5 if family == 'clip' else 1e-6),
  })
  if family == 'clip':
    values['model.embed_dim'] = cfg.get('projection_dim', 512)
    # CLIPTextTransformer: eos_token_id 2 (configs from before transformers#24773) pools at
    # the largest id, any other at that id; CLIPTextConfig's default is 49407.
    eos = x.get('eos_token_id', 49407)
    values['eos_id'] = 'argmax' if eos == 2 else eos
  else:
    values['model.embed_dim'] = width
    if get(x, 'projection_size', text_width) != width:
      raise t.SourceError(f'{CONFIG}: text_config.projection_size '
                          f'{x["projection_size"]} differs from the image width {width}')
    if not v.get('vision_use_head', True):
      raise t.SourceError(f'{CONFIG}: vision_use_head=false (no attention-pooling head) is '
                          f'not an architecture jaxcl has')
    if _gemma_tokenizer(source, cfg['model_type']):
      values['text.pad_id'], values['text.normalize'] = -1, 'lower'  # the model's pad: 0
  if naflex:
    # The learned position grid is side x side patches; a square image of that many
    # patches is the grid unresized (NaFlex's full grid, which square evaluation uses).
    side = math.isqrt(get(v, 'num_patches', 256))
    if side * side != get(v, 'num_patches', 256):
      raise t.SourceError(f'{CONFIG}: vision_config.num_patches {v["num_patches"]} is not a '
                          f'square grid of position embeddings')
    values['augment.image_size'] = side * values['model.vit.patch_size']
    values['dataset.resolution'] = 'naflex'
    budget = (t.json_object(source / 'preprocessor_config.json').get('max_num_patches', 256)
              if (source / 'preprocessor_config.json').exists() else 256)
    values['dataset.max_patches'] = (int(budget),)
  preprocess = source / 'preprocessor_config.json'
  if preprocess.exists():
    p = t.json_object(preprocess)
    if 'image_mean' in p and 'image_std' in p:
      values['dataset.mean'], values['dataset.std'] = tuple(p['image_mean']), tuple(p['image_std'])
  return values


def weights(source):
  return source / WEIGHTS


_BLOCK = dict(norm1='layer_norm1', norm2='layer_norm2', out='self_attn.out_proj',
              mlp_in='mlp.fc1', mlp_out='mlp.fc2', q='self_attn.q_proj', k='self_attn.k_proj',
              v='self_attn.v_proj')
# Buffers some checkpoints carry, not parameters.
IGNORED_SUFFIXES = ('position_ids',)


def rules(values: dict, keys) -> list[t.Rule]:
  family = values['method']
  vision, text = 'vision_model', 'text_model'
  depth_v = t.count_blocks(keys, f'{vision}.encoder.layers.')
  depth_t = t.count_blocks(keys, f'{text}.encoder.layers.')
  r = [t.rule('image_encoder/patchify/kernel', f'{vision}.embeddings.patch_embedding.weight',
              t.conv),
       t.rule('image_encoder/position', f'{vision}.embeddings.position_embedding.weight',
              t.leading_one),
       *t.norm('image_encoder/norm', f'{vision}.post_layernorm'),
       t.rule('text_encoder/embed/embedding', f'{text}.embeddings.token_embedding.weight'),
       t.rule('text_encoder/position', f'{text}.embeddings.position_embedding.weight',
              t.leading_one),
       *t.norm('text_encoder/norm', f'{text}.final_layer_norm'),
       t.rule('temperature/log_tau', 'logit_scale', t.negated_scalar)]
  for i in range(depth_v):
    r += t.block(f'image_encoder/blocks/{i}', f'{vision}.encoder.layers.{i}', _BLOCK)
  for i in range(depth_t):
    r += t.block(f'text_encoder/blocks/{i}', f'{text}.encoder.layers.{i}', _BLOCK)
  if family == 'clip':
    r += [t.rule('image_encoder/cls', f'{vision}.embeddings.class_embedding', t.leading_one),
          *t.norm('image_encoder/pre_norm', f'{vision}.pre_layrnorm'),
          *t.dense('image_proj', 'visual_projection', bias=False),
          *t.dense('text_proj', 'text_projection', bias=False)]
  else:
    head = f'{vision}.head'
    patch_embedding = f'{vision}.embeddings.patch_embedding.weight'
    if len(keys.get(patch_embedding, ())) == 2:  # NaFlex: a linear map of flattened patches
      r[0] = t.rule('image_encoder/patchify/kernel', patch_embedding,
                    _linear_patch_kernel(values['model.vit.patch_size']))
    r += [t.rule('image_encoder/patchify/bias', f'{vision}.embeddings.patch_embedding.bias'),
          *map_head_rules(f'{head}.probe', f'{head}.attention.in_proj_weight',
                          f'{head}.attention.in_proj_bias', f'{head}.attention.out_proj',
                          f'{head}.layernorm', f'{head}.mlp.fc1', f'{head}.mlp.fc2'),
          *t.dense('text_proj', f'{text}.head'),
          t.rule('bias/value', 'logit_bias', t.scalar)]
  return r


def _linear_patch_kernel(patch: int):
  """Siglip2's patch embedding, a torch Linear [width, p p C]: transposed, as
  naflex_vit's Dense, then tensors.patch_kernel."""
  dense = t.patch_kernel(patch)
  return lambda w: dense(w.T)


def map_head_rules(probe, in_weight, in_bias, out, norm, fc1, fc2) -> list[t.Rule]:
  """SigLIP's attention-pooling head from torch's MultiheadAttention layout:
  in_proj [3 width, width] = [q; k; v]."""
  third = lambda part: lambda w: _thirds(w, part)
  return [t.rule('image_encoder/map_head/probe', probe),
          t.rule('image_encoder/map_head/query/kernel', in_weight, lambda w: third(0)(w).T),
          t.rule('image_encoder/map_head/query/bias', in_bias, third(0)),
          t.rule('image_encoder/map_head/key_value/kernel', in_weight,
                 lambda w: _thirds(w, slice(1, 3)).T),
          t.rule('image_encoder/map_head/key_value/bias', in_bias,
                 lambda b: _thirds(b, slice(1, 3))),
          *t.dense('image_encoder/map_head/out', out),
          *t.norm('image_encoder/map_head/norm', norm),
          *t.dense('image_encoder/map_head/mlp_in', fc1),
          *t.dense('image_encoder/map_head/mlp_out', fc2)]


def _thirds(x, part):
  n = x.shape[0] // 3
  if isinstance(part, int):
    return x[part * n:(part + 1) * n]
  return x[part.start * n:part.stop * n]
