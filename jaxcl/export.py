"""`jaxcl export`: the trained encoder as a self-contained jax.export artifact.

The artifact is serialized StableHLO with the weights inside and a symbolic
batch dimension: uint8 images [b, H, W, C] at the dataset's stored resolution
in, float32 L2-normalized embeddings [b, D] out, preprocessing (resize,
normalization) included. Loading it needs only jax:

  import jax, numpy as np
  embed = jax.export.deserialize(open('encoder.jaxexport', 'rb').read())
  z = embed.call(np.zeros((4, 8, 8, 1), np.uint8))  # [4, D], unit rows

FILE.json beside it describes the input and output.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from jaxcl import models, train

PLATFORMS = ('cpu', 'cuda', 'tpu')


def export_encoder(workdir, output) -> dict:
  """Writes `output` (the artifact) and `output`.json; returns the metadata."""
  exp, state = train.load_trained(workdir)
  params, batch_stats = jax.device_get((state.params, state.batch_stats))

  def embed(images):
    return models.l2_normalize(exp.embed(params, batch_stats, images))

  height, width, channels = exp.info.image_shape
  (batch,) = jax.export.symbolic_shape('b')
  spec = jax.ShapeDtypeStruct((batch, height, width, channels), jnp.uint8)
  exported = jax.export.export(jax.jit(embed), platforms=PLATFORMS)(spec)
  dim = int(exported.out_avals[0].shape[1])
  metadata = {
      'format': 'jax.export (serialized StableHLO)',
      'load': "jax.export.deserialize(open(FILE, 'rb').read()).call(images)",
      'input': {'shape': ['b', height, width, channels], 'dtype': 'uint8',
                'description': 'images at the dataset\'s stored resolution, pixel values 0-255'},
      'output': {'shape': ['b', dim], 'dtype': 'float32',
                 'description': 'L2-normalized encoder features (before the projection head)'},
      'embedding_size': dim,
      'platforms': list(PLATFORMS),
      'config_name': exp.config.get('name', ''),
      'dataset': exp.config.dataset.name,
      'model': exp.config.model.name,
      'step': int(state.step),
      'temperature': float(np.exp(params['temperature']['log_tau'][...]))
                     if exp.config.temperature.mode == 'learnable' else exp.config.temperature.init,
  }
  if jax.process_index() == 0:  # on a pod every process lowers the same artifact
    output = epath.Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(exported.serialize())
    epath.Path(f'{output}.json').write_text(json.dumps(metadata, indent=2) + '\n')
  return metadata
