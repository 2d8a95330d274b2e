"""Experiment configs: every key with its default (`base_config`). Config
files start from `base_config()`; the config a run saves is
jaxcl.config.saved's; validation is the trainer's (jaxcl.trainer.validation).

Importing this module loads no jax, flax, TFDS or grain.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from jaxcl import errors, files, presets

CONFIG_FILE = files.CONFIG_FILE

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
      # 'square': every image resized to augment.image_size; 'naflex' (SigLIP 2, ViT towers):
      # at its own aspect ratio, as patches within max_patches (docs/naflex.md).
      resolution='square',
      max_patches=(256,),  # naflex: patch budgets, one drawn per global batch; eval: the largest
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
      # host crop to image_size: 'center', 'random' (random-resized; evaluation: center) or
      # 'squash' (the whole image, its aspect ratio lost: SigLIP's resize)
      crop='center',
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
      # sentencepiece: 'siglip' as SiglipTokenizer, 'lower' as SigLIP 2's Siglip2Tokenizer,
      # 'open_clip_canonicalize' (_lower, _whitespace) as open_clip's HFTokenizer cleans
      normalize='',
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

  # SigLIP 2's decoder (LocCa; jaxcl.models.decoder, jaxcl.data.locca; clip, siglip with a
  # ViT): a text decoder on the image tower's patch tokens trained on `tasks` (caption,
  # refer: a region's box as text, ground: a box's description), one drawn per example,
  # weight `weight` (0: no decoder) from `start_step`; parallel_fraction of the examples
  # predicted from mask tokens at once (CapPa's 0.75, big_vision). width, heads, mlp_dim 0:
  # the text tower's; depth 0: half its blocks (CapPa's 6 of 12).
  config.decoder = ml_collections.ConfigDict(dict(
      weight=0.0, start_step=0, tasks=('caption', 'refer', 'ground'), parallel_fraction=0.75,
      width=0, depth=0, heads=0, mlp_dim=0))

  # Distillation from a trained model (clip, siglip; open_clip's loss form,
  # jaxcl.losses.distill): `teacher` is a workdir (jaxcl train or jaxcl import)
  # whose image-text similarities the model learns beside its own loss, weight
  # `weight`, from step `start_step`; '' off. The teacher is frozen, sees the
  # same crops, and reads the captions with its own tokenizer.
  config.distill = ml_collections.ConfigDict(dict(teacher='', weight=1.0, start_step=0))

  # SigLIP 2's self-distillation (clip, siglip with a square ViT; jaxcl.trainer.ema_teacher):
  # from `start_step` (SigLIP 2: 80% of training) an EMA of the image tower and its heads
  # (fixed `momentum`, as SILC) teaches the tower. `weight`: SILC's local-to-global term, the
  # student's `local_views` crops (area `local_scale`, `local_size` px; 0: 3/7 of the image
  # size in whole patches, DINO's 96 of 224) matched to the teacher's global crop (area
  # `global_scale`). `masked_weight`: TIPS's masked term, `mask_ratio` of the student's patches
  # of that global crop masked and matched to the teacher's there. DINO's heads (MLP to
  # `head_bottleneck`, then `prototypes`), temperatures and center momentum; iBOT's patch
  # teacher temperature. Both weights 0: off.
  config.self_distill = ml_collections.ConfigDict(dict(
      weight=0.0, masked_weight=0.0, start_step=0, momentum=0.996, local_views=8,
      local_size=0, global_scale=(0.4, 1.0), local_scale=(0.05, 0.4), mask_ratio=0.5,
      student_temperature=0.1, teacher_temperature=0.04, patch_teacher_temperature=0.07,
      center_momentum=0.9, head_hidden=2048, head_bottleneck=256, prototypes=65536))

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
      # dataset.resolution=naflex: more patch budgets evaluated, each reported as
      # max_patches/N/zeroshot_top1 ...; the plain keys are the run's own (the largest of
      # dataset.max_patches).
      # `jaxcl eval --max_patches A,B` likewise.
      max_patches=(),
  ))
  return config
