"""big_vision's SigLIP and SigLIP 2 checkpoints: one `.npz` of flattened parameter names
(`params/img/...`, `params/txt/...`, `params/t`, `params/b`) as its
`utils.save_checkpoint` writes them, beside its SentencePiece model.

The .npz carries no config; its tensors carry the architecture: the
attention kernels keep their heads axis ([width, heads, head dim]), the
patch embedding its size, the position embeddings the image size and the
text length, the blocks their number. So SOURCE is the .npz (or a directory
holding one), and the config big_vision trained it with is read from its
shapes: ViT with a MAP head, a bidirectional text Transformer pooled at its
last token with a biased head (big_vision's `two_towers` with
`text_transformer`, pool_type 'last'). SigLIP 2's NaFlex towers
(`naflex_vit`) embed flattened patches with a Dense and keep their
position embeddings as a [g, g, width] grid; SigLIP 2's text is Gemma's
256k-token table of lower-cased text.
"""

from __future__ import annotations

import math

import numpy as np

from jaxcl import presets
from jaxcl.hub import tensors as t

IGNORED_SUFFIXES = ()
GEMMA_VOCABULARY = 256_000  # SigLIP 2's text table (SigLIP's c4_en: 32,000)


def _npz(source):
  if source.suffix == '.npz':
    return source
  found = sorted(source.glob('*.npz')) if source.is_dir() else []
  return found[0] if len(found) == 1 else None


def matches(source) -> bool:
  return _npz(source) is not None


def weights(source):
  return _npz(source)


def _prefix(keys) -> str:
  return 'params/' if any(k.startswith('params/') for k in keys) else ''



def architecture(source, keys) -> dict:
  p = _prefix(keys)
  shape = lambda key: t.shape_of(keys, key, 'the .npz')
  img, txt = f'{p}img/Transformer/encoderblock_', f'{p}txt/Encoder_0/encoderblock_'
  if f'{p}img/head/kernel' in keys:
    raise t.SourceError(f'tensor {p}img/head/kernel: an image head after the MAP pooling is '
                        f'not an architecture jaxcl has')
  embedding, positions = shape(f'{p}img/embedding/kernel'), shape(f'{p}img/pos_embedding')
  naflex = len(embedding) == 2  # naflex_vit: a Dense over flattened RGB patches, a grid
  if naflex:
    patch, side = math.isqrt(embedding[0] // 3), positions[0]
    width = embedding[1]
  else:
    patch, _, _, width = embedding
    side = math.isqrt(positions[1])
    if side * side != positions[1]:
      raise t.SourceError(f'tensor {p}img/pos_embedding: {positions[1]} positions are no '
                          f'square grid (a class token is not an architecture jaxcl reads '
                          f'from big_vision)')
  _, heads, _ = shape(f'{img}0/MultiHeadDotProductAttention_0/query/kernel')
  text_width = shape(f'{p}txt/Embed_0/embedding')[1]
  _, text_heads, _ = shape(f'{txt}0/MultiHeadDotProductAttention_0/query/kernel')
  values = dict(presets.ARCHITECTURES['ViT-B-16-SigLIP'])
  values.update({
      'model.vit.patch_size': patch, 'model.vit.width': width,
      'model.vit.depth': t.count_blocks(keys, img), 'model.vit.heads': heads,
      'model.vit.mlp_dim': shape(f'{img}0/MlpBlock_0/Dense_0/kernel')[1],
      'augment.image_size': side * patch, 'model.embed_dim': width,
      'text.max_length': shape(f'{p}txt/pos_embedding')[1], 'text.width': text_width,
      'text.depth': t.count_blocks(keys, txt), 'text.heads': text_heads,
      'text.mlp_dim': shape(f'{txt}0/MlpBlock_0/Dense_0/kernel')[1],
      'text.act': 'gelu_tanh',  # flax's nn.gelu, big_vision's MLP
  })
  if naflex or shape(f'{p}txt/Embed_0/embedding')[0] == GEMMA_VOCABULARY:  # SigLIP 2
    values.update({'text.pad_id': -1, 'text.normalize': 'lower'})  # Gemma's pad, 0
  if naflex:  # its training budgets are not in the file: SigLIP 2's default, 256
    values.update({'dataset.resolution': 'naflex', 'dataset.max_patches': (256,)})
  return values


def _flatten_heads(x):  # query/key/value kernel [d, heads, hd] -> [d, heads*hd]; bias -> [heads*hd]
  return x.reshape(x.shape[0], -1) if x.ndim == 3 else x.reshape(-1)


def _fused(*xs):
  return _concat_last([_flatten_heads(x) for x in xs])


def _concat_last(xs):
  return np.concatenate(xs, axis=-1)


def _out_kernel(x):  # [heads, hd, d] -> [heads*hd, d]
  return x.reshape(-1, x.shape[-1])


def _attention(target, source) -> list[t.Rule]:
  """big_vision's MultiHeadDotProductAttention as one fused qkv and out."""
  qkv = [f'{source}/{n}' for n in ('query', 'key', 'value')]
  return [t.rule(f'{target}/qkv/kernel', [f'{s}/kernel' for s in qkv], _fused),
          t.rule(f'{target}/qkv/bias', [f'{s}/bias' for s in qkv], _fused),
          t.rule(f'{target}/out/kernel', f'{source}/out/kernel', _out_kernel),
          t.rule(f'{target}/out/bias', f'{source}/out/bias')]


def _flax(target, source, kind) -> list[t.Rule]:
  names = ('scale', 'bias') if kind == 'norm' else ('kernel', 'bias')
  return [t.rule(f'{target}/{n}', f'{source}/{n}') for n in names]


def _block(target, source) -> list[t.Rule]:
  return (_flax(f'{target}/norm1', f'{source}/LayerNorm_0', 'norm')
          + _flax(f'{target}/norm2', f'{source}/LayerNorm_1', 'norm')
          + _attention(f'{target}/attention', f'{source}/MultiHeadDotProductAttention_0')
          + _flax(f'{target}/mlp_in', f'{source}/MlpBlock_0/Dense_0', 'dense')
          + _flax(f'{target}/mlp_out', f'{source}/MlpBlock_0/Dense_1', 'dense'))


def _grid(x):  # naflex_vit's position grid [g, g, width] -> [1, g g, width]
  return x.reshape(1, -1, x.shape[-1])


def rules(values: dict, keys) -> list[t.Rule]:
  p = _prefix(keys)
  img, txt, head = f'{p}img/Transformer', f'{p}txt/Encoder_0', f'{p}img/MAPHead_0'
  attention = f'{head}/MultiHeadDotProductAttention_0'
  naflex = len(keys.get(f'{p}img/embedding/kernel', ())) == 2
  r = [*_flax('image_encoder/patchify', f'{p}img/embedding', 'dense'),
       t.rule('image_encoder/position', f'{p}img/pos_embedding', _grid if naflex else t.same),
       *_flax('image_encoder/norm', f'{img}/encoder_norm', 'norm'),
       t.rule('image_encoder/map_head/probe', f'{head}/probe'),
       t.rule('image_encoder/map_head/query/kernel', f'{attention}/query/kernel', _flatten_heads),
       t.rule('image_encoder/map_head/query/bias', f'{attention}/query/bias', _flatten_heads),
       t.rule('image_encoder/map_head/key_value/kernel',
              [f'{attention}/key/kernel', f'{attention}/value/kernel'], _fused),
       t.rule('image_encoder/map_head/key_value/bias',
              [f'{attention}/key/bias', f'{attention}/value/bias'], _fused),
       t.rule('image_encoder/map_head/out/kernel', f'{attention}/out/kernel', _out_kernel),
       t.rule('image_encoder/map_head/out/bias', f'{attention}/out/bias'),
       *_flax('image_encoder/map_head/norm', f'{head}/LayerNorm_0', 'norm'),
       *_flax('image_encoder/map_head/mlp_in', f'{head}/MlpBlock_0/Dense_0', 'dense'),
       *_flax('image_encoder/map_head/mlp_out', f'{head}/MlpBlock_0/Dense_1', 'dense'),
       t.rule('text_encoder/embed/embedding', f'{p}txt/Embed_0/embedding'),
       t.rule('text_encoder/position', f'{p}txt/pos_embedding'),
       *_flax('text_encoder/norm', f'{txt}/encoder_norm', 'norm'),
       *_flax('text_proj', f'{p}txt/head', 'dense'),
       t.rule('temperature/log_tau', f'{p}t', t.negated_scalar),
       t.rule('bias/value', f'{p}b', t.scalar)]
  if naflex:
    r[0] = t.rule('image_encoder/patchify/kernel', f'{p}img/embedding/kernel',
                  t.patch_kernel(values['model.vit.patch_size']))
  for i in range(t.count_blocks(keys, f'{img}/encoderblock_')):
    r += _block(f'image_encoder/blocks/{i}', f'{img}/encoderblock_{i}')
  for i in range(t.count_blocks(keys, f'{txt}/encoderblock_')):
    r += _block(f'text_encoder/blocks/{i}', f'{txt}/encoderblock_{i}')
  return r
