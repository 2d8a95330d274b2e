"""The config a run saves in its workdir and reads back: old runs' configs
completed with the keys added since, and which changes a resumed run may
make.

Importing this module loads no jax, flax, TFDS or grain.
"""

from __future__ import annotations

import json

from etils import epath

from jaxcl import errors, files
from jaxcl.config import config_files
from jaxcl.config.defaults import CONFIG_FILE, base_config

ConfigError = errors.ConfigError

# Keys a resumed run may change: when and how often things happen, how it is
# evaluated, where data is read from. Anything else would silently mix two
# experiments in one workdir.
RESUMABLE_CHANGES = ('total_steps', 'log_every_steps', 'eval_every_steps',
                     'checkpoint_every_steps', 'keep_checkpoints', 'mesh', 'eval',
                     # equal values and gradients (not loss.estimator)
                     'loss.impl', 'loss.block_size',
                     'nonfinite', 'microbatch_size', 'model.remat', 'model.scan_layers',
                     'device_memory_gb', 'compilation_cache_dir',
                     'dataset.data_dir', 'dataset.download', 'dataset.workers',
                     'dataset.max_bad_fraction', 'dataset.eval_urls', 'dataset.eval_samples',
                     'init', 'profile_steps', 'wandb')


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
    'temperature.per_direction': False,
    # SogCLR (2026-12-02): the batch's own estimate came first.
    'loss.estimator': 'batch', 'loss.sogclr_gamma': 0.9, 'temperature.individual_rho': 0.3,
    'temperature.individual_eta': 0.01, 'temperature.individual_beta': 0.9,
    'nonfinite': 'stop',
    # Published architectures (2026-12-01): jaxcl's own towers are these defaults.
    'model.image_projection': True, 'model.vit.act': 'gelu_tanh', 'model.vit.norm_eps': 1e-6,
    'model.vit.pre_norm': False, 'model.vit.patch_bias': True, 'text.pool': 'eot',
    'text.act': 'gelu_tanh', 'text.norm_eps': 1e-6, 'text.projection_bias': False,
    # Published tokenizers: earlier runs had bytes or SentencePiece with its own pad.
    'text.vocab_file': '', 'text.pad_id': -1, 'text.normalize': '',
    # The zero-shot suite: earlier runs evaluated eval.zeroshot_dataset alone.
    'eval.zeroshot': [], 'eval.retrieval': [],
    # Starting from trained weights, frozen parameters (2026-12-01): from scratch, all trained.
    'init.source': '', 'init.load': [], 'optimizer.frozen': [], 'optimizer.lr_multipliers': [],
    # Webdataset shards (2026-12-02): earlier runs read TFDS or image folders.
    'dataset.urls': '', 'dataset.eval_urls': '', 'dataset.eval_samples': 10000,
    'dataset.webdataset.image': 'jpg;png;jpeg;webp', 'dataset.webdataset.text': 'txt',
    'dataset.webdataset.label': 'cls', 'dataset.shuffle_buffer': 10000, 'dataset.streams': 0,
    'dataset.workers': -1, 'dataset.crop': 'center', 'dataset.crop_scale': (0.9, 1.0),
    'dataset.max_bad_fraction': 0.05, 'dataset.mixture': (),
    # Memory (2026-12-02): the towers on the whole batch, every activation kept, plain
    # layers, float32 optimizer state, no memory cap.
    'microbatch_size': 0, 'model.remat': 'none', 'model.scan_layers': False,
    'optimizer.mu_dtype': 'float32', 'device_memory_gb': 0.0,
    # Observability (2026-12-02): no profiler trace, no Weights & Biases.
    'profile_steps': (), 'wandb.project': '', 'wandb.entity': '', 'wandb.name': '',
    'wandb.mode': 'online',
    # The persistent compilation cache (2026-12-07): the default folder.
    'compilation_cache_dir': '',
    # SigLIP 2's NaFlex (2026-12-07): earlier runs resized every image to a square.
    'dataset.resolution': 'square', 'dataset.max_patches': (256,), 'eval.max_patches': (),
    # Distillation from a teacher (2026-12-07): earlier runs learned from their loss alone.
    'distill.teacher': '', 'distill.weight': 1.0, 'distill.start_step': 0,
    # SigLIP 2's decoder (2026-12-07): earlier runs had none.
    'decoder.weight': 0.0, 'decoder.start_step': 0, 'decoder.tasks': ('caption', 'refer', 'ground'),
    'decoder.parallel_fraction': 0.75, 'decoder.width': 0, 'decoder.depth': 0,
    'decoder.heads': 0, 'decoder.mlp_dim': 0,
    # SigLIP 2's self-distillation (2026-12-08): earlier runs had no EMA teacher.
    'self_distill.weight': 0.0, 'self_distill.masked_weight': 0.0, 'self_distill.start_step': 0,
    'self_distill.momentum': 0.996, 'self_distill.local_views': 8, 'self_distill.local_size': 0,
    'self_distill.global_scale': (0.4, 1.0), 'self_distill.local_scale': (0.05, 0.4),
    'self_distill.mask_ratio': 0.5, 'self_distill.student_temperature': 0.1,
    'self_distill.teacher_temperature': 0.04, 'self_distill.patch_teacher_temperature': 0.07,
    'self_distill.center_momentum': 0.9, 'self_distill.head_hidden': 2048,
    'self_distill.head_bottleneck': 256, 'self_distill.prototypes': 65536,
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
  KEYS_ADDED_LATER, with keys renamed since under their new names. ConfigError,
  naming the keys, if the file is not JSON, not an object, lacks other keys, has
  keys jaxcl does not know, or values of the wrong type."""
  path = epath.Path(workdir) / CONFIG_FILE
  if not path.exists():
    raise ConfigError(f'{workdir} has no {CONFIG_FILE}: not a jaxcl workdir')
  try:
    saved = json.loads(path.read_text())
  except ValueError as e:
    raise ConfigError(f'{path} is not valid JSON ({errors.first_line(e)})') from None
  if not isinstance(saved, dict):
    raise ConfigError(f'{path} holds a JSON {type(saved).__name__}, not a config object')
  saved, defaults = config_files.with_new_names(_flatten(saved), path), flat_config(base_config())
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
  changed = sorted(k for k in set(saved) | set(new)
                   if saved.get(k) != new.get(k) and not allowed(k))
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
  for name in files.CLIP_BPE_FILES:  # likewise its CLIP BPE vocabulary
    if (epath.Path(workdir) / name).exists():
      config.text.vocab_file = str(epath.Path(workdir) / name)
  return config
