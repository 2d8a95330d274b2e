"""Checks on an experiment config, run before anything is compiled or written.

`validate(config)` raises ConfigError with one clear line for the first
problem it finds; the CLI prints it and exits with code 2.
"""

from __future__ import annotations

import json
import math

import ml_collections
from etils import epath
from ml_collections import config_dict

from jaxcl import config_files, errors, files, presets
from jaxcl.presets import METHODS, MODEL_DTYPES, TEMPERATURE_MODES, TWO_TOWER  # noqa: F401

CONFIG_FILE = files.CONFIG_FILE



# Keys a resumed run may change: when and how often things happen, how it is
# evaluated, where data is read from. Anything else would silently mix two
# experiments in one workdir.
RESUMABLE_CHANGES = ('total_steps', 'log_every_steps', 'eval_every_steps',
                     'checkpoint_every_steps', 'keep_checkpoints', 'mesh', 'eval', 'loss',
                     'nonfinite',
                     'dataset.data_dir', 'dataset.download')


ConfigError = errors.ConfigError


_REQUIRED = ('method', 'total_steps', 'batch_size', 'seed', 'log_every_steps', 'eval_every_steps',
             'checkpoint_every_steps', 'dataset.name', 'temperature.mode', 'temperature.init',
             'temperature.min', 'temperature.max', 'mesh', 'model.name', 'optimizer.name',
             'augment.image_size', 'eval.batch_size')


def _get(config, dotted):
  node = config
  for part in dotted.split('.'):
    if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
      raise ConfigError(f'config is missing the required key {dotted!r}')
    node = node[part]
  return node


def _check(ok: bool, message: str):
  if not ok:
    raise ConfigError(message)


def validate(config, num_devices: int | None = None, process_count: int | None = None) -> None:
  """Raises ConfigError for the first invalid value in `config`."""
  try:
    _validate(config, num_devices, process_count)
  except ConfigError:
    raise
  except Exception as e:  # pylint: disable=broad-except  # a value of a type no check expects
    raise ConfigError(f'invalid config: {type(e).__name__}: {errors.first_line(e, "")}'
                      ) from None


def _validate(config, num_devices, process_count) -> None:
  for key in _REQUIRED:
    _get(config, key)
  if num_devices is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top  # only to count the devices present
    num_devices = jax.device_count() if num_devices is None else num_devices
    process_count = jax.process_count() if process_count is None else process_count

  for key in ('total_steps', 'batch_size', 'seed', 'log_every_steps', 'eval_every_steps',
              'checkpoint_every_steps'):
    _check(isinstance(config[key], int) and not isinstance(config[key], bool),
           f'{key} must be an integer, got {config[key]!r}')
  _check(config.total_steps >= 0, f'total_steps must be >= 0, got {config.total_steps}')
  _check(config.batch_size > 0, f'batch_size must be > 0, got {config.batch_size}')
  for key in ('log_every_steps', 'eval_every_steps', 'checkpoint_every_steps'):
    _check(config[key] > 0, f'{key} must be > 0, got {config[key]}')

  try:
    shape = presets.mesh_shape(config.mesh, num_devices)
  except ValueError as e:
    raise ConfigError(f'mesh: {e}') from None
  shards = 1
  for axis in presets.BATCH_AXES:
    shards *= shape[axis]
  _check(config.batch_size % shards == 0,
         f'batch_size {config.batch_size} is not divisible by the {shards} data shards '
         f'of the mesh {shape}')
  _check(config.batch_size % process_count == 0,
         f'batch_size {config.batch_size} is not divisible by the {process_count} processes')
  _check(config.eval.batch_size % shards == 0 and config.eval.batch_size > 0,
         f'eval.batch_size {config.eval.batch_size} must be a positive multiple of the '
         f'{shards} data shards')

  _check(config.nonfinite in ('stop', 'skip'),
         f"nonfinite must be 'stop' or 'skip', got {config.nonfinite!r}")
  _check(config.loss.impl in presets.LOSS_IMPLS,
         f'loss.impl must be one of {presets.LOSS_IMPLS}, got {config.loss.impl!r}')
  _check(isinstance(config.loss.block_size, int) and config.loss.block_size > 0,
         f'loss.block_size must be a positive integer, got {config.loss.block_size!r}')
  t = config.temperature
  _check(t.mode in TEMPERATURE_MODES,
         f'temperature.mode must be one of {TEMPERATURE_MODES}, got {t.mode!r}')
  _check(t.init > 0, f'temperature.init must be > 0, got {t.init}')
  _check(t.min > 0, f'temperature.min must be > 0, got {t.min}')
  _check(t.min <= t.max, f'temperature.min {t.min} must be <= temperature.max {t.max}')
  for key in ('warmup_steps', 'period'):
    _check(isinstance(t[key], int) and t[key] >= 0,
           f'temperature.{key} must be an integer >= 0, got {t[key]!r}')
  _check(t.lr_multiplier > 0, f'temperature.lr_multiplier must be > 0, got {t.lr_multiplier}')
  _check(t.min <= t.init <= t.max,
         f'temperature.init {t.init} must lie in [temperature.min, temperature.max] = '
         f'[{t.min}, {t.max}]')

  method = config.method
  _check(method in METHODS, f'method must be one of {METHODS}, got {method!r}')
  _check(config.model.name in presets.IMAGE_TOWERS,
         f'model.name must be one of {list(presets.IMAGE_TOWERS)}, got {config.model.name!r}')
  if config.model.name in presets.VITS or config.model.name == 'vit':
    _check_vit(config.model, config.augment.image_size)
  if method in TWO_TOWER:
    _check_text(config)
  _check(config.optimizer.name in presets.OPTIMIZERS,
         f'optimizer.name must be one of {presets.OPTIMIZERS}, got {config.optimizer.name!r}')
  _check(config.optimizer.learning_rate > 0,
         f'optimizer.learning_rate must be > 0, got {config.optimizer.learning_rate}')
  _check(config.optimizer.warmup_steps >= 0,
         f'optimizer.warmup_steps must be >= 0, got {config.optimizer.warmup_steps}')
  _check(config.model.get('dtype', 'float32') in MODEL_DTYPES,
         f'model.dtype must be one of {MODEL_DTYPES}, got {config.model.get("dtype")!r}')
  d = config.dataset
  for key in ('mean', 'std'):
    _check(isinstance(d[key], (tuple, list)) and len(d[key]) in (1, 3)
           and all(_is_number(v) for v in d[key]),
           f'dataset.{key} needs 1 or 3 numbers (per channel), got {d[key]!r}')
  _check(all(v > 0 for v in d.std), f'dataset.std values must be > 0, got {d.std}')
  e = config.eval
  for key in ('zeroshot_templates', 'class_names'):
    _check(isinstance(e[key], (tuple, list)) and all(isinstance(t, str) for t in e[key]),
           f'eval.{key} must be a list of strings, got {e[key]!r}')
  for template in e.zeroshot_templates:
    try:
      ok = '{}' in template and template.format('x') != template
    except (KeyError, IndexError, ValueError):
      ok = False
    _check(ok, f"eval.zeroshot_templates: {template!r} needs exactly one '{{}}' for the class "
               f'name and no other braces')
  for key in ('probe_steps', 'knn_k', 'probe_batch_size'):
    _check(e[key] > 0, f'eval.{key} must be > 0, got {e[key]}')
  _check(e.max_train_examples >= 0,
         f'eval.max_train_examples must be >= 0 (0: all), got {e.max_train_examples}')
  a = config.augment
  _check(a.image_size > 0, f'augment.image_size must be > 0, got {a.image_size}')
  _check(0 < a.crop_scale_min <= a.crop_scale_max <= 1,
         f'need 0 < augment.crop_scale_min <= crop_scale_max <= 1, got '
         f'{a.crop_scale_min}, {a.crop_scale_max}')
  for key in ('color_jitter_prob', 'grayscale_prob', 'blur_prob'):
    _check(0 <= a[key] <= 1, f'augment.{key} must be in [0, 1], got {a[key]}')
  for key, ok, need in _RANGES:
    try:
      value = _get(config, key)
    except ConfigError:  # a config without this part (no projection head, say)
      continue
    _check(_is_number(value) and ok(value), f'{key} must be {need}, got {value!r}')
  sizes = config.model.get('stage_sizes', ())
  _check(isinstance(sizes, (tuple, list)) and all(_is_int(n) and n > 0 for n in sizes),
         f'model.stage_sizes must be a tuple of positive integers (empty: the preset of '
         f'model.name), got {sizes!r}')
  _check_dataset(config.dataset)


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


_positive_int = (lambda v: _is_int(v) and v > 0, 'a positive integer')
_non_negative = (lambda v: v >= 0, '>= 0')
_positive = (lambda v: v > 0, '> 0')
_fraction = (lambda v: 0 <= v < 1, 'in [0, 1)')
# Keys checked only for their range here (the others, above, in context).
_RANGES = tuple((key,) + rule for key, rule in (
    ('keep_checkpoints', _positive_int),
    ('model.width', _positive_int),
    ('model.head_hidden', _positive_int),
    ('model.head_out', _positive_int),
    ('model.head_layers', _positive_int),
    ('model.embed_dim', _positive_int),
    ('optimizer.weight_decay', _non_negative),
    ('optimizer.momentum', _fraction),
    ('optimizer.b1', _fraction),
    ('optimizer.b2', _fraction),
    ('optimizer.grad_clip_norm', _non_negative),
    ('optimizer.lars_trust_coefficient', _positive),
    ('augment.color_jitter_strength', _non_negative),
    ('eval.knn_temperature', _positive),
    ('eval.probe_lr', _positive),
    ('eval.probe_l2', _non_negative),
    ('temperature.bias_init', (lambda v: True, 'a finite number')),
    ('temperature.init', (lambda v: True, 'a finite number')),
    ('optimizer.learning_rate', (lambda v: True, 'a finite number')),
))


def _check_vit(m, image_size):
  v = m.vit
  sizes = presets.vit_sizes(m)
  for key, value in sizes.items():
    _check(isinstance(value, int) and value > 0,
           f'model.vit.{key} must be a positive integer for model.name {m.name!r}, got {value!r}')
  _check(sizes['width'] % sizes['heads'] == 0,
         f'model.vit.width {sizes["width"]} is not divisible by model.vit.heads {sizes["heads"]}')
  _check(image_size % sizes['patch_size'] == 0,
         f'augment.image_size {image_size} is not divisible by the ViT patch size '
         f'{sizes["patch_size"]}')
  _check(v.pool in ('gap', 'cls'), f"model.vit.pool must be 'gap' or 'cls', got {v.pool!r}")


def _check_text(config):
  x = config.text
  for key in ('max_length', 'width', 'depth', 'heads', 'mlp_dim'):
    _check(isinstance(x[key], int) and x[key] > 0,
           f'text.{key} must be a positive integer, got {x[key]!r}')
  _check(x.max_length >= 2, f'text.max_length must be >= 2 (a token and end-of-text), '
                            f'got {x.max_length}')
  _check(x.width % x.heads == 0, f'text.width {x.width} is not divisible by text.heads {x.heads}')
  _check(config.model.embed_dim > 0, f'model.embed_dim must be > 0, got {config.model.embed_dim}')
  from jaxcl import tokenizers  # pylint: disable=g-import-not-at-top
  try:
    tokenizers.build_tokenizer(x)
  except (ValueError, RuntimeError, OSError) as e:  # sentencepiece raises RuntimeError
    raise ConfigError(f'text: {errors.first_line(e)}') from None
  _check(bool(config.dataset.text_key), 'dataset.text_key must name the caption feature')
  _check(config.dataset.name != 'image_folder',
         f'{config.method} needs captions: image_folder has none; use a TFDS image-text dataset '
         f'or dataset.name=image_text_pairs')


def _check_dataset(d):
  from jaxcl import data  # pylint: disable=g-import-not-at-top  # TFDS: only when validating
  if d.name == data.PAIRS:
    _check(bool(d.path), f'dataset.path must name a JSONL or CSV file when dataset.name is '
                         f'{data.PAIRS}')
    _check(epath.Path(d.path).is_file(), f'dataset.path {d.path} is not a file')
    _check(d.image_size > 0, f'dataset.image_size must be > 0 for {data.PAIRS}')
    _check(0 <= d.pairs.test_fraction < 1,
           f'dataset.pairs.test_fraction must be in [0, 1), got {d.pairs.test_fraction}')
    return
  if d.name == 'image_folder':
    _check(bool(d.path), 'dataset.path must name a folder when dataset.name is image_folder')
    _check(epath.Path(d.path).is_dir(), f'dataset.path {d.path} is not a folder')
    _check((epath.Path(d.path) / d.train_split).is_dir(),
           f'dataset.path {d.path} has no {d.train_split}/ folder (dataset.train_split): an '
           f'image folder holds train/CLASS/*.png, and test/CLASS/*.png for evaluation')
    _check(d.image_size > 0, 'dataset.image_size must be > 0 for an image folder')
    return
  try:
    builder = data.tfds_builder(d.name, d.data_dir)
  except data.DatasetError as e:
    raise ConfigError(f'dataset.name: {e}') from None
  if d.name not in data.EMBEDDED and not d.download:
    _check(data.is_prepared(builder),
           f'dataset {d.name!r} is not prepared under {builder.data_dir_root}; prepare it or '
           f'set --config.dataset.download=True')


# ---------------------------------------------------------------- defaults ---
def base_config():
  """Every key a config may set, with the defaults of the SimCLR digits run.
  Config files start from this and override what their recipe changes."""
  config = ml_collections.ConfigDict()
  config.name = ''
  # simclr: two augmented views of an image, NT-Xent. clip / siglip: image and
  # caption through two towers, CLIP's softmax loss or SigLIP's sigmoid loss.
  config.method = 'simclr'
  config.seed = 0
  config.total_steps = 1500
  config.batch_size = 256
  config.log_every_steps = 50
  config.eval_every_steps = 500
  config.checkpoint_every_steps = 500
  config.keep_checkpoints = 3
  # A step whose loss or gradient norm is NaN/inf: 'stop' (an error naming the
  # step and the last good checkpoint) or 'skip' (the state stays as it was;
  # counted and logged as `skipped`).
  config.nonfinite = 'stop'

  # -1: all remaining devices. The batch is split over both axes; parameters
  # and optimizer state are replicated over `data` and sharded over `fsdp`.
  config.mesh = ml_collections.ConfigDict({'data': -1, 'fsdp': 1})

  config.dataset = ml_collections.ConfigDict(dict(
      name='digits',
      data_dir=config_dict.placeholder(str),  # TFDS default (~/tensorflow_datasets) when unset
      download=False,
      path='',  # for name='image_folder'
      train_split='train',  # pretraining split (labels unused)
      eval_train_split='train',  # labeled split the kNN bank and the probe train on
      eval_test_split='test',
      image_key='image',
      label_key='label',
      text_key='captions',  # clip/siglip: a string or list of strings; 'a/b' for nested features
      # name='image_text_pairs': path is a JSONL/CSV file of (image path, caption)
      # rows, converted once (bad rows reported and skipped).
      pairs=ml_collections.ConfigDict(dict(image_column='image', caption_column='caption',
                                           test_fraction=0.05)),
      image_size=0,  # 0: the dataset's own fixed size
      mean=(0.5,),
      std=(0.5,),
  ))

  config.augment = ml_collections.ConfigDict(dict(
      image_size=16,  # the encoder's input resolution
      crop_scale_min=0.4,
      crop_scale_max=1.0,
      flip=False,  # digits are not mirror-symmetric
      color_jitter_prob=0.8,
      color_jitter_strength=0.5,
      grayscale_prob=0.0,
      blur_prob=0.0,
  ))

  config.model = ml_collections.ConfigDict(dict(
      name='resnet18',
      stage_sizes=(1, 1, 1),
      width=32,
      small_images=True,
      head_hidden=256,
      head_out=64,
      head_layers=2,
      dtype='float32',  # activations; parameters stay float32
      embed_dim=128,  # clip/siglip: the shared embedding size of both towers
      # ViT sizes (model.name 'vit', or non-zero to override a preset such as vit_b16)
      vit=ml_collections.ConfigDict(dict(patch_size=0, width=0, depth=0, heads=0, mlp_dim=0,
                                         pool='gap')),
  ))

  # clip/siglip: the text tower and its tokenizer.
  config.text = ml_collections.ConfigDict(dict(
      tokenizer='bytes',  # or 'sentencepiece' with a model file:
      sentencepiece_model='',
      max_length=64,  # tokens, end-of-text included
      width=256,
      depth=4,
      heads=4,
      mlp_dim=1024,
      causal=True,  # CLIP's text tower is causal; False: bidirectional
  ))

  # How the global-batch loss is computed (values and gradients agree):
  # dense materializes each device's n x N logits; blockwise and ring compute
  # them in block_size x block_size tiles (jaxcl.blockwise), with the other devices'
  # embeddings all-gathered once (blockwise) or passed around a ring (ring).
  config.loss = ml_collections.ConfigDict(dict(impl='dense', block_size=1024))

  # mode: fixed (τ = init) | learnable (log τ trained, clamped to [min, max])
  # | cosine (between max and min with `period` steps; 0: total_steps).
  config.temperature = ml_collections.ConfigDict(dict(
      mode='learnable', init=0.2, min=0.01, max=1.0,
      warmup_steps=0,  # learnable: τ held at init for these first steps
      lr_multiplier=1.0,  # learnable: log τ's learning rate = this x the model's
      period=0,  # cosine
      bias_init=-10.0))  # siglip: the learnable logit bias b

  config.optimizer = ml_collections.ConfigDict(dict(
      name='adamw',
      learning_rate=2e-3,
      scale_lr_by_batch=False,
      warmup_steps=100,
      weight_decay=1e-4,
      b1=0.9,
      b2=0.999,
      momentum=0.9,
      lars_trust_coefficient=0.001,
      grad_clip_norm=0.0,  # 0: off
  ))

  config.eval = ml_collections.ConfigDict(dict(
      batch_size=512,
      max_train_examples=0,  # 0: the whole labeled train split
      knn_k=20,
      knn_temperature=0.07,
      probe_steps=1000,
      probe_lr=1e-2,
      probe_l2=1e-4,
      probe_batch_size=4096,
      # clip/siglip: zero-shot classification (prompt ensembling over the
      # templates; empty: the dataset's own list, else 'a photo of a {}.') and
      # image-text retrieval on eval_test_split.
      zeroshot_templates=(),
      class_names=(),  # empty: the label feature's names
      zeroshot_dataset='',  # a labeled TFDS dataset; empty: the training dataset
      zeroshot_split='',  # empty: eval_test_split
  ))
  return config


# ----------------------------------------------------------- saved configs ---
# Keys added to jaxcl after its first release, with the value that gives the
# behaviour a run saved before them had. A saved config may lack these and
# only these; any other missing key means the file is not a whole config.
KEYS_ADDED_LATER = {
    # CLIP/SigLIP (2026-11-23): earlier runs were SimCLR runs, which read none
    # of these but the method.
    'method': 'simclr', 'dataset.text_key': 'captions', 'dataset.pairs.image_column': 'image',
    'dataset.pairs.caption_column': 'caption', 'dataset.pairs.test_fraction': 0.05,
    'model.embed_dim': 128, 'model.vit.patch_size': 0, 'model.vit.width': 0,
    'model.vit.depth': 0, 'model.vit.heads': 0, 'model.vit.mlp_dim': 0, 'model.vit.pool': 'gap',
    'text.tokenizer': 'bytes', 'text.sentencepiece_model': '', 'text.max_length': 64,
    'text.width': 256, 'text.depth': 4, 'text.heads': 4, 'text.mlp_dim': 1024,
    'text.causal': True, 'temperature.bias_init': -10.0, 'eval.zeroshot_templates': [],
    'eval.class_names': [], 'eval.zeroshot_dataset': '', 'eval.zeroshot_split': '',
    # The dense loss, a data-only mesh, τ without warm-up, schedule or its own
    # learning rate, and no check of non-finite steps came first.
    'loss.impl': 'dense', 'loss.block_size': 1024, 'mesh.fsdp': 1,
    'temperature.warmup_steps': 0, 'temperature.lr_multiplier': 1.0, 'temperature.period': 0,
    'nonfinite': 'stop',
}


def save(config, workdir) -> None:
  files.write_atomically(epath.Path(workdir) / CONFIG_FILE, config.to_json_best_effort(indent=2))


def _flatten(tree, prefix=''):
  out = {}
  for key, value in tree.items():
    name = f'{prefix}{key}'
    if isinstance(value, dict):
      out.update(_flatten(value, name + '.'))
    else:
      out[name] = list(value) if isinstance(value, (list, tuple)) else value
  return out


def flat_config(config) -> dict:
  """{dotted key: value} of a config, as its config.json holds it."""
  return _flatten(json.loads(config.to_json_best_effort()))


def _fits(value, default) -> bool:
  """Whether a saved value has the type of the key's default."""
  if default is None:  # a placeholder (dataset.data_dir): a string or unset
    return value is None or isinstance(value, str)
  if isinstance(default, bool) or isinstance(value, bool):
    return isinstance(value, bool) and isinstance(default, bool)
  if isinstance(default, float):
    return isinstance(value, (int, float))
  return isinstance(value, type(default))


def _names(keys) -> str:
  keys = sorted(keys)
  return ', '.join(keys[:6]) + (f' and {len(keys) - 6} more' if len(keys) > 6 else '')


def read_saved(workdir) -> dict:
  """The flattened config a run in `workdir` saved, completed with
  KEYS_ADDED_LATER. ConfigError, naming the keys, if the file is not JSON, not
  an object, lacks other keys, has keys jaxcl does not know, or values of the
  wrong type."""
  path = epath.Path(workdir) / CONFIG_FILE
  if not path.exists():
    raise ConfigError(f'{workdir} has no {CONFIG_FILE}: not a jaxcl workdir')
  try:
    saved = json.loads(path.read_text())
  except ValueError as e:
    raise ConfigError(f'{path} is not valid JSON ({errors.first_line(e)})') from None
  if not isinstance(saved, dict):
    raise ConfigError(f'{path} holds a JSON {type(saved).__name__}, not a config object')
  saved, defaults = _flatten(saved), flat_config(base_config())
  missing = [k for k in defaults if k not in saved and k not in KEYS_ADDED_LATER]
  if missing:
    raise ConfigError(f'{path} is not a whole jaxcl config: it lacks {len(missing)} key(s) '
                      f'({_names(missing)})')
  unknown = [k for k in saved if k not in defaults]
  if unknown:
    raise ConfigError(f'{path} has key(s) this jaxcl does not know ({_names(unknown)})')
  wrong = [k for k, v in saved.items() if not _fits(v, defaults[k])]
  if wrong:
    k = sorted(wrong)[0]
    raise ConfigError(f'{path} has value(s) of the wrong type ({_names(wrong)}; {k} is '
                      f'{saved[k]!r}, where jaxcl writes {config_files.kind_of(defaults[k])})')
  return {**{k: v for k, v in KEYS_ADDED_LATER.items() if k in defaults}, **saved}


def check_resumable(config, workdir, allow_batch_change: bool = False) -> None:
  """Raises ConfigError if `workdir` holds a run of a different experiment.
  allow_batch_change: a resumed run may change the global batch_size."""
  if not (epath.Path(workdir) / CONFIG_FILE).exists():
    return
  saved, new = read_saved(workdir), flat_config(config)
  resumable = RESUMABLE_CHANGES + (('batch_size',) if allow_batch_change else ())
  allowed = lambda key: any(key == k or key.startswith(k + '.') for k in resumable)
  changed = sorted(k for k in set(saved) | set(new) if saved.get(k) != new.get(k) and not allowed(k))
  if changed == ['batch_size']:
    raise ConfigError(
        f'{workdir} holds a run with global batch_size {saved["batch_size"]}, not '
        f'{new["batch_size"]}; pass --allow_batch_change to resume it with the new batch size')
  if changed:
    k = changed[0]
    raise ConfigError(
        f'{workdir} holds a run with a different config ({k}: {saved.get(k)!r} there, '
        f'{new.get(k)!r} now{f", and {len(changed) - 1} more" if len(changed) > 1 else ""}); '
        f'use a new --workdir')


def load_saved(workdir):
  """The config a run in `workdir` was trained with."""
  config = base_config()
  config.update_from_flattened_dict(read_saved(workdir))
  if (epath.Path(workdir) / files.SENTENCEPIECE_FILE).exists():
    # The run's copy of the SentencePiece model, wherever the original went.
    config.text.sentencepiece_model = str(epath.Path(workdir) / files.SENTENCEPIECE_FILE)
  return config
