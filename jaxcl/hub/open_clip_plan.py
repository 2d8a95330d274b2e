"""What of a jaxcl model open_clip can express (`jaxcl export --format
open_clip`, jaxcl.hub.open_clip_export): the open_clip model_cfg, the
tensor layout and the tokenizer files of a config, or a one-line
ConfigError naming the first switch open_clip lacks.

- A ViT with a class token ('cls'), ln_pre, a bias-free patch embedding and
  an image projection is open_clip's own CLIP (quick_gelu: QuickGELU in both
  towers; tanh GELU through act_kwargs).
- A ViT with the 'map' pool, no ln_pre and no image projection is a
  CustomTextCLIP whose image tower is the timm SigLIP ViT of exactly that
  size: open_clip 3 builds timm's definition as named (it passes timm no
  depth or image size), so a tower no timm name describes is refused.
- The text tower: causal and pooled at end-of-text (open_clip's argmax
  pooling when end-of-text is the largest id, else 'eos'), or pooled at the
  last position, causal or not.

Tokenizers: CLIP's BPE vocabulary is copied (bpe_simple_vocab_16e6.txt.gz or
tokenizer.json); open_clip.get_tokenizer('local-dir:DIR') is then open_clip's
SimpleTokenizer with its built-in copy of that vocabulary. A SentencePiece
model with SigLIP's text handling (text.normalize 'siglip') is written as
the transformers SiglipTokenizer that open_clip's HFTokenizer loads from DIR
(text_cfg.hf_tokenizer_name names DIR; for a copy on the Hugging Face hub,
set it to the repository). Other tokenizers (bytes, plain SentencePiece)
have no open_clip equivalent: the export's `tokenizer` line says so, and
the "jaxcl" entry of open_clip_config.json records the tokenizer, which
`jaxcl import` of the directory rebuilds.
"""

from __future__ import annotations

import dataclasses
import json
import re

import sentencepiece

from jaxcl import errors, files, methods, presets
from jaxcl.hub import open_clip_layout as layout_lib

FORMAT = 'open_clip'
BPE_GZ, BPE_JSON, SPIECE, HF_CONFIG = ('bpe_simple_vocab_16e6.txt.gz', 'tokenizer.json',
                                       'spiece.model', 'tokenizer_config.json')
GEMMA = 'tokenizer.model'
# text.normalize -> open_clip's HFTokenizer clean for a Gemma model: the same ids where
# open_clip's own cleaning is the source's, else the nearest (its clean also runs ftfy).
GEMMA_CLEAN = {'open_clip_canonicalize': 'canonicalize', 'siglip': 'canonicalize',
               'open_clip_lower': 'lower', 'lower': 'lower'}
EXPORT_FILES = frozenset({layout_lib.CONFIG, layout_lib.WEIGHTS, BPE_GZ, BPE_JSON, SPIECE,
                          HF_CONFIG})
OPEN_CLIP_EPS = 1e-5  # open_clip's LayerNorm default


@dataclasses.dataclass
class Plan:
  """What an export writes besides the weights."""
  model_cfg: dict
  layout: layout_lib.Layout
  tokenizer_files: dict  # file name -> bytes
  tokenizer: str  # how to tokenize for the exported model
  notes: list


def refuse(what: str):
  raise errors.ConfigError(f'--format {FORMAT}: {what}')


def _ratio(width: int, mlp_dim: int, where: str) -> float:
  ratio = mlp_dim / width
  if int(width * ratio) != mlp_dim:  # open_clip's MLP width: int(width * mlp_ratio)
    refuse(f'{where}.mlp_dim {mlp_dim} is no width x mlp_ratio open_clip builds')
  return ratio


def _tanh(act: str) -> dict:
  return {'act_kwargs': {'approximate': 'tanh'}} if act == 'gelu_tanh' else {}


def _eps(eps: float) -> dict:
  return {} if eps == OPEN_CLIP_EPS else {'norm_kwargs': {'eps': eps}}


def _text_cfg(x, tokenizer) -> dict:
  cfg = {'context_length': tokenizer.max_length, 'vocab_size': tokenizer.vocab_size,
         'width': x.width, 'heads': x.heads, 'layers': x.depth,
         'mlp_ratio': _ratio(x.width, x.mlp_dim, 'text'), **_eps(x.norm_eps), **_tanh(x.act)}
  if x.pool == 'eot':
    if not x.causal:
      refuse("text.pool 'eot' with text.causal False: jaxcl masks the keys after the "
             "end-of-text token, open_clip's bidirectional text tower attends to them")
    if tokenizer.eot_id != tokenizer.vocab_size - 1:  # argmax pooling finds the largest id
      cfg.update(pool_type='eos', eos_id=tokenizer.eot_id)
  else:
    cfg.update(pool_type='last', no_causal_mask=not x.causal)
  if x.projection_bias:
    cfg['proj_bias'] = True
  return cfg


def _clip_vision(config, sizes) -> dict:
  v, x = config.model.vit, config.text
  if not v.pre_norm:
    refuse("model.vit.pre_norm False: open_clip's class-token ViT has a LayerNorm before "
           "its blocks (ln_pre)")
  if v.patch_bias:
    refuse("model.vit.patch_bias True: open_clip's ViT embeds patches without a bias")
  if not config.model.image_projection:
    refuse("model.image_projection False: open_clip's class-token ViT ends in a projection")
  if (v.act == 'quick_gelu') != (x.act == 'quick_gelu'):
    refuse(f"model.vit.act {v.act!r} with text.act {x.act!r}: open_clip's quick_gelu "
           f"switch sets both towers' activation")
  return {'image_size': config.augment.image_size, 'layers': sizes['depth'],
          'width': sizes['width'], 'head_width': sizes['width'] // sizes['heads'],
          'mlp_ratio': _ratio(sizes['width'], sizes['mlp_dim'], 'model.vit'),
          'patch_size': sizes['patch_size'], **_eps(v.norm_eps), **_tanh(v.act)}


def _timm_act(module) -> str:
  name = type(module).__name__
  if name == 'QuickGELU':
    return 'quick_gelu'
  return 'gelu_tanh' if 'Tanh' in name or getattr(module, 'approximate', '') == 'tanh' else 'gelu'


def _timm_dims(model) -> dict:
  """What of a timm VisionTransformer (built on the meta device) jaxcl's 'map' ViT must match."""
  block = model.blocks[0]
  siglip_layout = (model.cls_token is None and not getattr(model, 'num_reg_tokens', 0)
            and type(model.norm_pre).__name__ == 'Identity' and model.global_pool == 'map'
            and model.patch_embed.proj.bias is not None
            and model.attn_pool.mlp.fc1.out_features == block.mlp.fc1.out_features)
  return {'width': model.embed_dim, 'depth': len(model.blocks), 'heads': block.attn.num_heads,
          'mlp_dim': block.mlp.fc1.out_features, 'act': _timm_act(block.mlp.act),
          'norm_eps': model.norm.eps, 'siglip_layout': siglip_layout}


def timm_trunk_name(sizes: dict, image_size: int, act: str, norm_eps: float, notes: list) -> str:
  """The timm SigLIP ViT that is jaxcl's 'map' ViT of these sizes, looked up
  in timm (models built on torch's meta device: no weights are made)."""
  try:
    import timm
    import torch
  except ImportError:
    refuse("a 'map'-pooled ViT exports as a timm SigLIP tower, and finding its timm name "
           "needs timm (pip install timm)")
  p = sizes['patch_size']
  names = []
  for name in timm.list_models('vit_*_siglip_*'):
    found = re.fullmatch(layout_lib.TIMM_SIGLIP_NAME, name)
    if (found and found.group(1) in layout_lib.TIMM_SIGLIP_HEADS
        and int(found.group(2)) == p and int(found.group(3)) == image_size):
      names.append(name)
  if not names:
    refuse(f"no timm SigLIP ViT has patch {p} at {image_size} px (open_clip builds timm's "
           f"definition as named, at its own size)")
  want = {**{k: sizes[k] for k in ('width', 'depth', 'heads', 'mlp_dim')}, 'act': act,
          'norm_eps': norm_eps, 'siglip_layout': True}
  differences = {}
  for name in names:
    with torch.device('meta'):
      dims = _timm_dims(timm.create_model(name))
    differ = {k: dims[k] for k in want if dims[k] != want[k]}
    if differ == {'act': 'gelu'} and act == 'gelu_tanh':
      notes.append(f'timm\'s {name} computes exact GELU where this tower (as SigLIP was '
                   f'trained, and as jaxcl imports {name}) uses its tanh approximation: '
                   f'open_clip\'s image embeddings differ from jaxcl\'s by that approximation')
      return name
    if not differ:
      return name
    differences[name] = differ
  name, differ = min(differences.items(), key=lambda item: len(item[1]))
  refuse(f"no timm SigLIP ViT at patch {p}, {image_size} px has this tower's "
         + ', '.join(f'{k} {want[k]}' for k in differ) + f' ({name}: '
         + ', '.join(f'{k} {v}' for k, v in differ.items()) + ')')


def _siglip_vision(config, sizes, timm_model_name, notes) -> dict:
  v = config.model.vit
  if config.model.image_projection:
    refuse("model.image_projection True with model.vit.pool 'map': open_clip's timm SigLIP "
           "towers end at their attention-pool head")
  if v.pre_norm:
    refuse("model.vit.pre_norm True with model.vit.pool 'map': timm's SigLIP ViTs have no "
           "LayerNorm before their blocks")
  if not v.patch_bias:
    refuse("model.vit.patch_bias False with model.vit.pool 'map': timm's SigLIP ViTs embed "
           "patches with a bias")
  size = config.augment.image_size
  name = timm_model_name or timm_trunk_name(sizes, size, v.act, v.norm_eps, notes)
  return {'image_size': size, 'timm_model_name': name, 'timm_model_pretrained': False,
          'timm_pool': 'map', 'timm_proj': 'none'}


def _tokenizer(tokenizer, text_cfg: dict, output) -> tuple[dict, str]:
  """(files, how to tokenize) of the exported model; sets text_cfg's tokenizer keys."""
  kind = tokenizer.spec()['type']
  if kind == 'clip_bpe':
    name = BPE_GZ if tokenizer.vocab_name == files.CLIP_BPE_GZ_FILE else BPE_JSON
    return {name: tokenizer.vocab_bytes}, (
        f"open_clip.get_tokenizer('local-dir:{output}') (open_clip's SimpleTokenizer with its "
        f"built-in CLIP BPE; the run's own vocabulary is {name} there)")
  sp = (sentencepiece.SentencePieceProcessor(model_proto=tokenizer.model_bytes)
        if kind == 'sentencepiece' else None)
  clean = GEMMA_CLEAN.get(tokenizer.normalize) if kind == 'sentencepiece' else None
  if clean and sp.id_to_piece(tokenizer.eot_id) == '<eos>':  # SigLIP 2's Gemma model
    hf = {'tokenizer_class': 'GemmaTokenizer', 'model_max_length': tokenizer.max_length,
          'add_bos_token': False, 'add_eos_token': True, 'padding_side': 'right'}
    text_cfg.update(hf_tokenizer_name=str(output), tokenizer_kwargs={'clean': clean})
    return {GEMMA: tokenizer.model_bytes, HF_CONFIG: (json.dumps(hf, indent=2) + '\n').encode()
            }, (f"open_clip.get_tokenizer('local-dir:{output}') (transformers' GemmaTokenizer "
                f"over {GEMMA}, open_clip's clean={clean!r})")
  if kind == 'sentencepiece' and tokenizer.normalize in ('siglip', 'open_clip_canonicalize'):
    piece = lambda i: sp.id_to_piece(i)
    hf = {'tokenizer_class': 'SiglipTokenizer', 'model_max_length': tokenizer.max_length,
          'do_lower_case': True, 'eos_token': piece(tokenizer.eot_id),
          'pad_token': piece(tokenizer.pad_id), 'unk_token': piece(sp.unk_id())}
    text_cfg.update(hf_tokenizer_name=str(output), tokenizer_kwargs={'clean': 'canonicalize'})
    return {SPIECE: tokenizer.model_bytes, HF_CONFIG: (json.dumps(hf, indent=2) + '\n').encode()
            }, (f"open_clip.get_tokenizer('local-dir:{output}') (transformers' SiglipTokenizer "
                f'over {SPIECE}; needs transformers and sentencepiece)')
  extra = {SPIECE: tokenizer.model_bytes} if kind == 'sentencepiece' else {}
  return extra, (f'open_clip has no tokenizer for this model\'s {kind} ids (its get_tokenizer '
                 f'would give CLIP\'s BPE ids): tokenize with jaxcl; open_clip_config.json\'s '
                 f'"jaxcl" entry records the tokenizer, and jaxcl import reads it back')


def plan(config, tokenizer, output, *, timm_model_name: str | None = None) -> Plan:
  """The open_clip model that is the jaxcl model of `config`; ConfigError
  naming the first thing open_clip cannot express. timm_model_name: the timm
  trunk to name for a 'map' ViT, as given (for a caller that builds the trunk
  itself); None looks up the timm definition that matches exactly."""
  if not methods.get(config.method).text_tower:
    refuse(f'the {config.method} model has no text tower; open_clip models pair an image '
           f'and a text tower')
  m, x = config.model, config.text
  if config.dataset.resolution == 'naflex':
    refuse('a NaFlex model (dataset.resolution=naflex): open_clip has no NaFlex towers '
           '(3.3.0); `jaxcl export` without --format writes its embedders for any budget')
  if m.name not in presets.VIT_NAMES:
    refuse(f"model.name {m.name!r}: open_clip's ResNet (ModifiedResNet) is not jaxcl's; "
           f"only ViT image towers export")
  sizes, notes = presets.vit_sizes(m), []
  text_cfg = _text_cfg(x, tokenizer)
  if m.vit.pool == 'cls':
    model_cfg = {'embed_dim': m.embed_dim, 'quick_gelu': m.vit.act == 'quick_gelu',
                 'vision_cfg': _clip_vision(config, sizes), 'text_cfg': text_cfg}
  elif m.vit.pool == 'map':
    model_cfg = {'embed_dim': m.embed_dim, 'quick_gelu': x.act == 'quick_gelu',
                 'custom_text': True,
                 'vision_cfg': _siglip_vision(config, sizes, timm_model_name, notes),
                 'text_cfg': text_cfg}
  else:
    refuse(f"model.vit.pool {m.vit.pool!r}: open_clip's ViTs pool at a class token ('cls') "
           f"or, as timm SigLIP towers, with an attention probe ('map')")
  layout = layout_lib.Layout(
      text_prefix='text.' if m.vit.pool == 'map' else '', text_depth=x.depth,
      image_depth=sizes['depth'], timm=m.vit.pool == 'map',
      projection_parameter=not x.projection_bias, projection_bias=x.projection_bias,
      logit_bias=False)  # set from the parameters (a SigLIP bias) once they are loaded
  tokenizer_files, how = _tokenizer(tokenizer, text_cfg, output)
  return Plan(model_cfg, layout, tokenizer_files, how, notes)


