"""The registry of contrastive methods: `config.method` -> its Method object.

Everything that differs between methods lives in one object per method
(jaxcl.methods.base.Method): the batch it reads, its views, its model, its
loss, its evaluation and what export writes. The rest of jaxcl asks the
object, never the method's name. Adding a method is one module with a
`METHOD` object and one line here.

Importing this package loads no jax: config validation reads `NAMES`, and
`get` imports a method's module only when it is asked for.
"""

from __future__ import annotations

import importlib

from jaxcl import errors

_MODULES = {
    'simclr': 'jaxcl.methods.simclr',  # two augmented views of an image, NT-Xent
    'clip': 'jaxcl.methods.clip',  # image and caption, softmax InfoNCE both ways
    'siglip': 'jaxcl.methods.siglip',  # image and caption, pairwise sigmoid
}
NAMES = tuple(_MODULES)


def get(name: str):
  """The Method object registered as `name`; ConfigError if there is none."""
  if name not in _MODULES:
    raise errors.ConfigError(f'method must be one of {NAMES}, got {name!r}')
  return importlib.import_module(_MODULES[name]).METHOD
