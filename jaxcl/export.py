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

FILE.json beside it describes the input and output. A NaFlex run's image
embedder takes patches [b, n, p p C] (any n) and grids [b, 2], which
jaxcl.data.naflex.to_patches makes on the host (FILE.json's "preprocess").
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
from etils import epath

from jaxcl import config as config_lib, errors, files, methods, models
from jaxcl.trainer import evaluator
from jaxcl.trainer.trained import load_trained
from jaxcl.workdir import run_files

PLATFORMS = ('cpu', 'cuda', 'tpu')


def _export(fn, *specs) -> jax.export.Exported:
  return jax.export.export(jax.jit(fn), platforms=PLATFORMS)(*specs)


def check_output(workdir, output, *, extra_paths=(), overwrite: bool) -> list[epath.Path]:
  """The paths an export to `output` writes (with the method's
  `extra_paths`); ConfigError if one would land on a folder, on a file of a
  jaxcl workdir (always refused), or on any existing file unless `overwrite`."""
  output = epath.Path(output)
  paths = [output, epath.Path(f'{output}.json'), *extra_paths]
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


def _saved_or_read_facts(workdir, exp) -> dict:
  """The data facts the run saved; for a run from before data_facts.json,
  read from the data (which load_trained then opened)."""
  facts = run_files.saved_data_facts(workdir)
  if facts is None:
    facts = run_files.data_facts(exp.info, exp.method.export_facts(exp.config, exp.dataset))
  return facts


def export_encoder(workdir, output, *, overwrite: bool = False,
                   with_temperature: bool = False) -> dict:
  """Writes `output` (the image embedder), for a text tower also the text
  embedder (files.text_artifact_path(output)) and the tokenizer, and `output`.json
  describing them; returns that metadata. with_temperature (a run with
  temperature.mode=predicted): the image embedder returns (embeddings [b, D],
  τ(x) [b]). Every file is written under a
  temporary name first and renamed into place only when all are written,
  FILE.json last, so a failed export leaves nothing that looks complete.
  The dataset need not be on disk: what export needs of it was saved in the
  workdir (data_facts.json)."""
  saved = config_lib.load_saved(workdir)
  method = methods.get(saved.method)
  if with_temperature and saved.temperature.mode != 'predicted':
    raise errors.ConfigError(f'--with_temperature exports a predicted τ(x); {workdir} was '
                             f'trained with temperature.mode={saved.temperature.mode}')
  check_output(workdir, output, extra_paths=method.export_paths(output), overwrite=overwrite)
  exp, state = load_trained(workdir, open_data=False)
  facts = _saved_or_read_facts(workdir, exp)
  params, batch_stats = jax.device_get((state.params, state.batch_stats))
  config = exp.config

  def embed(images):
    embeddings = models.l2_normalize(exp.embed(params, batch_stats, images))
    if with_temperature:
      return embeddings, exp.predicted_temperature(params, batch_stats, images)
    return embeddings

  if exp.patching is None:
    height, width, channels = exp.info.image_shape
    (batch,) = jax.export.symbolic_shape('b')
    exported = _export(embed, jax.ShapeDtypeStruct((batch, height, width, channels), jnp.uint8))
    inputs = {'input': {'shape': ['b', height, width, channels], 'dtype': 'uint8',
                        'description': "images at the dataset's stored resolution, pixel "
                                       'values 0-255'}}
  else:
    exported, inputs = _export_naflex(embed, exp)
  dim = int(exported.out_avals[0].shape[1])
  # τ as the last step used it (learnable: the trained value; cosine: its schedule).
  temperature = evaluator.model_temperature(exp, state)
  metadata = {
      'format': 'jax.export (serialized StableHLO)',
      'load': "jax.export.deserialize(open(FILE, 'rb').read()).call(inputs)",
      'method': config.method,
      **inputs,
      'output': {'shape': ['b', dim], 'dtype': 'float32', 'description': method.image_output},
      'embedding_size': dim,
      'platforms': list(PLATFORMS),
      'config_name': config.get('name', ''),
      'dataset': config.dataset.name,
      'model': config.model.name,
      'step': int(state.step),
      'temperature': temperature,
  }
  if with_temperature:
    metadata['output_temperature'] = {
        'shape': ['b'], 'dtype': 'float32',
        'description': 'the second output: τ(x), the temperature the model predicts for the '
                       'image as a contrastive anchor, in [temperature.min, temperature.max]; '
                       'an uncertainty score (higher: its embedding is less specific)'}
  artifacts = {epath.Path(output): exported.serialize()}
  extra_artifacts, extra_metadata = method.export_artifacts(exp, params, batch_stats, output,
                                                            facts, _export)
  artifacts.update(extra_artifacts)
  metadata.update(extra_metadata)
  artifacts[epath.Path(f'{output}.json')] = (json.dumps(metadata, indent=2) + '\n').encode()
  if jax.process_index() == 0:  # on a pod every process lowers the same artifacts
    try:
      files.write_all_atomically(artifacts)
    except OSError as e:
      raise errors.ConfigError(f'cannot write --output {output}: '
                               f'{e.strerror or errors.first_line(e)}') from None
  return metadata


def _export_naflex(embed, exp):
  """(the image embedder of NaFlex patches [b, n, p p C] and grids [b, 2], any
  n, FILE.json's description of its inputs and of the host's preprocessing)."""
  patch, channels = exp.patching.patch_size, exp.info.image_shape[-1]
  width = patch * patch * channels
  batch, n = jax.export.symbolic_shape('b, n')
  exported = _export(lambda patches, grid: embed({'patches': patches, 'grid': grid}),
                     jax.ShapeDtypeStruct((batch, n, width), jnp.uint8),
                     jax.ShapeDtypeStruct((batch, 2), jnp.int32))
  inputs = {
      'input': {'shape': ['b', 'n', width], 'dtype': 'uint8',
                'description': f'NaFlex patches: each image resized at its aspect ratio to '
                               f'a grid of {patch}x{patch}-pixel patches within n, the patches '
                               f'row by row, each flattened (row, column, channel), pixel '
                               f'values 0-255, zero rows after the image\'s'},
      'input_grid': {'shape': ['b', 2], 'dtype': 'int32',
                     'description': 'each image\'s grid: rows and columns of patches'},
      'preprocess': {'function': 'jaxcl.data.naflex.to_patches(image, patch_size, max_patches)',
                     'patch_size': patch, 'max_patches': list(exp.patching.budgets),
                     'rule': "transformers' Siglip2ImageProcessor: the largest grid within "
                             'max_patches at the image\'s aspect ratio, a bilinear '
                             'antialiased resize'},
  }
  return exported, inputs


def describe(metadata: dict, output) -> str:
  """What export_encoder wrote, for a person: the files and their shapes."""
  grid = (f' and int32 {metadata["input_grid"]["shape"]} (NaFlex patches and grids)'
          if 'input_grid' in metadata else '')
  lines = [f'wrote {output} and {output}.json: uint8 {metadata["input"]["shape"]}{grid} -> '
           f'float32 {metadata["output"]["shape"]}']
  if 'text' in metadata:  # a text tower's embedder, written beside the image one
    text_file = epath.Path(output).with_name(metadata['text']['file'])
    lines.append(f'wrote {text_file}: int32 {metadata["text"]["input"]["shape"]} -> float32 '
                 f'{metadata["text"]["output"]["shape"]} ({metadata["tokenizer"]["type"]} '
                 f'tokenizer in {output}.json)')
  return '\n'.join(lines)
