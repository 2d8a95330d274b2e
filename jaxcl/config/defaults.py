"""Experiment configs: every key with its default (`base_config`), the
config a run saves in its workdir and reads back, and which changes a
resumed run may make. Config files start from `base_config()`; validation
is the trainer's (jaxcl.trainer.validation).

Importing this module loads no jax, flax, TFDS or grain.
"""

from __future__ import annotations

import json

import ml_collections
from etils import epath
from ml_collections import config_dict

from jaxcl import errors, files, presets
from jaxcl.config import config_files

CONFIG_FILE = files.CONFIG_FILE

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


ConfigError = errors.ConfigError


# ---------------------------------------------------------------- defaults ---
def base_config():
  """Every key a config may set, with its default: SimCLR on digits with a
  small ResNet at 16 px for 1,500 steps (configs/simclr_digits.py shortens
  it to 600). Config files start from this and override what their recipe
  changes."""
  config = ml_collections.ConfigDict()
  config.name = ''
  # simclr: two augmented views of an image, NT-Xent. clip / siglip: image and
  # caption through two towers, CLIP's softmax loss or SigLIP's sigmoid loss.
  config.method = 'simclr'
  config.seed = 0
  config.total_steps = 1500
  config.batch_size = 256
  # Global rows per chunk of the towers (0: the whole batch at once): the step computes
  # the exact global-batch gradient holding one chunk's activations (jaxcl.trainer.grad_cache).
  config.microbatch_size = 0
  # Memory per device a compiled step may use, in GiB (0: what the device reports; CPUs
  # report none). A step that needs more stops before the run writes anything.
  config.device_memory_gb = 0.0
  # jax's persistent compilation cache (jaxcl.trainer.compilation_cache): '' =
  # $JAX_COMPILATION_CACHE_DIR, else WORKDIR/compilation_cache on gs://, else
  # ~/.cache/jaxcl/compilation; 'none': off.
  config.compilation_cache_dir = ''
  config.log_every_steps = 50
  config.eval_every_steps = 500
  config.checkpoint_every_steps = 500
  config.keep_checkpoints = 3
  # A step whose loss or gradient norm is NaN/inf: 'stop' (an error naming the
  # step and the last good checkpoint) or 'skip' (the state stays as it was;
  # counted and logged as `skipped`).
  config.nonfinite = 'stop'
  # (A, B): a jax.profiler trace of steps A..B in WORKDIR/plugins
  # (jaxcl.trainer.profiling); (): none.
  config.profile_steps = ()
  # Weights & Biases, from process 0, when `project` is set (pip install wandb): every
  # metrics.jsonl record, the flat config; name '' is the config's name or the workdir's;
  # mode 'online', 'offline' (WORKDIR/wandb, for `wandb sync`) or 'disabled'.
  config.wandb = ml_collections.ConfigDict(dict(project='', entity='', name='', mode='online'))

  # -1: all remaining devices. The batch is split over both axes; parameters
  # and optimizer state are replicated over `data` and sharded over `fsdp`.
  config.mesh = ml_collections.ConfigDict({'data': -1, 'fsdp': 1})

  config.dataset = ml_collections.ConfigDict(dict(
      name='digits',
      data_dir=config_dict.placeholder(str),  # unset or '': TFDS's (~/tensorflow_datasets)
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
      # name='webdataset': tar shards ('DIR/shard-{000000..000099}.tar'; sources joined by
      # '::'; local or gs://), streamed: see jaxcl.data.stream.
      urls='',
      eval_urls='',  # held-out shards: the 'test' split (retrieval, zero-shot, kNN, probe)
      eval_samples=10000,  # the 'train' split of a webdataset: its first samples (kNN, probe)
      webdataset=ml_collections.ConfigDict(dict(image='jpg;png;jpeg;webp', text='txt',
                                                label='cls')),  # member extensions
      shuffle_buffer=10000,  # samples shuffled among, over all streams (encoded, in memory)
      streams=0,  # shard streams making up the global batch; 0: up to 64 per process
      workers=-1,  # decoding processes per host; -1: its cores, 0: in the training process
      crop='center',  # host crop to image_size: 'center', or 'random' (random-resized)
      crop_scale=(0.9, 1.0),  # crop='random': the area fraction kept (open_clip's)
      max_bad_fraction=0.05,  # stop when more of the samples read are bad
      # name='mixture': 'SOURCE=WEIGHT' entries, SOURCE one of shards:URLS, pairs:FILE,
      # folder:PATH or a TFDS name; streamed like shards, evaluated on the first's splits.
      mixture=(),
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
      # ViT and text towers: what a block keeps for the backward pass ('none': everything;
      # 'full': nothing, recomputed; 'dots' / 'dots_no_batch': matmul outputs; the blocks
      # then run scanned), and scan_layers: one compiled block scanned over the depth.
      # Parameters are laid out alike either way.
      remat='none',
      scan_layers=False,
      embed_dim=128,  # clip/siglip: the shared embedding size of both towers
      # clip/siglip: False when the image tower's output is the embedding (SigLIP's MAP head)
      image_projection=True,
      # ViT sizes (model.name 'vit', or non-zero to override a preset such as vit_b16), and
      # the switches of the published ViTs (jaxcl.models.transformer;
      # presets.ARCHITECTURES sets them)
      vit=ml_collections.ConfigDict(dict(patch_size=0, width=0, depth=0, heads=0, mlp_dim=0,
                                         pool='gap',  # or 'cls' (CLIP), 'map' (SigLIP)
                                         act='gelu_tanh',  # or 'gelu', 'quick_gelu'
                                         norm_eps=1e-6, pre_norm=False, patch_bias=True)),
  ))

  # clip/siglip: the text tower and its tokenizer.
  config.text = ml_collections.ConfigDict(dict(
      tokenizer='bytes',  # or 'sentencepiece' with a model file, or 'clip_bpe' with a vocab file:
      sentencepiece_model='',
      vocab_file='',  # open_clip's bpe_simple_vocab_16e6.txt.gz or a CLIP tokenizer.json
      pad_id=-1,  # -1: the tokenizer's own; SigLIP's (c4_en) pads with its EOS, 1
      normalize='',  # sentencepiece: 'siglip' canonicalizes text as SiglipTokenizer
      max_length=64,  # tokens, end-of-text included
      width=256,
      depth=4,
      heads=4,
      mlp_dim=1024,
      causal=True,  # CLIP's text tower is causal; False: bidirectional
      pool='eot',  # pooled at the end-of-text token; 'last': the last position (SigLIP)
      act='gelu_tanh',  # or 'gelu', 'quick_gelu'
      norm_eps=1e-6,
      projection_bias=False,  # SigLIP's text head has one
  ))

  # How the global-batch loss is computed (values and gradients agree):
  # dense materializes each device's n x N logits; blockwise and ring compute
  # them in block_size x block_size tiles (jaxcl.losses.tiled), with the other devices'
  # embeddings all-gathered once (blockwise) or passed around a ring (ring);
  # auto: dense while a device's logits are small, blockwise above
  # (jaxcl.losses.contrastive.AUTO_DENSE_MAX_LOGITS). estimator: how each
  # anchor's negative term is estimated: from the batch alone, or SogCLR's
  # per-example moving average, weight sogclr_gamma on the batch
  # (jaxcl.losses.estimators; SimCLR and CLIP).
  config.loss = ml_collections.ConfigDict(dict(
      impl=presets.LOSS_IMPL, block_size=presets.LOSS_BLOCK_SIZE, estimator='batch',
      sogclr_gamma=0.9))

  # mode (jaxcl.models.temperature; docs/temperature.md): fixed (τ = init) |
  # learnable (log τ trained, clamped to [min, max]) | cosine (between max and
  # min with `period` steps; 0: total_steps) | free (no τ: the τ-free loss) |
  # individual (a τ per training example) | predicted (a τ per input, from
  # the embedding).
  config.temperature = ml_collections.ConfigDict(dict(
      mode='learnable', init=0.2, min=0.01, max=1.0,
      warmup_steps=0,  # learnable: τ held at init for these first steps
      lr_multiplier=1.0,  # learnable: log τ's learning rate = this x the model's
      period=0,  # cosine
      # clip: a second τ (the same mode and init) for text-to-image, image-to-text keeping the first
      per_direction=False,
      # individual (iSogCLR, with loss.estimator=sogclr): each example's τ
      # starts at init and takes steps of individual_eta along its own
      # gradient (moving average weight individual_beta), in [min, max];
      # individual_rho: the robust objective's KL budget ρ
      individual_rho=0.3, individual_eta=0.01, individual_beta=0.9,
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
      mu_dtype='float32',  # or 'bfloat16': adamw's first moment, sgd's momentum (big_vision's)
      # Regular expressions over parameter names ('image_encoder/.*': the image tower;
      # jaxcl.models.param_groups): frozen parameters get no optimizer state and no gradient,
      # and a tower frozen whole runs no backward pass (LiT locks the image tower).
      frozen=(),
      # 'PATTERN=FACTOR' strings: those parameters' learning rate times FACTOR (first match).
      lr_multipliers=(),
  ))

  # Start from trained weights (a fresh run only; a resumed run reads its checkpoint):
  # `source` is a jaxcl workdir or a directory `jaxcl import` reads (open_clip,
  # transformers). `load` names the parts taken from it: () all of them (the same
  # architecture), or towers: 'image', 'text', 'temperature' (τ and SigLIP's bias).
  # A ViT's position embeddings are interpolated to a new image size. (`source` was
  # `from` until 2026-12-07, a name config files and saved configs may still use:
  # config_files.RENAMED_KEYS.)
  config.init = ml_collections.ConfigDict(dict(source='', load=()))

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
      # clip/siglip: more zero-shot datasets, each reported as zeroshot/KEY/top1|top5
      # (jaxcl.evaluation.zeroshot_suite): 'cifar100', 'imagenet2012', 'imagenet_v2:test' (TFDS,
      # prepared), 'folder:/data/pets' (PATH/CLASS/*.png); '=LIST' picks a shipped
      # name/template list ('folder:/data/in1k_val=imagenet'); the ImageNet and CIFAR
      # families get theirs by default. `jaxcl eval --zeroshot A,B` replaces it for one call.
      zeroshot=(),
      # and image-text retrieval datasets (TFDS, 'coco_captions'), each reported as
      # retrieval/KEY/i2t_r1 ... t2i_r10; `jaxcl eval --retrieval A,B` likewise.
      retrieval=(),
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
