"""Checks on an experiment config, run before anything is compiled or written.

`validate(config)` raises ConfigError with one clear line for the first
problem it finds; the CLI prints it and exits with code 2. It loads no jax,
flax or TFDS at import: the device count, the method's own checks and the
dataset's are imported when a config is validated.
"""

from __future__ import annotations

import math

import ml_collections
from etils import epath

from jaxcl import errors, methods, name_patterns, presets
from jaxcl.errors import ConfigError, check
from jaxcl.evaluation import zeroshot_suite
from jaxcl.presets import MODEL_DTYPES, TEMPERATURE_MODES
from jaxcl.trainer import dataset_checks, recipe_checks

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


def validate(config, num_devices: int | None = None, process_count: int | None = None, *,
             check_data: bool = True) -> None:
  """Raises ConfigError for the first invalid value in `config`.
  check_data: also check that the dataset exists (and is prepared); export
  of a trained run does not need it."""
  try:
    _validate(config, num_devices, process_count, check_data)
  except ConfigError:
    raise
  except Exception as e:  # a value of a type no check expects
    raise ConfigError(f'invalid config: {type(e).__name__}: {errors.first_line(e, "")}'
                      ) from None


def _validate(config, num_devices, process_count, check_data) -> None:
  for key in _REQUIRED:
    _get(config, key)
  if num_devices is None or process_count is None:
    import jax  # noqa: PLC0415  (only to count the devices; not on `jaxcl --help`)
    num_devices = jax.device_count() if num_devices is None else num_devices
    process_count = jax.process_count() if process_count is None else process_count

  for key in ('total_steps', 'batch_size', 'seed', 'log_every_steps', 'eval_every_steps',
              'checkpoint_every_steps'):
    check(isinstance(config[key], int) and not isinstance(config[key], bool),
           f'{key} must be an integer, got {config[key]!r}')
  check(config.total_steps >= 0, f'total_steps must be >= 0, got {config.total_steps}')
  check(config.batch_size > 0, f'batch_size must be > 0, got {config.batch_size}')
  for key in ('log_every_steps', 'eval_every_steps', 'checkpoint_every_steps'):
    check(config[key] > 0, f'{key} must be > 0, got {config[key]}')

  try:
    shape = presets.mesh_shape(config.mesh, num_devices)
  except ValueError as e:
    raise ConfigError(f'mesh: {e}') from None
  shards = 1
  for axis in presets.BATCH_AXES:
    shards *= shape[axis]
  check(config.batch_size % shards == 0,
         f'batch_size {config.batch_size} is not divisible by the {shards} data shards '
         f'of the mesh {shape}')
  check(config.batch_size % process_count == 0,
         f'batch_size {config.batch_size} is not divisible by the {process_count} processes')
  check(_is_number(config.device_memory_gb) and config.device_memory_gb >= 0,
        f'device_memory_gb must be a number >= 0 (0: the device\'s own), got '
        f'{config.device_memory_gb!r}')
  m = config.microbatch_size
  check(_is_int(m) and m >= 0, f'microbatch_size must be an integer >= 0, got {m!r}')
  check(not m or (config.batch_size % m == 0 and m % shards == 0),
        f'microbatch_size {m} must divide batch_size {config.batch_size} and be a multiple '
        f'of the {shards} data shards of the mesh {shape}')
  check(config.eval.batch_size % shards == 0 and config.eval.batch_size > 0,
         f'eval.batch_size {config.eval.batch_size} must be a positive multiple of the '
         f'{shards} data shards')

  check(config.nonfinite in ('stop', 'skip'),
         f"nonfinite must be 'stop' or 'skip', got {config.nonfinite!r}")
  _check_observability(config)
  check(config.loss.impl in presets.LOSS_IMPLS,
         f'loss.impl must be one of {presets.LOSS_IMPLS}, got {config.loss.impl!r}')
  check(isinstance(config.loss.block_size, int) and config.loss.block_size > 0,
         f'loss.block_size must be a positive integer, got {config.loss.block_size!r}')
  check(config.loss.estimator in presets.LOSS_ESTIMATORS,
        f'loss.estimator must be one of {presets.LOSS_ESTIMATORS}, got {config.loss.estimator!r}')
  gamma = config.loss.sogclr_gamma
  check(_is_number(gamma) and 0 < gamma <= 1,
        f'loss.sogclr_gamma must be a number in (0, 1], got {gamma!r}')
  t = config.temperature
  check(t.mode in TEMPERATURE_MODES,
         f'temperature.mode must be one of {TEMPERATURE_MODES}, got {t.mode!r}')
  check(t.init > 0, f'temperature.init must be > 0, got {t.init}')
  check(t.min > 0, f'temperature.min must be > 0, got {t.min}')
  check(t.min <= t.max, f'temperature.min {t.min} must be <= temperature.max {t.max}')
  for key in ('warmup_steps', 'period'):
    check(isinstance(t[key], int) and t[key] >= 0,
           f'temperature.{key} must be an integer >= 0, got {t[key]!r}')
  check(t.lr_multiplier > 0, f'temperature.lr_multiplier must be > 0, got {t.lr_multiplier}')
  check(t.min <= t.init <= t.max,
         f'temperature.init {t.init} must lie in [temperature.min, temperature.max] = '
         f'[{t.min}, {t.max}]')

  method = methods.get(config.method)  # ConfigError for an unknown name
  check(isinstance(t.per_direction, bool) and (not t.per_direction or method.directions == 2),
        f'temperature.per_direction=True needs a loss with two directions (clip); '
        f'{config.method} has {method.directions}' if isinstance(t.per_direction, bool) else
        f'temperature.per_direction must be True or False, got {t.per_direction!r}')
  check(config.model.name in presets.IMAGE_TOWERS,
         f'model.name must be one of {list(presets.IMAGE_TOWERS)}, got {config.model.name!r}')
  if config.model.name in presets.VIT_NAMES:
    _check_vit(config.model, config.augment.image_size)
  method.check_config(config)
  check(config.loss.estimator == 'batch' or method.softmax_loss,
        f'loss.estimator={config.loss.estimator} estimates a softmax denominator; '
        f'{config.method} has none')
  if t.mode in ('individual', 'predicted'):
    check(method.softmax_loss, f'temperature.mode={t.mode} gives each anchor of a softmax its '
                               f'own τ; {config.method} has none')
    check(not t.per_direction, f'temperature.mode={t.mode} gives every anchor its own τ; '
                               f'temperature.per_direction does not apply')
  if t.mode == 'predicted':
    check(t.min < t.init < t.max, f'temperature.mode=predicted needs temperature.min < init < '
                                  f'max (τ(z) = min + (max - min) σ(.) starts at init), got '
                                  f'{t.min}, {t.init}, {t.max}')
  if t.mode == 'individual':
    check(config.loss.estimator == 'sogclr',
          'temperature.mode=individual (iSogCLR) builds on SogCLR\'s averages: set '
          'loss.estimator=sogclr')
    for key in ('individual_rho', 'individual_eta'):
      check(_is_number(t[key]) and t[key] >= 0,
            f'temperature.{key} must be a number >= 0, got {t[key]!r}')
    check(_is_number(t.individual_beta) and 0 < t.individual_beta <= 1,
          f'temperature.individual_beta must be a number in (0, 1], got {t.individual_beta!r}')
  check(config.model.remat in presets.REMAT_POLICIES,
        f'model.remat must be one of {presets.REMAT_POLICIES}, got {config.model.remat!r}')
  check(isinstance(config.model.scan_layers, bool),
        f'model.scan_layers must be True or False, got {config.model.scan_layers!r}')
  check((config.model.remat == 'none' and not config.model.scan_layers)
        or config.model.name in presets.VIT_NAMES or method.text_tower,
        f'model.remat and model.scan_layers apply to ViT and text towers; {config.method} with '
        f'{config.model.name} has neither')
  check(config.optimizer.name in presets.OPTIMIZERS,
         f'optimizer.name must be one of {presets.OPTIMIZERS}, got {config.optimizer.name!r}')
  check(config.optimizer.learning_rate > 0,
         f'optimizer.learning_rate must be > 0, got {config.optimizer.learning_rate}')
  check(config.optimizer.warmup_steps >= 0,
         f'optimizer.warmup_steps must be >= 0, got {config.optimizer.warmup_steps}')
  _check_param_groups(config)
  o = config.optimizer
  check(o.mu_dtype in presets.STATE_DTYPES and (o.mu_dtype == 'float32' or o.name != 'lars'),
        f'optimizer.mu_dtype must be one of {presets.STATE_DTYPES} (bfloat16: adamw or sgd; '
        f'optax.lars keeps float32), got {o.mu_dtype!r} with {o.name}')
  check(config.model.dtype in MODEL_DTYPES,
         f'model.dtype must be one of {MODEL_DTYPES}, got {config.model.dtype!r}')
  d = config.dataset
  for key in ('mean', 'std'):
    check(isinstance(d[key], (tuple, list)) and len(d[key]) in (1, 3)
           and all(_is_number(v) for v in d[key]),
           f'dataset.{key} needs 1 or 3 numbers (per channel), got {d[key]!r}')
  check(all(v > 0 for v in d.std), f'dataset.std values must be > 0, got {d.std}')
  e = config.eval
  for key in ('zeroshot_templates', 'class_names'):
    check(isinstance(e[key], (tuple, list)) and all(isinstance(t, str) for t in e[key]),
           f'eval.{key} must be a list of strings, got {e[key]!r}')
  for template in e.zeroshot_templates:
    try:
      ok = '{}' in template and template.format('x') != template
    except (KeyError, IndexError, ValueError):
      ok = False
    check(ok, f"eval.zeroshot_templates: {template!r} needs exactly one '{{}}' for the class "
               f'name and no other braces')
  for key in ('probe_steps', 'knn_k', 'probe_batch_size'):
    check(e[key] > 0, f'eval.{key} must be > 0, got {e[key]}')
  check(e.max_train_examples >= 0,
         f'eval.max_train_examples must be >= 0 (0: all), got {e.max_train_examples}')
  a = config.augment
  check(a.image_size > 0, f'augment.image_size must be > 0, got {a.image_size}')
  check(0 < a.crop_scale_min <= a.crop_scale_max <= 1,
         f'need 0 < augment.crop_scale_min <= crop_scale_max <= 1, got '
         f'{a.crop_scale_min}, {a.crop_scale_max}')
  for key in ('color_jitter_prob', 'grayscale_prob', 'blur_prob'):
    check(0 <= a[key] <= 1, f'augment.{key} must be in [0, 1], got {a[key]}')
  for key, ok, need in _RANGES:
    try:
      value = _get(config, key)
    except ConfigError:  # a config without this part (no projection head, say)
      continue
    check(_is_number(value) and ok(value), f'{key} must be {need}, got {value!r}')
  sizes = config.model.stage_sizes
  check(isinstance(sizes, (tuple, list)) and all(_is_int(n) and n > 0 for n in sizes),
         f'model.stage_sizes must be a tuple of positive integers (empty: the preset of '
         f'model.name), got {sizes!r}')
  dataset_checks.check_dataset_group(config, method.text_tower, process_count, check_data)
  recipe_checks.check_distill_group(config, method.text_tower, check_data)
  recipe_checks.check_decoder_group(config, method.text_tower)
  recipe_checks.check_self_distill_group(config, method.text_tower)
  zeroshot_suite.check(config, method.text_tower, check_data)


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
    ('model.vit.norm_eps', _positive),
    ('text.norm_eps', _positive),
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
    ('dataset.shuffle_buffer', _positive_int),
    ('dataset.streams', (lambda v: _is_int(v) and v >= 0, 'an integer >= 0 (0: automatic)')),
    ('dataset.workers', (lambda v: _is_int(v) and v >= -1, 'an integer >= -1 (-1: the cores)')),
    ('dataset.eval_samples', (lambda v: _is_int(v) and v >= 0, 'an integer >= 0 (0: all)')),
    ('dataset.max_bad_fraction', (lambda v: 0 <= v <= 1, 'in [0, 1]')),
))


WANDB_MODES = ('online', 'offline', 'disabled')


def _check_observability(config):
  """profile_steps and wandb: checked here, so that a run never fails on them
  after hours of training."""
  p = config.profile_steps
  check(isinstance(p, (tuple, list)) and (not p or len(p) == 2 and all(_is_int(s) for s in p)
                                          and 1 <= p[0] <= p[1]),
        f'profile_steps must be () or (first, last) steps with 1 <= first <= last, got {p!r}')
  w = config.wandb
  for key in ('project', 'entity', 'name'):
    check(isinstance(w[key], str), f'wandb.{key} must be a string, got {w[key]!r}')
  check(w.mode in WANDB_MODES, f'wandb.mode must be one of {WANDB_MODES}, got {w.mode!r}')
  # (Whether wandb is installed is `jaxcl train`'s check: eval and export never log to it.)


def _check_param_groups(config):
  """optimizer.frozen, optimizer.lr_multipliers and init: their syntax
  (which parameters they select is checked when the model is built)."""
  o, init = config.optimizer, config.init
  for key, value in (('optimizer.frozen', o.frozen), ('optimizer.lr_multipliers', o.lr_multipliers),
                     ('init.load', init.load)):
    check(isinstance(value, str) or (isinstance(value, (list, tuple))
                                     and all(isinstance(v, str) for v in value)),
          f'{key} must be a string or a list of strings, got {value!r}')
  try:
    name_patterns.compile_patterns(name_patterns.as_patterns(o.frozen), 'optimizer.frozen')
    name_patterns.parse_multipliers(name_patterns.as_patterns(o.lr_multipliers),
                                    'optimizer.lr_multipliers')
  except ValueError as e:
    raise ConfigError(str(e)) from None
  check(isinstance(init.source, str), f'init.source must be a path, got {init.source!r}')
  unknown = [t for t in name_patterns.as_patterns(init.load) if t not in presets.LOADABLE]
  check(not unknown, f'init.load: unknown part {unknown[0]!r}; choose from {presets.LOADABLE}'
        if unknown else '')
  check(not init.load or bool(init.source), 'init.load names parts, but init.source is empty')
  # (Whether init.source exists matters only when a run starts fresh: jaxcl.hub.warm_start.)


def _check_vit(m, image_size):
  v = m.vit
  sizes = presets.vit_sizes(m)
  for key, value in sizes.items():
    check(isinstance(value, int) and value > 0,
           f'model.vit.{key} must be a positive integer for model.name {m.name!r}, got {value!r}')
  check(sizes['width'] % sizes['heads'] == 0,
         f'model.vit.width {sizes["width"]} is not divisible by model.vit.heads {sizes["heads"]}')
  check(image_size % sizes['patch_size'] == 0,
         f'augment.image_size {image_size} is not divisible by the ViT patch size '
         f'{sizes["patch_size"]}')
  check(v.pool in presets.VIT_POOLS, f'model.vit.pool must be one of {presets.VIT_POOLS}, '
                                     f'got {v.pool!r}')
  check(v.act in presets.ACTIVATIONS, f'model.vit.act must be one of {presets.ACTIVATIONS}, '
                                      f'got {v.act!r}')


def check_output_path(output: str) -> None:
  """ConfigError for an --output under a file (X/sub, X a file), where no
  command can make its file or folder: one line before anything starts."""
  parent = next((p for p in epath.Path(output).parents if p.exists()), None)
  if parent is not None and not parent.is_dir():
    raise ConfigError(f'--output {output}: {parent} is a file, not a folder')
