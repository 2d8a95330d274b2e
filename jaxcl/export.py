"""`jaxcl export`: the trained towers as self-contained jax.export artifacts.

Each artifact is serialized StableHLO with the weights inside and a symbolic
batch dimension. The image embedder takes uint8 images [b, H, W, C] at the
dataset's stored resolution and returns float32 L2-normalized embeddings
[b, D], preprocessing (resize, normalization) included. For clip/siglip a
text embedder (int32 token ids [b, L] -> float32 [b, D], same space) is
written beside it, and FILE.json carries the tokenizer's spec (the
SentencePiece model is copied too) and the zero-shot prompts, so zero-shot
classification needs only the exported files, jax and numpy. Loading:

  import jax, numpy as np
  embed = jax.export.deserialize(open('encoder.jaxexport', 'rb').read())
  z = embed.call(np.zeros((4, 8, 8, 1), np.uint8))  # [4, D], unit rows

FILE.json beside it describes the input and output.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
from etils import epath
from flax import nnx

from jaxcl import models, train

PLATFORMS = ('cpu', 'cuda', 'tpu')


def _export(fn, spec) -> jax.export.Exported:
  return jax.export.export(jax.jit(fn), platforms=PLATFORMS)(spec)


def text_path(output) -> epath.Path:
  """Where a two-tower export puts the text embedder: FILE's name + '.text'."""
  output = epath.Path(output)
  return output.with_name(output.stem + '.text' + output.suffix)


def export_encoder(workdir, output) -> dict:
  """Writes `output` (the image embedder), for clip/siglip also the text
  embedder (`text_path(output)`) and the tokenizer, and `output`.json
  describing them; returns that metadata."""
  exp, state = train.load_trained(workdir)
  params, batch_stats = jax.device_get((state.params, state.batch_stats))
  config = exp.config

  def embed(images):
    return models.l2_normalize(exp.embed(params, batch_stats, images))

  height, width, channels = exp.info.image_shape
  (batch,) = jax.export.symbolic_shape('b')
  exported = _export(embed, jax.ShapeDtypeStruct((batch, height, width, channels), jnp.uint8))
  dim = int(exported.out_avals[0].shape[1])
  # τ as the last step used it (learnable: the trained value; cosine: its schedule).
  temperature = float(nnx.merge(exp.eval_graphdef, params, batch_stats).temperature(state.step))
  metadata = {
      'format': 'jax.export (serialized StableHLO)',
      'load': "jax.export.deserialize(open(FILE, 'rb').read()).call(inputs)",
      'method': config.method,
      'input': {'shape': ['b', height, width, channels], 'dtype': 'uint8',
                'description': 'images at the dataset\'s stored resolution, pixel values 0-255'},
      'output': {'shape': ['b', dim], 'dtype': 'float32',
                 'description': ('L2-normalized image embeddings (the shared image-text space)'
                                 if exp.two_tower else
                                 'L2-normalized encoder features (before the projection head)')},
      'embedding_size': dim,
      'platforms': list(PLATFORMS),
      'config_name': config.get('name', ''),
      'dataset': config.dataset.name,
      'model': config.model.name,
      'step': int(state.step),
      'temperature': temperature,
  }
  files = {epath.Path(output): exported}
  if exp.two_tower:
    tokenizer = exp.tokenizer

    def embed_text(ids):
      return exp.embed_text(params, batch_stats, ids)

    text_exported = _export(embed_text,
                            jax.ShapeDtypeStruct((batch, tokenizer.max_length), jnp.int32))
    files[text_path(output)] = text_exported
    _, class_names, templates = train.zeroshot_data(config)
    tokenizer_spec = tokenizer.spec()
    if tokenizer_spec['type'] == 'sentencepiece':
      tokenizer_spec['model_file'] = epath.Path(output).stem + '.tokenizer.model'
    metadata.update({
        'text': {'file': text_path(output).name,
                 'input': {'shape': ['b', tokenizer.max_length], 'dtype': 'int32',
                           'description': 'token ids from the tokenizer below'},
                 'output': {'shape': ['b', dim], 'dtype': 'float32',
                            'description': 'L2-normalized text embeddings'}},
        'tokenizer': tokenizer_spec,
        'logit_bias': (float(params['bias']['value'][...]) if config.method == 'siglip'
                       else None),
        # The prompts of eval.json's zero-shot classification.
        'zeroshot': {'class_names': list(class_names), 'templates': list(templates)},
    })
  if jax.process_index() == 0:  # on a pod every process lowers the same artifacts
    for path, artifact in files.items():
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_bytes(artifact.serialize())
    if exp.two_tower and metadata['tokenizer']['type'] == 'sentencepiece':
      epath.Path(output).with_name(metadata['tokenizer']['model_file']).write_bytes(
          exp.tokenizer.model_bytes)
    epath.Path(f'{output}.json').write_text(json.dumps(metadata, indent=2) + '\n')
  return metadata
