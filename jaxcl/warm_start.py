"""`init.from`: a fresh run's weights taken from a trained jaxcl run or a
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

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxcl import errors, files, param_groups


def _source(path):
  """(params, batch_stats, method, tokenizer) of a workdir or a checkpoint directory."""
  if files.is_run(path):
    from jaxcl import trained  # pylint: disable=g-import-not-at-top
    exp, state = trained.load_trained(path, open_data=False)
  else:
    from jaxcl.hub import importer  # pylint: disable=g-import-not-at-top
    _, _, exp, state = importer.load_source(path)
  params, stats = jax.device_get((state.params, state.batch_stats))
  return _flat(params), _flat(stats), exp.method, exp.tokenizer


def _flat(state) -> dict:
  return {param_groups.path_name(p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(state)[0]}


def _renames(path, load, source_method, method) -> list[tuple[str, str]]:
  """[(source prefix, this model's prefix)] of the parts `load` names."""
  pairs = []
  for part in load:
    mine, theirs = method.towers.get(part, {}), source_method.towers.get(part, {})
    if not mine:
      raise errors.ConfigError(f'init.load: this model has no {part!r} part')
    if not theirs:
      raise errors.ConfigError(f'init.load: init.from {path} ({source_method.name}) has no '
                               f'{part!r} part')
    pairs += [(theirs[role], prefix) for role, prefix in mine.items() if role in theirs]
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


def _take(name, mine, source, their_name, path):
  value = source[their_name]
  if value.shape == tuple(mine.shape):
    return value
  resampled = (resample_positions(value, tuple(mine.shape))
               if name.endswith('/position') and 'image' in name.split('/')[0] else None)
  if resampled is None:
    raise errors.ConfigError(f'init.from {path}: {their_name} has shape {value.shape}, this '
                             f'model\'s {name} {tuple(mine.shape)}')
  return resampled


def _fill(state, source: dict, renames, path, everything: bool):
  """`state` (params or batch stats) with the loaded leaves replaced."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
  names = [param_groups.path_name(p) for p, _ in leaves]
  out, used = [], set()
  for name, (_, leaf) in zip(names, leaves):
    theirs = _source_name(name, renames)
    if theirs is not None and theirs not in source:
      raise errors.ConfigError(f'init.from {path} has no {theirs} for this model\'s {name}'
                               + ('' if renames else '; name the parts to load in init.load'))
    used.add(theirs)
    out.append(leaf if theirs is None else jnp.asarray(_take(name, leaf, source, theirs, path),
                                                       leaf.dtype))
  extra = sorted(set(source) - used)
  if everything and extra:
    raise errors.ConfigError(f'init.from {path} has {extra[0]}, which this model lacks; name '
                             f'the parts to load in init.load')
  return jax.tree_util.tree_unflatten(treedef, out)


def initial_state(exp):
  """The state a fresh run starts from: initialized, then with init.from's
  weights where init.load says."""
  state = exp.init_state()
  path = exp.config.init['from']
  if not path:
    return state
  load = param_groups.as_patterns(exp.config.init.load)
  params, stats, source_method, tokenizer = _source(path)
  renames = _renames(path, load, source_method, exp.method) if load else None
  if exp.method.text_tower and (not load or 'text' in load):
    _check_same_tokenizer(path, tokenizer, exp.tokenizer)
  host_params, host_stats = jax.device_get((state.params, state.batch_stats))
  new_params = _fill(host_params, params, renames, path, everything=not load)
  new_stats = _fill(host_stats, stats, renames, path, everything=not load)
  del host_params, host_stats
  return state.replace(params=jax.device_put(new_params, exp.state_sharding.params),
                       batch_stats=jax.device_put(new_stats, exp.state_sharding.batch_stats))


def _check_same_tokenizer(path, theirs, mine):
  """A text tower is only the same tower with the same token ids."""
  if theirs is None:
    raise errors.ConfigError(f'init.from {path} has no text tower to load')
  a, b = theirs.spec(), mine.spec()
  differ = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k)
                  and k not in ('model_file', 'vocab_file'))
  if differ:
    k = differ[0]
    raise errors.ConfigError(f'init.from {path}: its text tower was trained with another '
                             f'tokenizer ({k}: {a.get(k)!r} there, {b.get(k)!r} in this config); '
                             f'use the same text.* tokenizer settings')


