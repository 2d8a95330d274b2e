"""`init.source`: a fresh run's weights taken from a trained jaxcl run or a
published checkpoint (what `jaxcl import` reads), all of them or the parts
`init.load` names.

Parts are found by role (Method.towers): loading 'image' from a SimCLR run
into CLIP copies its `encoder` into CLIP's `image_encoder` (LiT's locked
image tower), batch-norm statistics included; CLIP's `image_proj`, which
SimCLR lacks, keeps its initialization. A ViT's position embeddings are
resampled (bilinear, class token kept) when the image size changed; any
other difference of shape is an error naming the parameter.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from jaxcl import errors, files, name_patterns
from jaxcl.hub import importer
from jaxcl.models import param_groups
from jaxcl.trainer import trained


def _source(path):
  """(params, batch_stats, method, tokenizer) of a workdir or a checkpoint directory."""
  if not epath.Path(path).is_dir():
    raise errors.ConfigError(f'init.source {path} is not a directory (a jaxcl workdir or a '
                             f'checkpoint directory jaxcl import reads)')
  if files.is_run(path):
    exp, state = trained.load_trained(path, open_data=False)
  else:
    _, _, exp, state = importer.load_source(path)
  return _host(state.params), _host(state.batch_stats), exp.method, exp.tokenizer


def _host(state) -> dict:
  """{name: numpy array} of a state's leaves, whole on every process (with
  FSDP over hosts no process holds a whole array: it is gathered leaf by leaf)."""
  def whole(x):
    if jax.process_count() > 1 and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))
  return {param_groups.path_name(p): whole(v)
          for p, v in jax.tree_util.tree_flatten_with_path(state)[0]}


def _renames(path, load, source_method, method, source_names) -> list[tuple[str, str]]:
  """[(source prefix, this model's prefix)] of the parts `load` names: each
  role both methods know and the source has parameters for (a published
  SigLIP image tower has no projection; this model's keeps its init)."""
  has = lambda prefix: any(n == prefix or n.startswith(prefix + '/') for n in source_names)
  pairs = []
  for part in load:
    mine, theirs = method.towers.get(part, {}), source_method.towers.get(part, {})
    if not mine:
      raise errors.ConfigError(f'init.load: this model ({method.name}) has no {part!r} part')
    found = [(theirs[role], prefix) for role, prefix in mine.items()
             if role in theirs and has(theirs[role])]
    if not found:
      raise errors.ConfigError(f'init.load: init.source {path} ({source_method.name}) has no '
                               f'{part!r} part')
    pairs += found
  return pairs


def _source_name(name, renames):
  """The source's name for this model's parameter `name`, or None (not loaded)."""
  if renames is None:
    return name
  for theirs, mine in renames:
    if name == mine or name.startswith(mine + '/'):
      return theirs + name[len(mine):]
  return None


def resample_positions(position, shape):
  """ViT position embeddings [1, T, W] resampled to `shape` [1, T', W]: the
  patch grid resized bilinearly, a leading class token kept as it is."""
  def layout(tokens):
    for extra in (0, 1):
      side = math.isqrt(tokens - extra)
      if side * side == tokens - extra:
        return extra, side
    return None, None
  (extra, side), (extra_to, side_to) = layout(position.shape[1]), layout(shape[1])
  if extra is None or extra != extra_to or position.shape[2] != shape[2]:
    return None
  grid = position[0, extra:].reshape(side, side, -1)
  grid = jax.image.resize(jnp.asarray(grid, jnp.float32), (side_to, side_to, grid.shape[-1]),
                          method='bilinear')
  return np.concatenate([position[:, :extra], np.asarray(grid).reshape(1, -1, shape[2])], 1)


def _take(name, mine, source, their_name, path, image_encoder):
  value = source[their_name]
  if value.shape == tuple(mine.shape):
    return value
  resampled = (resample_positions(value, tuple(mine.shape))
               if name == f'{image_encoder}/position' else None)
  if resampled is None:
    raise errors.ConfigError(f'init.source {path}: {their_name} has shape {value.shape}, this '
                             f'model\'s {name} {tuple(mine.shape)}')
  return resampled


def _fill(state, source: dict, renames, path, everything: bool, image_encoder: str):
  """`state` (params or batch stats, on the mesh) with the loaded leaves
  replaced, each made in its own sharding from the host copy."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
  names = [param_groups.path_name(p) for p, _ in leaves]
  out, used = [], set()
  for name, (_, leaf) in zip(names, leaves):
    theirs = _source_name(name, renames)
    if theirs is not None and theirs not in source:
      raise errors.ConfigError(f'init.source {path} has no {theirs} for this model\'s {name}'
                               + ('' if renames else '; name the parts to load in init.load'))
    used.add(theirs)
    if theirs is None:
      out.append(leaf)
      continue
    value = np.asarray(_take(name, leaf, source, theirs, path, image_encoder), leaf.dtype)
    out.append(jax.make_array_from_callback(value.shape, leaf.sharding, lambda i, v=value: v[i]))
  extra = sorted(set(source) - used)
  if everything and extra:
    raise errors.ConfigError(f'init.source {path} has {extra[0]}, which this model lacks; name '
                             f'the parts to load in init.load')
  return jax.tree_util.tree_unflatten(treedef, out)


def initial_state(exp):
  """The state a fresh run starts from: initialized, then with init.source's
  weights where init.load says."""
  path = exp.config.init.source
  if not path:
    return exp.init_state()
  load = name_patterns.as_patterns(exp.config.init.load)
  # The source and what is taken from it are checked before the model is
  # initialized (the slow part of a fresh start): a wrong one is refused at once.
  params, stats, source_method, tokenizer = _source(path)
  renames = _renames(path, load, source_method, exp.method, params) if load else None
  if exp.method.text_tower and (not load or 'text' in load):
    _check_same_tokenizer(path, tokenizer, exp.tokenizer)
  state = exp.init_state()
  fill = functools.partial(_fill, source=None, renames=renames, path=path, everything=not load,
                           image_encoder=exp.method.towers['image']['encoder'])
  new_params = fill(state.params, source=params)
  _check_filled(path, load, renames, exp.method, new_params)
  return state.replace(params=new_params, batch_stats=fill(state.batch_stats, source=stats))


def _check_filled(path, load, renames, method, params) -> None:
  """Each part init.load names must land on parameters of this model (a
  fixed τ has none: loading it would do nothing)."""
  names = param_groups.names(params)
  for part in load:
    prefixes = [mine for _, mine in renames if mine in method.towers.get(part, {}).values()]
    if not any(n == p or n.startswith(p + '/') for n in names for p in prefixes):
      raise errors.ConfigError(f'init.load {part!r}: this model has no parameters for it '
                               f'(temperature.mode fixed or cosine has no learned τ)')


def _check_same_tokenizer(path, theirs, mine):
  """A text tower is only the same tower with the same token ids."""
  if theirs is None:
    raise errors.ConfigError(f'init.source {path} has no text tower to load')
  a, b = theirs.spec(), mine.spec()
  differ = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k)
                  and k not in ('model_file', 'vocab_file'))
  if differ:
    k = differ[0]
    raise errors.ConfigError(f'init.source {path}: its text tower was trained with another '
                             f'tokenizer ({k}: {a.get(k)!r} there, {b.get(k)!r} in this config); '
                             f'use the same text.* tokenizer settings')


