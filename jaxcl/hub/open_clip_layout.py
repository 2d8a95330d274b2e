"""open_clip directories (`open_clip_config.json` with `model_cfg` and
`preprocess_cfg`, and `open_clip_model.safetensors`): open_clip's own
towers, and SigLIP with timm's image tower, as open_clip saves them."""

from __future__ import annotations

import dataclasses
import re

from jaxcl import presets
from jaxcl.hub import tensors as t

CONFIG = 'open_clip_config.json'
WEIGHTS = 'open_clip_model.safetensors'
# timm's SigLIP image towers: heads by size (timm's vit_*_siglip_* definitions).
TIMM_SIGLIP_HEADS = {'base': 12, 'large': 16, 'so400m': 16, 'giantopt': 16}
# The timm SigLIP definitions whose MLPs use GELU's tanh approximation (as
# big_vision trained them); the others compute exact GELU, and open_clip's
# forward pass with them is what an import must reproduce (checked against
# timm's definitions in tests/test_import.py).
TIMM_SIGLIP_TANH = frozenset({
    'vit_base_patch32_siglip_256', 'vit_large_patch16_siglip_512',
    'vit_giantopt_patch16_siglip_256', 'vit_giantopt_patch16_siglip_384',
    'vit_so400m_patch16_siglip_256', 'vit_so400m_patch16_siglip_384',
    'vit_so400m_patch16_siglip_512'})
TIMM_SIGLIP_NAME = r'vit_([a-z0-9]+)_patch(\d+)_siglip_(\d+)'  # size, patch, resolution
IGNORED_SUFFIXES = ('attn_mask',)


def matches(source) -> bool:
  return (source / CONFIG).exists()


def _config(source) -> tuple[dict, dict, dict, dict, dict]:
  """(the whole config, model_cfg, preprocess_cfg, vision_cfg, text_cfg) of
  `source`, each checked to be a JSON object."""
  cfg = t.json_object(source / CONFIG)
  if 'model_cfg' not in cfg:
    raise t.SourceError(f'{source / CONFIG} has no model_cfg object')
  m = t.section(cfg, 'model_cfg', f'{CONFIG}: ')
  where = f'{CONFIG}: model_cfg.'
  return (cfg, m, t.section(cfg, 'preprocess_cfg', f'{CONFIG}: '),
          t.section(m, 'vision_cfg', where), t.section(m, 'text_cfg', where))


def architecture(source, keys) -> dict:
  cfg, m, pre, v, x = _config(source)
  unsupported = [f'vision_cfg.{k}' for k in ('ls_init_value', 'attentional_pool', 'hf_model_name')
                 if v.get(k)] + [f'text_cfg.{k}' for k in ('ls_init_value', 'hf_model_name',
                                                          'embed_cls') if x.get(k)]
  if v.get('pool_type', 'tok') != 'tok' and not v.get('timm_model_name') or v.get(
      'global_average_pool'):
    unsupported.append('vision_cfg.pool_type')
  if v.get('no_ln_pre'):
    unsupported.append('vision_cfg.no_ln_pre')
  if unsupported:
    raise t.SourceError(f'{CONFIG}: {unsupported[0]} is an architecture jaxcl does not have')
  siglip = 'logit_bias' in keys
  text_width = x.get('width', 512)
  act = 'quick_gelu' if m.get('quick_gelu') else 'gelu'
  # act_kwargs and norm_kwargs: open_clip's model.py reads null as none given.
  kwargs = lambda cfg, name, key: t.section(cfg, key, f'{CONFIG}: model_cfg.{name}.',
                                            null_is_empty=True)
  tanh = lambda cfg, name: kwargs(cfg, name, 'act_kwargs').get('approximate') == 'tanh'
  text_act = 'gelu_tanh' if tanh(x, 'text_cfg') else act
  pool = {'argmax': 'eot', 'eos': 'eot', 'last': 'last'}.get(x.get('pool_type', 'argmax'))
  if pool == 'eot' and x.get('no_causal_mask'):
    # open_clip then attends to the pads, jaxcl's end-of-text pooling never does.
    raise t.SourceError(f'{CONFIG}: text_cfg.no_causal_mask with pool_type '
                        f'{x.get("pool_type", "argmax")!r} is not an architecture jaxcl has')
  if pool is None:
    raise t.SourceError(f'{CONFIG}: text_cfg.pool_type {x["pool_type"]!r} is not one jaxcl has')
  base = presets.ARCHITECTURES[('ViT-B-16-SigLIP2' if _siglip2(x) else 'ViT-B-16-SigLIP')
                               if siglip else 'ViT-B-16']
  values = dict(base)
  values.update({
      'model.embed_dim': m.get('embed_dim', 512),
      'augment.image_size': _square(v.get('image_size', 224)),
      'text.max_length': x.get('context_length', 77), 'text.width': text_width,
      'text.depth': x.get('layers', 12), 'text.heads': x.get('heads', 8),
      'text.mlp_dim': int(text_width * x.get('mlp_ratio', 4.0)),
      'text.causal': not x.get('no_causal_mask', False), 'text.pool': pool,
      'text.act': text_act,
      'text.norm_eps': kwargs(x, 'text_cfg', 'norm_kwargs').get('eps', 1e-5),
      'text.projection_bias': bool(x.get('proj_bias', False)),
      # open_clip's TextTransformer: 'argmax' pools at the largest id, 'eos' at eos_id.
      'eos_id': int(x.get('eos_id', 2)) if x.get('pool_type') == 'eos' else 'argmax',
      **_tokenizer(cfg, x),
  })
  if v.get('timm_model_name'):
    values.update(_timm_vision(v, keys))
  else:
    width = v.get('width', 768)
    values.update({
        'model.vit.patch_size': v.get('patch_size', 16), 'model.vit.width': width,
        'model.vit.depth': v.get('layers', 12),
        'model.vit.heads': width // v.get('head_width', 64),
        'model.vit.mlp_dim': int(width * v.get('mlp_ratio', 4.0)), 'model.vit.pool': 'cls',
        'model.vit.act': 'gelu_tanh' if tanh(v, 'vision_cfg') else act,
        'model.vit.norm_eps': kwargs(v, 'vision_cfg', 'norm_kwargs').get('eps', 1e-5),
        'model.vit.pre_norm': True, 'model.vit.patch_bias': False,
        'model.image_projection': True,
    })
  if 'mean' in pre and 'std' in pre:
    values['dataset.mean'], values['dataset.std'] = tuple(pre['mean']), tuple(pre['std'])
  return values


def _siglip2(x: dict) -> bool:
  """open_clip's SigLIP 2 (ViT-*-SigLIP2*): Gemma's 256k-token table, named by its tokenizer."""
  return 'siglip2' in str(x.get('hf_tokenizer_name', '')).lower() or x.get('vocab_size') == 256_000


# open_clip's HFTokenizer `clean` -> jaxcl's text.normalize.
CLEAN = {kind: f'open_clip_{kind}' for kind in ('canonicalize', 'lower', 'whitespace')}


def _tokenizer(cfg: dict, x: dict) -> dict:
  """The tokenizer's config values. A jaxcl export records jaxcl's tokenizer
  in its "jaxcl" entry (bytes and plain SentencePiece have no open_clip
  form), and that is the tokenizer; otherwise open_clip's rule: a HF
  tokenizer is SentencePiece (SigLIP's), none CLIP's BPE."""
  spec = exported_tokenizer(cfg)
  if not spec and x.get('hf_tokenizer_name'):
    clean = t.section(x, 'tokenizer_kwargs', f'{CONFIG}: model_cfg.text_cfg.',
                      null_is_empty=True).get('clean')
    if clean is not None and clean not in CLEAN:
      raise t.SourceError(f'{CONFIG}: text_cfg.tokenizer_kwargs.clean {clean!r} is not one of '
                          f'{sorted(CLEAN)}')
    return {'text.tokenizer': 'sentencepiece',
            **({'text.normalize': CLEAN[clean]} if clean is not None else {})}
  if not spec:
    return {'text.tokenizer': 'clip_bpe'}
  kind = spec.get('type')
  if kind not in presets.TOKENIZERS:
    raise t.SourceError(f'{CONFIG}: jaxcl.tokenizer.type {kind!r} is not one of '
                        f'{presets.TOKENIZERS}')
  return {'text.tokenizer': kind, 'text.normalize': spec.get('normalize', ''),
          'text.pad_id': -1 if kind == 'bytes' else spec.get('pad_id', -1)}


def exported_tokenizer(cfg: dict) -> dict:
  """The tokenizer spec a jaxcl export wrote in the config's "jaxcl" entry ({} if none)."""
  return t.section(t.section(cfg, 'jaxcl', f'{CONFIG}: '), 'tokenizer', f'{CONFIG}: jaxcl.')


def _square(size) -> int:
  """open_clip's image_size: an int or a square [h, w]."""
  if isinstance(size, (list, tuple)):
    if len(size) != 2 or size[0] != size[1]:
      raise t.SourceError(f'{CONFIG}: vision_cfg.image_size {size} is not square, which '
                          f'jaxcl\'s ViT needs')
    size = size[0]
  return int(size)


def _timm_vision(v, keys) -> dict:
  name = v['timm_model_name']
  found = re.fullmatch(TIMM_SIGLIP_NAME, name)
  if not found or found.group(1) not in TIMM_SIGLIP_HEADS or v.get('timm_pool') != 'map':
    raise t.SourceError(f'{CONFIG}: vision_cfg.timm_model_name {name!r} with pool '
                        f'{v.get("timm_pool")!r} is not an image tower jaxcl has (timm SigLIP '
                        f'ViTs with the map pool)')
  if v.get('timm_proj', 'linear') != 'none':
    raise t.SourceError(f'{CONFIG}: vision_cfg.timm_proj {v.get("timm_proj")!r} is not one '
                        f'jaxcl has (none)')
  trunk = 'visual.trunk.'
  width = t.shape_of(keys, f'{trunk}pos_embed', WEIGHTS)[-1]
  return {'model.vit.patch_size': int(found.group(2)), 'model.vit.width': width,
          'model.vit.depth': t.count_blocks(keys, f'{trunk}blocks.'),
          'model.vit.heads': TIMM_SIGLIP_HEADS[found.group(1)],
          'model.vit.mlp_dim': t.shape_of(keys, f'{trunk}blocks.0.mlp.fc1.weight', WEIGHTS)[0],
          'model.vit.pool': 'map',
          'model.vit.act': 'gelu_tanh' if name in TIMM_SIGLIP_TANH else 'gelu',
          'model.vit.norm_eps': 1e-6,
          'model.vit.pre_norm': False, 'model.vit.patch_bias': True,
          'model.image_projection': False}



def weights(source):
  return source / WEIGHTS


_BLOCK = dict(norm1='ln_1', norm2='ln_2', out='attn.out_proj', mlp_in='mlp.c_fc',
              mlp_out='mlp.c_proj', qkv='attn.in_proj_', qkv_weight='weight', qkv_bias='bias')
_TIMM_BLOCK = dict(norm1='norm1', norm2='norm2', out='attn.proj', mlp_in='mlp.fc1',
                   mlp_out='mlp.fc2', qkv='attn.qkv.')


@dataclasses.dataclass(frozen=True)
class Layout:
  """What open_clip's tensor names depend on beyond jaxcl's parameters: read
  from a checkpoint's tensor names (`source_layout`) on import, made from a
  jaxcl config on export (jaxcl.hub.open_clip_export)."""
  text_prefix: str  # 'text.': CustomTextCLIP's text tower; '': CLIP's own
  text_depth: int
  image_depth: int
  timm: bool  # a timm SigLIP trunk (visual.trunk.*), else open_clip's ViT (visual.*)
  projection_parameter: bool  # text_projection a [width, embed] parameter, else a Linear
  projection_bias: bool  # the Linear's bias
  logit_bias: bool


def source_layout(values: dict, keys) -> Layout:
  text = 'text.' if any(k.startswith('text.transformer.') for k in keys) else ''
  timm = 'visual.trunk.pos_embed' in keys
  image_blocks = 'visual.trunk.blocks.' if timm else 'visual.transformer.resblocks.'
  return Layout(text_prefix=text, text_depth=t.count_blocks(keys, f'{text}transformer.resblocks.'),
                image_depth=t.count_blocks(keys, image_blocks), timm=timm,
                projection_parameter=f'{text}text_projection' in keys,
                projection_bias=values['text.projection_bias'], logit_bias='logit_bias' in keys)


def rules(values: dict, keys) -> list[t.Rule]:
  return layout_rules(source_layout(values, keys))


def layout_rules(layout: Layout) -> list[t.Rule]:
  text = layout.text_prefix
  r = [t.rule('text_encoder/embed/embedding', f'{text}token_embedding.weight'),
       t.rule('text_encoder/position', f'{text}positional_embedding', t.leading_one),
       *t.norm('text_encoder/norm', f'{text}ln_final'),
       t.rule('temperature/log_tau', 'logit_scale', t.negated_scalar)]
  for i in range(layout.text_depth):
    r += t.block(f'text_encoder/blocks/{i}', f'{text}transformer.resblocks.{i}', _BLOCK)
  if layout.projection_parameter:  # a parameter [width, embed]: x @ proj
    r.append(t.rule('text_proj/kernel', f'{text}text_projection'))
  else:
    r += t.dense('text_proj', f'{text}text_projection', bias=layout.projection_bias)
  if layout.logit_bias:
    r.append(t.rule('bias/value', 'logit_bias', t.scalar))
  if layout.timm:
    return r + _timm_rules(layout.image_depth)
  r += [t.rule('image_encoder/patchify/kernel', 'visual.conv1.weight', t.conv),
        t.rule('image_encoder/cls', 'visual.class_embedding', t.leading_one),
        t.rule('image_encoder/position', 'visual.positional_embedding', t.leading_one),
        *t.norm('image_encoder/pre_norm', 'visual.ln_pre'),
        *t.norm('image_encoder/norm', 'visual.ln_post'),
        t.rule('image_proj/kernel', 'visual.proj')]
  for i in range(layout.image_depth):
    r += t.block(f'image_encoder/blocks/{i}', f'visual.transformer.resblocks.{i}', _BLOCK)
  return r


def _timm_rules(depth: int) -> list[t.Rule]:
  trunk, pool = 'visual.trunk', 'visual.trunk.attn_pool'
  r = [t.rule('image_encoder/patchify/kernel', f'{trunk}.patch_embed.proj.weight', t.conv),
       t.rule('image_encoder/patchify/bias', f'{trunk}.patch_embed.proj.bias'),
       t.rule('image_encoder/position', f'{trunk}.pos_embed'),
       *t.norm('image_encoder/norm', f'{trunk}.norm'),
       t.rule('image_encoder/map_head/probe', f'{pool}.latent'),
       *t.dense('image_encoder/map_head/query', f'{pool}.q'),
       *t.dense('image_encoder/map_head/key_value', f'{pool}.kv'),
       *t.dense('image_encoder/map_head/out', f'{pool}.proj'),
       *t.norm('image_encoder/map_head/norm', f'{pool}.norm'),
       *t.dense('image_encoder/map_head/mlp_in', f'{pool}.mlp.fc1'),
       *t.dense('image_encoder/map_head/mlp_out', f'{pool}.mlp.fc2')]
  for i in range(depth):
    r += t.block(f'image_encoder/blocks/{i}', f'{trunk}.blocks.{i}', _TIMM_BLOCK)
  return r


