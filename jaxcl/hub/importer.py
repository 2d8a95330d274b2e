"""`jaxcl import SOURCE --output WORKDIR`: a published checkpoint as a jaxcl
workdir at step 0 (config, tokenizer, data facts, an orbax checkpoint),
which `jaxcl eval`, `jaxcl export`, training and `init.source` all use.

Every check runs before anything is written, and the workdir is assembled
under a temporary name and renamed into place: a failed import leaves
nothing behind.
"""

from __future__ import annotations

import math
import uuid
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from jaxcl import config as config_lib, data, errors
from jaxcl.hub import big_vision_layout, open_clip_layout, tensors as t, transformers_layout
from jaxcl.models import param_groups
from jaxcl.text import tokenizers
from jaxcl.trainer import checkpoints, experiment, validation
from jaxcl.workdir import run_files

LAYOUTS = (open_clip_layout, transformers_layout, big_vision_layout)
DEFAULT_DATASET = 'captioned_shapes'  # embedded: `jaxcl eval` runs on an import as it is


def _layout(source: epath.Path):
  if source.suffix == '.npz' and source.is_file():
    return big_vision_layout
  if not source.is_dir():
    if source.suffix in t.TORCH_FILES:
      raise t.SourceError(t.torch_file_message(source))
    if source.is_file() and epath.Path(f'{source}.json').is_file():  # jaxcl export's FILE.json
      raise t.SourceError(f'{source} is a jax.export artifact (a compiled program), which '
                          f'jaxcl import does not read: the workdir it was exported from is a '
                          f'jaxcl workdir already, and its --format open_clip export imports')
    raise t.SourceError(f'{source} is neither a directory holding a checkpoint (open_clip: '
                        f'{open_clip_layout.CONFIG}; transformers: {transformers_layout.CONFIG}) '
                        f'nor a big_vision .npz')
  for layout in LAYOUTS:
    if layout.matches(source):
      if not layout.weights(source).exists():
        torch_files = [p for p in source.iterdir() if p.suffix in t.TORCH_FILES]
        if torch_files:
          raise t.SourceError(t.torch_file_message(torch_files[0]))
        raise t.SourceError(f'{source} has no {layout.weights(source).name}')
      return layout
  raise t.SourceError(f'{source} holds no checkpoint jaxcl knows: neither '
                      f'{open_clip_layout.CONFIG} (open_clip), a CLIP, SigLIP or SigLIP 2 '
                      f'{transformers_layout.CONFIG} (transformers) nor one big_vision .npz')


TOKENIZER_FILES = {'clip_bpe': ('tokenizer.json', 'bpe_simple_vocab_16e6.txt.gz'),
                   'sentencepiece': ('spiece.model', 'tokenizer.model', 'sentencepiece.model')}
TOKENIZER_KEYS = {'clip_bpe': 'text.vocab_file', 'sentencepiece': 'text.sentencepiece_model'}


def _tokenizer_file(source, kind, explicit) -> str:
  """The path of the tokenizer's vocabulary or model file."""
  if explicit:
    path = epath.Path(explicit)
  else:
    folder = source if source.is_dir() else source.parent  # (a big_vision .npz)
    names = TOKENIZER_FILES[kind]
    found = [folder / n for n in names if (folder / n).exists()]
    if not found and kind == 'sentencepiece':  # big_vision's are named for their corpus
      found = sorted(folder.glob('*.model'))[:1]
    if not found:
      raise t.SourceError(f'{source} has no tokenizer file ({" or ".join(names)}); pass '
                          f'--tokenizer FILE')
    path = found[0]
  if not path.is_file():
    raise t.SourceError(f'--tokenizer {path} is not a file')
  return str(path)


def build_config(source, tensors: t.Tensors, layout, tokenizer_file=None):
  """(the config of the checkpoint, the rules that convert its tensors, the
  token its text tower pools at: an id, 'argmax' (the largest id) or None)."""
  values = layout.architecture(source, tensors.shapes)
  config = config_lib.base_config()
  config.method = values.pop('method')
  eos_id = values.pop('eos_id', None)
  config.update_from_flattened_dict({k: (list(v) if isinstance(v, tuple) else v)
                                     for k, v in values.items()})
  kind = config.text.tokenizer
  if kind in TOKENIZER_KEYS:  # (bytes need no file)
    config.update_from_flattened_dict({TOKENIZER_KEYS[kind]: _tokenizer_file(source, kind,
                                                                           tokenizer_file)})
  config.name = f'imported from {source.name}'
  config.dataset.name = DEFAULT_DATASET
  rules = {r.target: r for r in layout.rules(_values(config), tensors.shapes)}
  converted = lambda target: float(rules[target].convert(
      *(tensors[s] for s in rules[target].sources)))
  # τ and SigLIP's bias are config values too: a fresh run from this config starts there.
  tau = math.exp(converted('temperature/log_tau'))
  t_cfg = config.temperature
  t_cfg.init, t_cfg.min, t_cfg.max = tau, min(t_cfg.min, tau), max(t_cfg.max, tau)
  if 'bias/value' in rules:
    t_cfg.bias_init = converted('bias/value')
  return config, list(rules.values()), eos_id


def check_tokenizer(source, tokenizer, text_config, eos_id) -> None:
  """SourceError unless `tokenizer` gives the ids the source's text tower
  was made for: the end-of-text id it pools at, and (a jaxcl export) the
  tokenizer the export recorded, file hashes included."""
  if text_config.pool == 'eot' and eos_id == 'argmax':
    if tokenizer.eot_id != tokenizer.vocab_size - 1:
      raise t.SourceError(f'the source pools its text at the largest token id, which is not '
                          f'the tokenizer\'s end-of-text id {tokenizer.eot_id} (of '
                          f'{tokenizer.vocab_size} ids); jaxcl pools at end-of-text')
  elif text_config.pool == 'eot' and eos_id is not None and eos_id != tokenizer.eot_id:
    raise t.SourceError(f'the source pools its text at token id {eos_id} (its eos_id); the '
                        f'tokenizer\'s end-of-text id, where jaxcl pools, is {tokenizer.eot_id}')
  recorded = (open_clip_layout.exported_tokenizer(t.json_object(source / open_clip_layout.CONFIG))
              if source.is_dir() and open_clip_layout.matches(source) else {})
  for key, value in recorded.items():
    if key not in ('model_file', 'vocab_file') and tokenizer.spec().get(key) != value:
      raise t.SourceError(f'{open_clip_layout.CONFIG}: the export recorded a tokenizer with '
                          f'{key} {value!r}; the one rebuilt from {source} has '
                          f'{tokenizer.spec().get(key)!r}')


def convert_params(rules, tensors: t.Tensors, abstract_params, ignored_suffixes=()):
  """abstract_params (an nnx.State of ShapeDtypeStructs) filled by `rules`
  from `tensors`, one tensor at a time; SourceError naming the tensor for a
  missing, superfluous or misshapen one."""
  by_target = {r.target: r for r in rules}
  leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract_params)
  out = []
  for key_path, leaf in leaves:
    target = param_groups.path_name(key_path)
    if target not in by_target:
      raise t.SourceError(f'the checkpoint has nothing for jaxcl\'s parameter {target}')
    r = by_target.pop(target)
    inputs = [tensors[s] for s in r.sources]  # (SourceError, a ValueError, for a bad dtype)
    try:
      value = r.convert(*inputs)
    except ValueError:  # tensors that do not fit together (a concatenation, a reshape)
      value = None
    if value is None or tuple(value.shape) != tuple(leaf.shape):
      raise t.SourceError(_misshapen(r, tensors.shapes, leaf.shape, value))
    out.append(jnp.asarray(value, leaf.dtype))
  if by_target:
    target, r = next(iter(by_target.items()))
    raise t.SourceError(f'tensor {r.sources[0]} has no place in the architecture its config '
                        f'describes ({target})')
  unused = sorted(k for k in tensors.keys() if k not in tensors.used
                  and not k.endswith(tuple(ignored_suffixes)))
  if unused:
    raise t.SourceError(f'tensor {unused[0]} (and {len(unused) - 1} more) has no place in the '
                        f'architecture its config describes' if len(unused) > 1 else
                        f'tensor {unused[0]} has no place in the architecture its config '
                        f'describes')
  return jax.tree_util.tree_unflatten(treedef, out)


def _misshapen(r: t.Rule, shapes: dict, expected: tuple, value) -> str:
  """The message for the tensors of `r` that do not make a parameter of
  shape `expected`, both shapes in one layout: the source's where the rule
  has an inverse (one tensor), else jaxcl's."""
  expected = tuple(expected)
  try:
    inverse = t.inverse(r)
  except ValueError:  # several tensors, or a conversion export never runs
    given = ' + '.join(f'{s} {tuple(shapes[s])}' for s in r.sources)
    made = 'do not fit together' if value is None else f'give {tuple(value.shape)}'
    return (f'tensor {given}: {made} in jaxcl\'s layout, where the config implies '
            f'{expected} (jaxcl\'s {r.target})')
  want = tuple(jax.eval_shape(inverse, jax.ShapeDtypeStruct(expected, jnp.float32)).shape)
  return (f'tensor {r.sources[0]} has shape {tuple(shapes[r.sources[0]])}; the config implies '
          f'{want} (jaxcl\'s {r.target}, {expected} in jaxcl\'s layout)')


def load_source(source, tokenizer_file=None):
  """(config, tokenizer, Experiment, TrainState at step 0) of a published
  checkpoint directory; nothing is written."""
  source = epath.Path(source)
  try:
    layout = _layout(source)
    tensors = t.Tensors(layout.weights(source))
    config, rules, eos_id = build_config(source, tensors, layout, tokenizer_file)
  except t.SourceError:
    raise
  except (ValueError, TypeError, KeyError, OSError, zipfile.BadZipFile) as e:
    # Malformed JSON, a truncated safetensors or npz file, a value of the wrong kind.
    raise t.SourceError(f'{source}: cannot read the checkpoint '
                        f'({errors.type_and_first_line(e)})') from None
  except Exception as e:  # safetensors' own error type
    if type(e).__name__ != 'SafetensorError':
      raise
    raise t.SourceError(f'{source}: {errors.first_line(e)}') from None
  # On one device: the import holds no batch, and a workdir trains on any mesh later.
  validation.validate(config, num_devices=1, process_count=1, check_data=False)
  tokenizer = tokenizers.build_tokenizer(config.text)
  check_tokenizer(source, tokenizer, config.text, eos_id)
  embedding = next(r.sources[0] for r in rules if r.target == 'text_encoder/embed/embedding')
  vocab = tensors.shapes.get(embedding)
  if vocab and vocab[0] != tokenizer.vocab_size:
    raise t.SourceError(f'the tokenizer has {tokenizer.vocab_size} ids, the checkpoint\'s token '
                        f'embedding {embedding} {vocab[0]}')
  size = config.augment.image_size
  info = data.DatasetInfo((size, size, 3), 0, ())
  exp = experiment.setup(config, devices=jax.local_devices()[:1], tokenizer=tokenizer, info=info)
  abstract = exp.abstract_state()
  params = convert_params(rules, tensors, abstract.params, layout.IGNORED_SUFFIXES)
  params = jax.device_put(params, exp.state_sharding.params)
  return config, tokenizer, exp, exp.state_from_params(params)


def _values(config) -> dict:
  return {'method': config.method, 'text.projection_bias': config.text.projection_bias,
          'model.vit.patch_size': config.model.vit.patch_size}


def import_checkpoint(source, output, tokenizer_file=None) -> dict:
  """Writes the workdir `output` (which must not exist) for `source`;
  returns a summary."""
  output = epath.Path(output)
  if jax.process_count() > 1:
    raise errors.ConfigError('jaxcl import runs in one process; start it without '
                             '--num_processes (its workdir then trains on any number)')
  if output.exists() and (not output.is_dir() or any(output.iterdir())):
    raise errors.ConfigError(f'--output {output} exists and is not an empty directory')
  config, tokenizer, exp, state = load_source(source, tokenizer_file)
  facts = run_files.data_facts(exp.info, {'zeroshot': {'class_names': [], 'templates': []}})
  staging = output.parent / f'.{output.name}.importing-{uuid.uuid4().hex[:8]}'
  try:
    run_files.write_run_start(staging, config, [[0, config.batch_size]], tokenizer, facts, 0)
    manager = checkpoints.checkpoint_manager(staging, config.keep_checkpoints,
                                             background=False)
    checkpoints.save_checkpoint(manager, state)
    checkpoints.finish_checkpoints(manager)
    manager.close()
    if output.exists():
      output.rmdir()
    staging.rename(output)
  except OSError as e:
    raise errors.ConfigError(f'cannot write --output {output}: '
                             f'{e.strerror or errors.first_line(e)}') from None
  finally:
    if staging.exists():  # a failed write: nothing half-written is left
      staging.rmtree(missing_ok=True)
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  return {'workdir': str(output), 'method': config.method, 'parameters': n,
          'temperature': config.temperature.init, 'image_size': config.augment.image_size,
          'images': (f'NaFlex patches within {max(config.dataset.max_patches)}'
                     if config.dataset.resolution == 'naflex'
                     else f'{config.augment.image_size} px images')}
