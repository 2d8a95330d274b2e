"""Set-up: what a validated config builds before any step runs.

`setup(config)` makes the mesh, opens the training data once, builds the
method's model (as two graph definitions: train and eval mode), the
optimizer and its schedule, and for a text tower the tokenizer. The
Experiment then makes the train state, fresh or as the abstract layout that
checkpoints restore into.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils

from jaxcl import data, errors, methods, name_patterns, parallel
from jaxcl.data import augment
from jaxcl.losses import estimators
from jaxcl.methods.base import standardize
from jaxcl.models import param_groups
from jaxcl.text import tokenizers
from jaxcl.trainer import ema_teacher, optim, per_example


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes; all of it is checkpointed."""
  step: jax.Array  # int32 scalar: steps taken
  params: Any  # nnx.State of nnx.Param (towers, heads, log τ, SigLIP bias)
  batch_stats: Any  # nnx.State of nnx.BatchStat
  opt_state: Any
  rng: jax.Array  # uint32 key data; step s uses fold_in(rng, s)
  # Per training example (loss.estimator=sogclr): {name: [rows, ...]}, row i
  # the dataset's example i (rows padded to the batch shards), split over the
  # batch axes; {} otherwise.
  per_example: Any = dataclasses.field(default_factory=dict)
  # SigLIP 2's self-distillation teacher (config.self_distill): {'params': the
  # EMA copy of the taught parts, 'center': its running centers}; {} otherwise
  # (jaxcl.trainer.ema_teacher).
  ema: Any = dataclasses.field(default_factory=dict)


def rng_streams(seed: int) -> dict:
  """Independent keys for parameter init and for augmentation."""
  init, augment_key = jax.random.split(jax.random.key(seed))
  return {'init': init, 'augment': augment_key}


@dataclasses.dataclass
class Experiment:
  """A config made concrete: mesh, method, data, model definitions,
  optimizer. `dataset` and `train_source` are None when it was set up from
  a workdir's saved data facts (export needs no data)."""
  config: Any
  mesh: jax.sharding.Mesh
  method: Any  # jaxcl.methods.base.Method
  info: data.DatasetInfo
  dataset: data.Dataset | None
  train_source: Any  # random-access records of the pretraining split
  train_graphdef: Any
  eval_graphdef: Any
  optimizer: optax.GradientTransformation
  schedule: optax.Schedule
  tokenizer: tokenizers.Tokenizer | None = None  # text towers only
  # Examples of the training split (0 when unknown: set up from saved facts,
  # whose checkpoints give the per-example rows their size).
  train_examples: int = 0
  teacher: Any = None  # distill.teacher, once loaded (jaxcl.trainer.teacher.Teacher)

  def caption_fields(self):
    """What the data pipeline makes of captions: the tokenizer's ids, or a
    jaxcl.data.TextFields (a teacher's own ids, the decoder's rows)."""
    tokenizers = {'text': self.tokenizer}
    if self.teacher is not None and self.teacher.text_key != 'text':
      tokenizers[self.teacher.text_key] = self.teacher.tokenizer
    tasks = tuple(self.config.decoder.tasks) if self.config.decoder.weight else ()
    if len(tokenizers) == 1 and not tasks:
      return self.tokenizer
    return data.pipeline.TextFields(tokenizers, tasks)

  @property
  def replicated(self):
    return parallel.replicated(self.mesh)

  @property
  def patching(self) -> data.Patching | None:
    """dataset.resolution='naflex': how images become the ViT's patches."""
    return data.patching(self.config.dataset, self.config.model.vit.patch_size)

  def image_shapes(self, n: int):
    """(shape, dtype) of n images as the step and the embedders take them: uint8
    [n, H, W, C], or NaFlex patches and grids at the largest budget."""
    if self.patching is None:
      return (n, *self.info.image_shape), np.uint8
    return data.naflex.batch_shapes(n, self.patching.eval_budget, self.patching.patch_size,
                                    self.info.image_shape[-1])

  def _new_state(self) -> TrainState:
    model = _new_model(self.method, self.config, self.info, self.tokenizer)
    _, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    return TrainState(step=jnp.int32(0), params=params, batch_stats=batch_stats,
                      opt_state=self.optimizer.init(params),
                      rng=jax.random.key_data(rng_streams(self.config.seed)['augment']),
                      per_example=self._new_per_example(),
                      ema=ema_teacher.new_state(params, self.config))

  def _new_per_example(self) -> dict:
    if self.config.loss.estimator != 'sogclr':
      return {}
    rows = per_example.num_rows(self.train_examples, parallel.num_batch_shards(self.mesh))
    return estimators.new_tables(rows, self.config.temperature)

  def state_from_params(self, params) -> TrainState:
    """Step 0 with `params` (the model's nnx.State of parameters, e.g. a
    published checkpoint's): a fresh optimizer state and RNG; the model
    must have no batch statistics."""
    abstract = jax.eval_shape(self._new_state)
    if jax.tree.leaves(abstract.batch_stats):
      raise ValueError('a model with batch statistics cannot start from parameters alone')
    make = jax.jit(lambda p: TrainState(
        step=jnp.int32(0), params=p, batch_stats=abstract.batch_stats,
        opt_state=self.optimizer.init(p),
        rng=jax.random.key_data(rng_streams(self.config.seed)['augment']),
        per_example=self._new_per_example(), ema=ema_teacher.new_state(p, self.config)),
                   out_shardings=self.state_sharding, donate_argnums=0)
    return make(params)  # donated: the parameters are not held twice

  @functools.cached_property
  def state_sharding(self):
    """The state's layout: replicated, or with FSDP its large arrays split
    over the `fsdp` axis (jaxcl.parallel.state_shardings)."""
    abstract = jax.eval_shape(self._new_state)
    return parallel.state_shardings(self.mesh, abstract).replace(
        per_example=jax.tree.map(lambda _: parallel.batch_sharding(self.mesh),
                                 abstract.per_example))

  def init_state(self) -> TrainState:
    """A fresh state, created under jit directly in its layout."""
    return jax.jit(self._new_state, out_shardings=self.state_sharding)()

  def abstract_state(self) -> TrainState:
    """Shapes, dtypes and shardings of the state, for restoring checkpoints."""
    return jax.tree.map(lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                                                 sharding=sharding),
                        jax.eval_shape(self._new_state), self.state_sharding)

  def plain(self) -> Experiment:
    """This experiment without microbatches, remat or scanned layers: the
    same computation, with no loop in its step (whose FLOPs XLA then counts
    whole: jaxcl.trainer.step_memory)."""
    config = self.config.copy_and_resolve_references()
    config.microbatch_size = 0
    config.model.update(remat='none', scan_layers=False)
    train, evaluate = _graphdefs(self.method, config, self.info, self.tokenizer)
    return dataclasses.replace(self, config=config, train_graphdef=train, eval_graphdef=evaluate)

  def embed(self, params, batch_stats, images_uint8):
    """Frozen-encoder features of uint8 images [b, H, W, C] -> [b, D] float32:
    SimCLR's encoder output, or the two-tower model's normalized image embedding."""
    model = nnx.merge(self.eval_graphdef, params, batch_stats)
    return model.embed(self._eval_inputs(images_uint8))

  def predicted_temperature(self, params, batch_stats, images_uint8):
    """temperature.mode=predicted: τ(x) of uint8 images [b, H, W, C] -> [b]
    float32, the τ the loss gives the image as an anchor (its uncertainty)."""
    model = nnx.merge(self.eval_graphdef, params, batch_stats)
    anchors = self.method.image_anchors(model, self._eval_inputs(images_uint8))
    return model.temperature.of_embeddings(anchors)

  def _eval_inputs(self, images_uint8):
    """The encoder's standardized input for evaluation: images resized to
    augment.image_size, or NaFlex patches as they are (at their resolution)."""
    views = (images_uint8 if isinstance(images_uint8, dict)
             else augment.eval_view(images_uint8, self.config.augment.image_size))
    return standardize(views, self.config.dataset)

  def patch_tokens(self, params, batch_stats, images_uint8):
    """A two-tower ViT's patch tokens of uint8 images [b, H, W, C],
    flattened: float32 [b, patches x width] (the class token left out)."""
    model = nnx.merge(self.eval_graphdef, params, batch_stats)
    tokens, _ = model.image_encoder.tokens(self._eval_inputs(images_uint8))
    tokens = tokens[:, 1:] if model.image_encoder.cls is not None else tokens
    return tokens.reshape(tokens.shape[0], -1).astype(jnp.float32)

  def decoder_logits(self, params, batch_stats, images_uint8, ids):
    """The decoder's teacher-forced logits [b, L, V] of token ids [b, L] on
    uint8 images' tokens (config.decoder)."""
    model = nnx.merge(self.eval_graphdef, params, batch_stats)
    tokens, lengths = model.image_tokens(self._eval_inputs(images_uint8))
    return model.decoder(tokens, ids, jnp.zeros(ids.shape[0], bool), lengths)

  def embed_text(self, params, batch_stats, ids):
    """Normalized text embeddings of token ids int32 [b, L] -> [b, D] float32."""
    return nnx.merge(self.eval_graphdef, params, batch_stats).embed_text(ids)


def _frozen_names(optimizer_config, abstract_model) -> set[str]:
  """The names of optimizer.frozen's parameters; ConfigError for a pattern
  that is no regular expression or matches nothing."""
  o = optimizer_config
  patterns = name_patterns.as_patterns(o.frozen)
  names = param_groups.names(nnx.state(abstract_model, nnx.Param))
  try:  # (validation checked the syntax)
    multiplied = [p for p, _ in name_patterns.parse_multipliers(o.lr_multipliers,
                                                                'optimizer.lr_multipliers')]
  except ValueError as e:
    raise errors.ConfigError(str(e)) from None
  for key, checked in (('optimizer.frozen', patterns), ('optimizer.lr_multipliers', multiplied)):
    missing = name_patterns.unmatched(names, checked)
    if missing:
      raise errors.ConfigError(f'{key}: {missing[0]!r} matches no parameter of this model '
                               f'(names look like {names[0]!r})')
  return name_patterns.matching(names, patterns)


def _freeze_batch_norms(model, frozen: set[str]) -> None:
  """Batch norms whose scale is frozen normalize with their running
  statistics and stop updating them, as in inference: a locked tower (LiT)
  stays the tower it was."""
  for path, module in model.iter_modules():
    prefix = '/'.join(str(p) for p in path)
    if isinstance(module, nnx.BatchNorm) and f'{prefix}/scale' in frozen:
      module.use_running_average = True


def _new_model(method, config, info, tokenizer):
  rngs = nnx.Rngs(rng_streams(config.seed)['init'])
  return method.build_model(config, info.image_shape[-1], rngs, tokenizer)


def _graphdefs(method, config, info, tokenizer):
  """The model's graph definitions in train and in eval mode."""
  abstract_model = nnx.eval_shape(lambda: _new_model(method, config, info, tokenizer))
  _freeze_batch_norms(abstract_model, _frozen_names(config.optimizer, abstract_model))
  train_graphdef, _, _ = nnx.split(abstract_model, nnx.Param, nnx.BatchStat)
  abstract_model.eval()
  eval_graphdef, _, _ = nnx.split(abstract_model, nnx.Param, nnx.BatchStat)
  return train_graphdef, eval_graphdef


def setup(config, devices=None, tokenizer=None, info: data.DatasetInfo | None = None
          ) -> Experiment:
  """Builds the Experiment for a validated config on `devices` (default: all).

  tokenizer: for a text tower, the one a run was trained with (default: the
  one config.text describes). info: the data's facts as a workdir saved them;
  then no data is opened. Otherwise the training split is opened here (and
  an embedded dataset prepared, by one process)."""
  mesh = parallel.make_mesh(config.mesh, devices)
  method = methods.get(config.method)
  if method.text_tower and tokenizer is None:
    tokenizer = tokenizers.build_tokenizer(config.text)
  dataset = train_source = None
  if info is None:
    dataset = data.Dataset(config.dataset, config.model.vit.patch_size)
    if jax.process_count() > 1:  # one process prepares an embedded or converted dataset
      if jax.process_index() == 0:
        dataset.training(with_text=method.text_tower)
      multihost_utils.sync_global_devices('jaxcl: dataset prepared')
    train_source, info = dataset.training(with_text=method.text_tower)
  train_graphdef, eval_graphdef = _graphdefs(method, config, info, tokenizer)
  return Experiment(config=config, mesh=mesh, method=method, info=info, dataset=dataset,
                    train_source=train_source, train_graphdef=train_graphdef,
                    eval_graphdef=eval_graphdef,
                    optimizer=optim.build_optimizer(config, config.total_steps),
                    schedule=optim.learning_rate_schedule(config, config.total_steps),
                    tokenizer=tokenizer if method.text_tower else None,
                    train_examples=_train_examples(config, train_source))


def _train_examples(config, train_source) -> int:
  """The training split's size, which per-example state needs (0 when the
  split is not open); ConfigError for such state over a stream of shards."""
  size = None if train_source is None else data.known_size(train_source)
  if config.loss.estimator != 'batch' and train_source is not None and size is None:
    raise errors.ConfigError(f'loss.estimator={config.loss.estimator} keeps state per '
                             f'training example and needs a dataset of known size; '
                             f'{config.dataset.name} is a stream of shards')
  return size or 0
