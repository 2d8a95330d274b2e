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

from jaxcl import config as config_lib
from jaxcl import errors, files, models, train

PLATFORMS = ('cpu', 'cuda', 'tpu')


def _export(fn, spec) -> jax.export.Exported:
  return jax.export.export(jax.jit(fn), platforms=PLATFORMS)(spec)


def text_path(output) -> epath.Path:
  """Where a two-tower export puts the text embedder: FILE's name + '.text'."""
  output = epath.Path(output)
  return output.with_name(output.stem + '.text' + output.suffix)


def sentencepiece_path(output) -> epath.Path:
  """Where a two-tower export with a SentencePiece tokenizer copies its model."""
  output = epath.Path(output)
  return output.with_name(output.stem + '.tokenizer.model')


def check_output(workdir, output, *, two_tower: bool, overwrite: bool) -> list[epath.Path]:
  """The paths an export to `output` writes; ConfigError if one would land
  on a folder, on a file of a jaxcl workdir (always refused), or on any
  existing file unless `overwrite`."""
  output = epath.Path(output)
  paths = [output, epath.Path(f'{output}.json')]
  if two_tower:
    paths += [text_path(output), sentencepiece_path(output)]
  for path in paths:
    if path.is_dir():
      raise errors.ConfigError(f'--output {output}: {path} is a directory; give a file name')
    for folder in [path.parent, *path.parent.parents]:
      owner = folder if files.is_run(folder) or files.same_file(folder, workdir) else None
      if owner is not None:
        inside = path.relative_to(owner).parts
        if inside[0] in files.WORKDIR_NAMES:
          raise errors.ConfigError(f'--output {output} would write {path}, where the jaxcl '
                                   f'workdir {owner} keeps its own files; choose another name')
    if path.exists() and not overwrite:
      raise errors.ConfigError(f'--output {output} would replace {path}, which exists; pass '
                               f'--overwrite to replace it')
  try:  # before the model is loaded and lowered: a folder that cannot be written
    probe = output.parent / f'.{output.name}.probe'
    output.parent.mkdir(parents=True, exist_ok=True)
    probe.write_bytes(b'')
    probe.unlink()
  except OSError as e:
    raise errors.ConfigError(f'cannot write --output {output}: '
                             f'{e.strerror or errors.first_line(e)}') from None
  return paths


def export_encoder(workdir, output, *, overwrite: bool = False) -> dict:
  """Writes `output` (the image embedder), for clip/siglip also the text
  embedder (`text_path(output)`) and the tokenizer, and `output`.json
  describing them; returns that metadata. Every file is written under a
  temporary name first and renamed into place only when all are written,
  FILE.json last, so a failed export leaves nothing that looks complete."""
  two_tower = config_lib.load_saved(workdir).method in config_lib.TWO_TOWER
  check_output(workdir, output, two_tower=two_tower, overwrite=overwrite)
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
  artifacts = {epath.Path(output): exported.serialize()}
  if exp.two_tower:
    tokenizer = exp.tokenizer

    def embed_text(ids):
      return exp.embed_text(params, batch_stats, ids)

    text_exported = _export(embed_text,
                            jax.ShapeDtypeStruct((batch, tokenizer.max_length), jnp.int32))
    artifacts[text_path(output)] = text_exported.serialize()
    _, class_names, templates = train.zeroshot_data(config)
    tokenizer_spec = tokenizer.spec()
    if tokenizer_spec['type'] == 'sentencepiece':
      tokenizer_spec['model_file'] = sentencepiece_path(output).name
      artifacts[sentencepiece_path(output)] = tokenizer.model_bytes
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
  artifacts[epath.Path(f'{output}.json')] = (json.dumps(metadata, indent=2) + '\n').encode()
  if jax.process_index() == 0:  # on a pod every process lowers the same artifacts
    try:
      files.write_all_atomically(artifacts)
    except OSError as e:
      raise errors.ConfigError(f'cannot write --output {output}: '
                               f'{e.strerror or errors.first_line(e)}') from None
  return metadata
