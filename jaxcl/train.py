"""jaxcl's trainer, top to bottom: set-up, mesh, input, model, step,
checkpoint, evaluation, loop. One trainer for all three methods
(`config.method`): simclr, clip and siglip.

One global batch flows like this: each process reads its rows of uint8
images (and, for clip/siglip, one tokenized caption per image) with grain
(jaxcl.data) and places them on the mesh as global arrays split over the
`data` axis (jaxcl.parallel). Inside the jitted step the device augments the
images (jaxcl.augment: two views for SimCLR, one light crop for CLIP), the
towers run on the whole batch under GSPMD (so batch-norm statistics are
global), and the loss runs in `jax.shard_map`: each device scores its rows
against the embeddings gathered from all devices (jaxcl.losses). `jax.grad`
is taken outside the shard_map, the optimizer updates the replicated
parameters, and the temperature is clamped back into range.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import signal
import sys
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P

from jaxcl import (augment, data, errors, evaluate, files, losses, models, optim, parallel,
                   throughput, tokenizers)
from jaxcl import config as config_lib
from jaxcl import lock as lock_lib
from jaxcl.metric_writer import MetricWriter
from jaxcl.temperature import project_all

EVAL_FILE = files.EVAL_FILE


# ================================================================ state ====
@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes; all of it is checkpointed."""
  step: jax.Array  # int32 scalar: steps taken
  params: Any  # nnx.State of nnx.Param (towers, heads, log τ, SigLIP bias)
  batch_stats: Any  # nnx.State of nnx.BatchStat
  opt_state: Any
  rng: jax.Array  # uint32 key data; step s uses fold_in(rng, s)


# =============================================================== set-up ====
@dataclasses.dataclass
class Experiment:
  """What a config builds before any data flows: the mesh, the model's two
  graph definitions (train and eval mode), the optimizer and its schedule,
  and for two towers the tokenizer."""
  config: Any
  mesh: jax.sharding.Mesh
  info: data.DatasetInfo
  train_source: Any  # random-access records of the pretraining split
  train_graphdef: Any
  eval_graphdef: Any
  optimizer: optax.GradientTransformation
  schedule: optax.Schedule
  tokenizer: tokenizers.Tokenizer | None = None  # clip/siglip only

  @property
  def two_tower(self) -> bool:
    return self.config.method in config_lib.TWO_TOWER

  @property
  def replicated(self):
    return parallel.replicated(self.mesh)

  def _new_state(self) -> TrainState:
    model = _new_model(self.config, self.info, self.tokenizer)
    _, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    return TrainState(step=jnp.int32(0), params=params, batch_stats=batch_stats,
                      opt_state=self.optimizer.init(params),
                      rng=jax.random.key_data(rng_streams(self.config.seed)['augment']))

  @functools.cached_property
  def state_sharding(self):
    """The state's layout: replicated, or with FSDP its large arrays split
    over the `fsdp` axis (jaxcl.parallel.state_shardings)."""
    return parallel.state_shardings(self.mesh, jax.eval_shape(self._new_state))

  def init_state(self) -> TrainState:
    """A fresh state, created under jit directly in its layout."""
    return jax.jit(self._new_state, out_shardings=self.state_sharding)()

  def abstract_state(self) -> TrainState:
    """Shapes, dtypes and shardings of the state, for restoring checkpoints."""
    return jax.tree.map(lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                                                 sharding=sharding),
                        jax.eval_shape(self._new_state), self.state_sharding)

  def model_inputs(self, images):
    """float32 images in [0, 1] -> the encoder's normalized input."""
    return augment.standardize(images, self.config.dataset.mean, self.config.dataset.std)

  def embed(self, params, batch_stats, images_uint8):
    """Frozen-encoder features of uint8 images [b, H, W, C] -> [b, D] float32:
    SimCLR's encoder output, or the two-tower model's normalized image embedding."""
    model = nnx.merge(self.eval_graphdef, params, batch_stats)
    views = augment.eval_view(images_uint8, self.config.augment.image_size)
    return model.embed(self.model_inputs(views))

  def embed_text(self, params, batch_stats, ids):
    """Normalized text embeddings of token ids int32 [b, L] -> [b, D] float32."""
    return nnx.merge(self.eval_graphdef, params, batch_stats).embed_text(ids)


def rng_streams(seed: int) -> dict:
  """Independent keys for parameter init and for augmentation."""
  init, augment_key = jax.random.split(jax.random.key(seed))
  return {'init': init, 'augment': augment_key}


def _new_model(config, info, tokenizer):
  return models.build_model(config, info.image_shape[-1], nnx.Rngs(rng_streams(config.seed)['init']),
                            tokenizer)


def setup(config, devices=None, tokenizer=None) -> Experiment:
  """Builds the Experiment for a validated config on `devices` (default: all).
  The dataset's metadata is read, and the embedded dataset prepared, here.
  tokenizer: for clip/siglip, the one a run was trained with (default: the
  one config.text describes)."""
  mesh = parallel.make_mesh(config.mesh, devices)
  two_tower = config.method in config_lib.TWO_TOWER
  if two_tower and tokenizer is None:
    tokenizer = tokenizers.build_tokenizer(config.text)
  if jax.process_count() > 1:  # one process prepares an embedded or converted dataset
    if jax.process_index() == 0:
      data.load_source(config.dataset, config.dataset.train_split, with_text=two_tower)
    multihost_utils.sync_global_devices('jaxcl: dataset prepared')
  train_source, info = data.load_source(config.dataset, config.dataset.train_split,
                                        with_text=two_tower)
  abstract_model = nnx.eval_shape(lambda: _new_model(config, info, tokenizer))
  train_graphdef, _, _ = nnx.split(abstract_model, nnx.Param, nnx.BatchStat)
  abstract_model.eval()
  eval_graphdef, _, _ = nnx.split(abstract_model, nnx.Param, nnx.BatchStat)
  schedule = optim.learning_rate_schedule(config, config.total_steps)
  return Experiment(config=config, mesh=mesh, info=info, train_source=train_source,
                    train_graphdef=train_graphdef,
                    eval_graphdef=eval_graphdef,
                    optimizer=optim.build_optimizer(config, config.total_steps),
                    schedule=schedule, tokenizer=tokenizer if two_tower else None)


# ================================================================= step ====
def make_loss_and_grads(exp: Experiment):
  """(state, batch) -> ((loss, aux), grads) for the config's method.

  batch: {'image': uint8 [N, H, W, C]} (+ 'text': int32 [N, L] for
  clip/siglip), split over the batch axes. aux = (metrics, new batch stats,
  τ, SigLIP bias or None). The loss is computed in shard_map over the global
  batch, every device's embeddings gathered.
  """
  method, batch_spec = exp.config.method, P(parallel.BATCH_AXES)

  def loss(a, b, tau, bias):
    kwargs = dict(temperature=tau, axis_name=parallel.BATCH_AXES, with_metrics=True,
                  impl=exp.config.loss.impl, block_size=exp.config.loss.block_size)
    if method == 'simclr':
      value, metrics = losses.nt_xent(a, b, **kwargs)
    elif method == 'clip':
      value, metrics = losses.clip_loss(a, b, **kwargs)
    else:
      value, metrics = losses.siglip_loss(a, b, bias=bias, **kwargs)
    geometry = losses.alignment_uniformity(jax.lax.stop_gradient(a), jax.lax.stop_gradient(b),
                                           axis_name=parallel.BATCH_AXES)
    return value, {**metrics, **geometry}

  loss_on_mesh = jax.shard_map(loss, mesh=exp.mesh, in_specs=(batch_spec, batch_spec, P(), P()),
                               out_specs=(P(), P()))

  def loss_and_grads(state: TrainState, batch):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    images = batch['image']
    n = images.shape[0]
    if method == 'simclr':
      view1, view2 = augment.two_views(key, images, exp.config.augment)
      # Interleave the views, [N, 2, ...] -> [2N, ...], so each device's rows stay on it.
      inputs = exp.model_inputs(
          jnp.stack([view1, view2], axis=1).reshape(2 * n, *view1.shape[1:]))
    else:  # one light crop per image; the caption is the other "view"
      inputs = exp.model_inputs(augment.random_views(key, images, exp.config.augment, 1)[0])

    def loss_fn(params):
      model = nnx.merge(exp.train_graphdef, params, state.batch_stats, copy=True)
      if method == 'simclr':
        z = model(inputs).reshape(n, 2, -1)
        a, b = z[:, 0], z[:, 1]
      else:
        a, b = model(inputs, batch['text'])
      tau = model.temperature(state.step)
      bias = model.bias() if method == 'siglip' else None
      value, metrics = loss_on_mesh(a, b, tau, jnp.float32(0) if bias is None else bias)
      return value, (metrics, nnx.state(model, nnx.BatchStat), tau, bias)

    return jax.value_and_grad(loss_fn, has_aux=True)(state.params)

  return loss_and_grads


def make_train_step(exp: Experiment):
  """The jitted step: (state, batch) -> (new state, metrics). The state is
  replicated and donated; the batch is split over the batch axes."""
  loss_and_grads = make_loss_and_grads(exp)

  def train_step(state: TrainState, batch):
    (loss, (metrics, batch_stats, tau, bias)), grads = loss_and_grads(state, batch)
    updates, opt_state = exp.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # Clamp log τ into [log τ_min, log τ_max] after the update (open_clip's way).
    model = nnx.merge(exp.train_graphdef, params, batch_stats)
    project_all(model)
    params = nnx.state(model, nnx.Param)
    grad_norm = optax.global_norm(grads)
    metrics = dict(metrics, loss=loss, temperature=tau, inv_temperature=1.0 / tau,
                   grad_norm=grad_norm, learning_rate=exp.schedule(state.step))
    if bias is not None:
      metrics['bias'] = bias
    updated = (params, batch_stats, opt_state)
    if exp.config.nonfinite == 'skip':  # a non-finite step leaves the state as it was
      finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
      updated = jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated,
                             (state.params, state.batch_stats, state.opt_state))
      metrics['skipped'] = 1.0 - finite.astype(jnp.float32)
    params, batch_stats, opt_state = updated
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                              opt_state=opt_state)
    return new_state, metrics

  return jax.jit(train_step, in_shardings=(exp.state_sharding, parallel.batch_sharding(exp.mesh)),
                 out_shardings=(exp.state_sharding, exp.replicated), donate_argnums=0)


def model_batch(exp: Experiment, batch: dict) -> dict:
  """The arrays of a host batch the step reads (the labels it does not)."""
  keys = ('image', 'text') if exp.two_tower else ('image',)
  return {k: batch[k] for k in keys}


# =========================================================== checkpoint ====
def checkpoint_manager(workdir, config, *, cleanup: bool = False,
                       read_only: bool = False) -> ocp.CheckpointManager:
  """cleanup: delete unfinished checkpoint writes left by a killed run (orbax
  writes to a temporary directory and renames it when complete, so those
  are never restored); only the run that holds the workdir may do this.
  read_only: for eval and export, which write nothing in the workdir."""
  # (orbax's own read_only option logs three warnings; not creating the
  # folder and not saving is all these commands need.)
  options = ocp.CheckpointManagerOptions(max_to_keep=config.get('keep_checkpoints', 3),
                                         enable_async_checkpointing=not read_only,
                                         cleanup_tmp_directories=cleanup and not read_only,
                                         create=not read_only)
  return ocp.CheckpointManager(epath.Path(workdir).absolute() / files.CHECKPOINT_DIR,
                               options=options)


def save_checkpoint(manager, state: TrainState) -> None:
  """Starts writing the train state, RNG included, in the background. The
  data position is not saved: it follows from the step
  (jaxcl.data.train_iterator). A failed write (here or, for the previous
  background one, at this call) raises CheckpointError."""
  try:
    manager.save(int(state.step), args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
  except Exception as e:  # pylint: disable=broad-except  # tensorstore errors come in many types
    raise _write_failed(manager, e) from None


def finish_checkpoints(manager) -> None:
  """Blocks until the background checkpoint writes are complete."""
  try:
    manager.wait_until_finished()
  except Exception as e:  # pylint: disable=broad-except
    raise _write_failed(manager, e) from None


def complete_step(workdir) -> int | None:
  """The newest checkpoint on disk whose write completed, None if none. A
  write orbax did not finish (killed, or the disk filled) has no final
  directory name or no commit marker, and is never restored."""
  path = epath.Path(workdir) / 'checkpoints'
  try:
    steps = [int(p.name) for p in path.iterdir() if p.name.isdigit()
             and (p / 'commit_success.txt').exists()] if path.exists() else []
  except OSError:  # called while reporting a storage failure: unknown, not a traceback
    return None
  return max(steps, default=None)


def _write_failed(manager, e: Exception) -> CheckpointError:
  return CheckpointError(
      f'writing a checkpoint in {manager.directory} failed ({_first_line(e)}); the last '
      f'complete checkpoint is step {complete_step(manager.directory.parent)}; the unfinished '
      f'one is never restored')


def _close_after_failure(*closables) -> None:
  for closable in closables:
    try:
      closable.close()
    except Exception:  # pylint: disable=broad-except  # the failure is being reported
      pass


def restore_checkpoint(manager, exp: Experiment, step=None):
  """The state of checkpoint `step` (default: the latest) in the layout of
  exp's mesh, whatever mesh wrote it. Returns None when there is none."""
  step = manager.latest_step() if step is None else step
  if step is None:
    return None
  return manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(exp.abstract_state()))).state


def restore_newest(manager, exp: Experiment):
  """(state, failures): the newest checkpoint that restores, and the
  (step, reason) of each newer one that did not (a truncated or missing
  file, an interrupted copy). (None, []) when there are no checkpoints;
  CheckpointError when there are some and none restores."""
  failures = []
  for step in sorted(manager.all_steps(), reverse=True):
    for attempt in range(2):  # once more: a transient read error (a 503) is not corruption
      try:
        state, error = restore_checkpoint(manager, exp, step=step), None
        break
      except Exception as e:  # pylint: disable=broad-except  # orbax/tensorstore raise many types
        state, error = None, _first_line(e)
        if attempt == 0 and jax.process_count() == 1:
          time.sleep(1.0)
          continue
        break
    if jax.process_count() > 1:  # all processes resume from the same step, or none does
      restored = multihost_utils.process_allgather(np.int32(error is None))
      if error is None and not np.all(restored):
        state, error = None, 'another process could not restore it'
    if error is None:
      return state, failures
    failures.append((step, error))
  if failures:
    raise CheckpointError(
        f'no checkpoint in {manager.directory} restores (' +
        '; '.join(f'step {s}: {e}' for s, e in failures) + '); nothing was changed: move '
        'them away to start over')
  return None, []


def set_aside(workdir, steps) -> epath.Path:
  """Moves unrestorable checkpoints out of the manager's sight (so that they
  neither count towards keep_checkpoints nor get deleted) into
  workdir/unrestorable_checkpoints/STEP-TIME, for inspection."""
  workdir = epath.Path(workdir)
  aside = workdir / 'unrestorable_checkpoints'
  if jax.process_index() == 0:
    aside.mkdir(parents=True, exist_ok=True)
    for step in steps:
      (workdir / 'checkpoints' / str(step)).rename(aside / f'{step}-{int(time.time())}')
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('jaxcl: unrestorable checkpoints set aside')
  return aside


def _first_line(e: BaseException, limit: int = 300) -> str:
  text = errors.first_line(e, '').split('. See full TensorStore details')[0]
  text = f'{type(e).__name__}: {text}' if text else type(e).__name__
  return text if len(text) <= limit else text[:limit] + '...'


# =========================================================== evaluation ====
class EvalData:
  """The splits the frozen model is evaluated on, opened once.

  simclr: the labeled train and test splits (kNN bank, probe). clip/siglip:
  the test split with its captions (retrieval) and a labeled split with class
  names and prompt templates (zero-shot), by default the same test split.
  """

  def __init__(self, config):
    d = config.dataset
    self.num_classes, self.class_names, self.templates = 0, (), ()
    self.train = self.test = None
    missing = [m for m in (data.split_missing(d, d.eval_train_split),
                           data.split_missing(d, d.eval_test_split)) if m]
    if missing:  # an image folder without test/: trained, not evaluated
      self.skip_reason = f'{missing[0]} does not exist'
      return
    self.skip_reason = 'the evaluation splits have no labels'
    if config.method not in config_lib.TWO_TOWER:
      self.train, info = data.load_source(d, d.eval_train_split)
      self.test, _ = data.load_source(d, d.eval_test_split)
      self.num_classes = info.num_classes
      return
    self.test, _ = data.load_source(d, d.eval_test_split, with_text=True)
    self.captions = [self.test[i]['captions'] for i in range(len(self.test))]
    self.zeroshot, self.class_names, self.templates = zeroshot_data(config, self.test)
    self.num_classes = len(self.class_names)


def zeroshot_data(config, test_source=None):
  """(labeled source, class names, prompt templates) of zero-shot
  classification: eval.zeroshot_dataset (default: the training dataset) at
  eval.zeroshot_split (default: eval_test_split), read with the training
  dataset's keys; eval.class_names or the label feature's names;
  eval.zeroshot_templates or the dataset's own. No names: zero-shot is
  skipped, unless the user asked for a zero-shot dataset (an error)."""
  d, e = config.dataset, config.eval
  split = e.zeroshot_split or d.eval_test_split
  zs = ml_collections.ConfigDict(d.to_dict())
  zs.name = e.zeroshot_dataset or d.name
  source, info = data.load_source(zs, split)
  if test_source is not None and zs.name == d.name and split == d.eval_test_split:
    source = test_source  # the retrieval split: read its images once
  names = tuple(e.class_names) or info.class_names
  if e.class_names and len(names) != info.num_classes:
    raise config_lib.ConfigError(f'eval.class_names has {len(names)} names, the labels of '
                                 f'{zs.name!r} have {info.num_classes} classes')
  if e.zeroshot_dataset and not names:
    raise config_lib.ConfigError(f'eval.zeroshot_dataset {zs.name!r} has no class names in '
                                 f'its {d.label_key!r} feature; set eval.class_names')
  if names and zs.name != d.name:
    channels = data.load_source(d, d.train_split)[1].image_shape[-1]
    if info.image_shape[-1] != channels:
      raise config_lib.ConfigError(f'eval.zeroshot_dataset {zs.name!r} images have '
                                   f'{info.image_shape[-1]} channels, the training images '
                                   f'{channels}')
  return source, names, tuple(e.zeroshot_templates) or data.zeroshot_templates(zs.name)


def run_evaluation(exp: Experiment, state: TrainState, eval_data: EvalData, embed_fns) -> dict:
  """The frozen model's evaluation (fractions in [0, 1]).

  simclr: {'knn_top1', 'linear_top1'} ({} when the splits have no labels).
  clip/siglip: zero-shot top-1/5 (when a labeled split is there) and
  image-to-text / text-to-image recall@1/5/10.
  """
  if exp.two_tower:
    return _two_tower_evaluation(exp, state, eval_data, embed_fns)
  if not eval_data.num_classes:
    return {}
  cfg = exp.config.eval
  image_features = functools.partial(embed_fns['image'], state.params, state.batch_stats)
  train = evaluate.extract_features(image_features, exp.mesh, eval_data.train,
                                    batch_size=cfg.batch_size,
                                    max_examples=cfg.max_train_examples or None,
                                    seed=exp.config.seed)
  test = evaluate.extract_features(image_features, exp.mesh, eval_data.test,
                                   batch_size=cfg.batch_size)
  return evaluate.evaluate_features(train, test, eval_data.num_classes, cfg)


def _two_tower_evaluation(exp, state, eval_data: EvalData, embed_fns) -> dict:
  batch_size = exp.config.eval.batch_size
  image_features = functools.partial(embed_fns['image'], state.params, state.batch_stats)
  text_features = functools.partial(embed_fns['text'], state.params, state.batch_stats)
  results = {}
  if eval_data.num_classes:
    prompts = [t.format(name) for name in eval_data.class_names for t in eval_data.templates]
    ids = exp.tokenizer.encode(prompts)
    text = evaluate.embed_rows(text_features, exp.mesh, ids, batch_size=batch_size)
    classifier = evaluate.zeroshot_classifier(
        text.reshape(len(eval_data.class_names), len(eval_data.templates), -1))
    images, labels = evaluate.extract_features(image_features, exp.mesh, eval_data.zeroshot,
                                               batch_size=batch_size)
    keep = labels >= 0  # images without a single class label (e.g. two shapes) are not scored
    results.update(evaluate.zeroshot_accuracy(images[keep], labels[keep], classifier))
  if eval_data.zeroshot is eval_data.test and eval_data.num_classes:
    test_images = images
  else:
    test_images, _ = evaluate.extract_features(image_features, exp.mesh, eval_data.test,
                                               batch_size=batch_size)
  captions = [c for caps in eval_data.captions for c in caps]
  owner = np.repeat(np.arange(len(eval_data.captions)), [len(c) for c in eval_data.captions])
  text = evaluate.embed_rows(text_features, exp.mesh, exp.tokenizer.encode(captions),
                             batch_size=batch_size)
  results.update(evaluate.retrieval_recall(test_images, text, owner))
  return results


def make_embed_fns(exp: Experiment) -> dict:
  """Jitted (params, batch_stats, batch) -> embeddings: 'image' (uint8
  images) and, for two towers, 'text' (token ids); batch-sharded."""
  batch = parallel.batch_sharding(exp.mesh)
  state = exp.state_sharding
  shardings = dict(in_shardings=(state.params, state.batch_stats, batch), out_shardings=batch)
  fns = {'image': jax.jit(exp.embed, **shardings)}
  if exp.two_tower:
    fns['text'] = jax.jit(exp.embed_text, **shardings)
  return fns


def write_eval(workdir, step: int, results: dict) -> None:
  if jax.process_index() == 0:
    files.write_atomically(epath.Path(workdir) / EVAL_FILE,
                           json.dumps({'step': int(step), **results}, indent=2) + '\n')


# ================================================================= loop ====
def train_and_evaluate(config, workdir, *, allow_batch_change: bool = False) -> dict:
  """Trains, evaluates and checkpoints a validated config in `workdir`;
  resumes from the newest checkpoint there that restores, on whatever mesh
  this run has. Returns the final eval results; raises errors.Interrupted
  when SIGTERM or Ctrl-C stopped it (after saving its step).
  allow_batch_change: resume a run whose global batch_size was different."""
  workdir = epath.Path(workdir)
  # Everything that can fail on bad input comes before the first write.
  check_trainable_workdir(workdir)
  config_lib.check_resumable(config, workdir, allow_batch_change)
  resuming = (workdir / config_lib.CONFIG_FILE).exists()
  exp = setup(config, tokenizer=saved_tokenizer(workdir) if resuming else None)
  if len(exp.train_source) < config.batch_size:
    raise config_lib.ConfigError(
        f'dataset {config.dataset.name!r} has {len(exp.train_source)} training example(s), fewer '
        f'than one batch of {config.batch_size}; lower batch_size or add data')
  eval_data = EvalData(config)
  with hold_workdir(workdir) as lock:
    notes = [f'jaxcl: took over the lock of a run that is gone: {lock_lib.describe(lock.took_over)}'
             ] if lock.took_over is not None else []
    try:
      return _train_and_evaluate(exp, eval_data, workdir, notes, lock)
    except OSError as e:  # writing the run's files: a full disk, a lost mount
      raise RunError(f'cannot write to {workdir}: {e.strerror or _first_line(e)}; the last '
                     f'complete checkpoint is step {complete_step(workdir)}') from None


def check_trainable_workdir(workdir) -> None:
  """ConfigError unless `workdir` is new, empty, or a jaxcl run (its
  config.json or its lock): training never writes among a user's files."""
  workdir = epath.Path(workdir)
  if not workdir.is_dir() or files.is_empty_dir(workdir):
    return
  if not (files.is_run(workdir) or (workdir / lock_lib.LOCK_DIR).exists()):
    names = sorted(p.name for p in workdir.iterdir())
    raise config_lib.ConfigError(
        f'workdir {workdir} holds files but is not a jaxcl workdir (no {files.CONFIG_FILE}; '
        f'it has {", ".join(names[:3])}{", ..." if len(names) > 3 else ""}); use a new or empty '
        f'directory')


@contextlib.contextmanager
def hold_workdir(workdir):
  """Creates `workdir` and holds its lock (jaxcl.lock) for the body: one
  run per workdir. Process 0 takes it for the job; every process raises
  ConfigError if the workdir is in use or cannot be written."""
  lock, error = lock_lib.WorkdirLock(workdir), None
  if jax.process_index() == 0:
    try:
      epath.Path(workdir).mkdir(parents=True, exist_ok=True)
      lock.acquire()
    except config_lib.ConfigError as e:
      error = e
    except OSError as e:  # not writable, read-only, full, a file on the way
      error = config_lib.ConfigError(f'cannot write to workdir {workdir}: '
                                     f'{e.strerror or _first_line(e)}')
  if jax.process_count() > 1:
    held = multihost_utils.broadcast_one_to_all(np.int32(error is None))
    if not held and error is None:
      error = config_lib.ConfigError(f'process 0 could not take workdir {workdir}; its '
                                     f'message says why')
  if error is not None:
    raise error
  try:
    yield lock
  finally:
    lock.release()


def _train_and_evaluate(exp: Experiment, eval_data: EvalData, workdir: epath.Path,
                        notes: list, lock: lock_lib.WorkdirLock) -> dict:
  """The loop, in a workdir this run holds; `notes` are printed once the
  writer is up."""
  config = exp.config
  train_source = exp.train_source
  manager = checkpoint_manager(workdir, config, cleanup=True)
  state, failures = restore_newest(manager, exp)
  if failures:
    aside = set_aside(workdir, [step for step, _ in failures])
    manager.close()
    manager = checkpoint_manager(workdir, config)
    notes += [f'jaxcl: checkpoint {step} does not restore ({error}); moved to {aside}'
              for step, error in failures]
  resumed = state is not None
  if state is None:
    state = exp.init_state()
  start_step = int(state.step)
  history = batch_history(workdir, config.batch_size, start_step)
  if len(history) > 1 and history[-1][0] == start_step:
    notes.append(f'jaxcl: global batch {history[-2][1]} -> {history[-1][1]} from step '
                 f'{start_step} (--allow_batch_change); recorded in {BATCH_HISTORY_FILE}')
  start_record, start_batch = data_position(history, start_step)
  notes += _report_skipped_images(workdir, exp, eval_data)
  train_iter = data.train_iterator(
      train_source, batch_size=config.batch_size, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count(),
      transform=data.caption_sampler(exp.tokenizer) if exp.two_tower else None,
      start_record=start_record, start_batch=start_batch)
  if jax.process_index() == 0:
    config_lib.save(config, workdir)
    files.write_atomically(workdir / BATCH_HISTORY_FILE, json.dumps(history) + '\n')
    if exp.tokenizer is not None:
      exp.tokenizer.save(workdir)  # travels with the checkpoints: the same ids later
    _drop_metrics_after(workdir, start_step)  # steps the resumed run is about to redo
  total = config.total_steps
  writer = MetricWriter(workdir, total_steps=max(total, start_step), initial_step=start_step)
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  writer.print(
      f'jaxcl: {jax.device_count()} {jax.devices()[0].platform} device(s), '
      f'{jax.process_count()} process(es), mesh {dict(exp.mesh.shape)}; global batch '
      f'{config.batch_size}; {config.method} on {config.dataset.name}, {len(train_source)} '
      f'train images {exp.info.image_shape}; {config.model.name}'
      + (f' + text transformer ({config.text.tokenizer} tokens, length '
         f'{exp.tokenizer.max_length})' if exp.two_tower else '')
      + f', {num_params / 1e6:.2f}M params; '
      + (f'resuming from step {start_step}' if resumed else 'starting from step 0'))
  for note in notes:
    writer.print(note)

  train_step, compiled_step, step_flops = make_train_step(exp), None, None
  embed_fns = make_embed_fns(exp)
  if not eval_data.num_classes:
    writer.print(f'{eval_data.skip_reason}: '
                 + ('zero-shot classification is skipped' if exp.two_tower
                    else 'kNN and linear probe are skipped'))
  evaluates = exp.two_tower or eval_data.num_classes > 0

  step = start_step
  interval_start, interval_steps, data_wait = time.perf_counter(), 0, 0.0
  previous_metrics, skipped = None, 0
  preemption = Preemption()
  try:
    while step < total:
      t0 = time.perf_counter()
      batch = next(train_iter)
      batch = parallel.put_batch(exp.mesh, model_batch(exp, batch))
      data_wait += time.perf_counter() - t0
      if compiled_step is None:  # compiled ahead of time, for XLA's count of its FLOPs
        compiled_step = train_step.lower(state, batch).compile()
        step_flops = throughput.step_flops(compiled_step)
      state, metrics = compiled_step(state, batch)
      # Keep one step in flight: dispatch runs ahead of the device by one step
      # at most, so the progress bar and timings count finished steps.
      jax.block_until_ready(previous_metrics)
      if previous_metrics is not None:  # step - 1 has finished: was it finite?
        skipped += _check_finite(previous_metrics, step, config, manager)
      previous_metrics = metrics
      step += 1
      interval_steps += 1
      if step == start_step + 1:  # compilation: report it, then time steady-state steps only
        jax.block_until_ready(state)
        writer.print(f'first step (compilation included): {time.perf_counter() - t0:.1f}s')
        if step % config.log_every_steps and step != total:
          interval_start, interval_steps, data_wait = time.perf_counter(), 0, 0.0
      writer.advance(1)

      if step % config.log_every_steps == 0 or step == total:
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        elapsed = time.perf_counter() - interval_start
        step_time = elapsed / interval_steps
        metrics.update(examples_per_sec=interval_steps * config.batch_size / elapsed,
                       step_time=step_time, data_wait_time=data_wait / interval_steps,
                       compute_time=(elapsed - data_wait) / interval_steps,
                       data_wait_fraction=data_wait / elapsed,
                       **throughput.metrics(step_flops, jax.device_count(), config.batch_size,
                                            step_time, jax.devices()[0].device_kind))
        writer.write(step, metrics)
        writer.advance(0, loss=metrics['loss'], tau=metrics['temperature'],
                       acc=metrics['contrastive_top1'])
        interval_start, interval_steps, data_wait = time.perf_counter(), 0, 0.0

      preempted = preemption.reached(step)
      if lock.lost is not None:  # this run stalled long enough for another to take over
        raise RunError(f'{workdir} was taken over by {lock_lib.describe(lock.lost)} while this '
                       f'run stalled; stopping without writing more')
      if step % config.checkpoint_every_steps == 0 or step == total or preempted:
        # Never a checkpoint of a non-finite step: this one is checked first.
        skipped += _check_finite(metrics, step, config, manager)
        previous_metrics = None
        save_checkpoint(manager, state)
      if preempted:
        finish_checkpoints(manager)
        message = (f'{preemption.describe()}: checkpoint of step {step} saved in '
                   f'{workdir / files.CHECKPOINT_DIR}; run the same command again to resume')
        writer.print(f'jaxcl: {message}')
        writer.close()
        manager.close()
        raise errors.Interrupted(message, preemption.exit_code)

      if step % config.eval_every_steps == 0 and step != total and evaluates:
        results = run_evaluation(exp, state, eval_data, embed_fns)
        writer.write(step, results)
        writer.print(f'step {step}: ' + ', '.join(f'{k} {v:.4f}' for k, v in results.items()))
        interval_start, interval_steps, data_wait = time.perf_counter(), 0, 0.0

    if previous_metrics is not None:
      skipped += _check_finite(previous_metrics, step, config, manager)
    if skipped:
      writer.print(f'jaxcl: {skipped} non-finite step(s) skipped (nonfinite=skip)')
    if manager.latest_step() is None:  # total_steps=0: keep the initial encoder for eval/export
      save_checkpoint(manager, state)
    finish_checkpoints(manager)
    preemption.close()  # the final checkpoint is complete: from here Ctrl-C stops at once
    results = run_evaluation(exp, state, eval_data, embed_fns)
    if results:
      writer.write(step, results)
    write_eval(workdir, step, results)
  except (RunError, OSError):  # an OSError becomes one line in train_and_evaluate
    _close_after_failure(writer, manager)  # the progress bar and orbax's logs end first
    raise
  except Exception:  # a lost process, a bug: its message comes after the progress bar
    _close_after_failure(writer)
    raise
  finally:
    preemption.close()
  summary = (', '.join(f'{k} {v:.4f}' for k, v in results.items())
             or f'no evaluation ({eval_data.skip_reason})')
  writer.print(f'final (step {step}): {summary}  -> {workdir / EVAL_FILE}')
  writer.close()
  manager.close()
  return results


RunError, NonFiniteError, CheckpointError = (errors.RunError, errors.NonFiniteError,
                                             errors.CheckpointError)


def _check_finite(metrics, step: int, config, manager) -> int:
  """1 if the step was skipped as non-finite (nonfinite=skip), 0 if finite;
  raises NonFiniteError for a non-finite step under nonfinite=stop."""
  values = jax.device_get({k: metrics[k] for k in ('loss', 'grad_norm', 'skipped')
                           if k in metrics})
  if config.nonfinite == 'skip':
    return int(values['skipped'])
  if math.isfinite(values['loss']) and math.isfinite(values['grad_norm']):
    return 0
  try:
    manager.wait_until_finished()  # the message names the last checkpoint written
  except Exception:  # pylint: disable=broad-except  # reported by the run's own message
    pass
  raise NonFiniteError(
      f'step {step}: loss {values["loss"]} / gradient norm {values["grad_norm"]} is not '
      f'finite; training stopped, nothing after step {step - 1} was saved; the last good '
      f'checkpoint is step {manager.latest_step()} (set nonfinite=skip to skip such steps)')


class Preemption:
  """SIGTERM (what TPU and SLURM preemption send) or Ctrl-C (SIGINT) asks
  the loop to finish its step, checkpoint it and stop (errors.Interrupted:
  exit 0 after SIGTERM, 130 after Ctrl-C). A second Ctrl-C raises
  KeyboardInterrupt at once.

  One process: Python signal handlers set a flag. Several processes:
  jax.distributed's preemption sync manager catches SIGTERM on any of them
  and `reached_preemption_sync_point` turns true on all of them at the same
  step, so they save the same checkpoint together. A Python handler there
  would replace jax's, and a process that stopped alone would leave the
  others waiting in a collective."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
    self.received = None  # the first signal's number
    self._previous = {}
    self.native = (jax.process_count() > 1
                   and jax_distributed.global_state.preemption_sync_manager is not None)
    if self.native:
      return
    for signum in self.SIGNALS if jax.process_count() == 1 else (signal.SIGTERM,):
      try:
        self._previous[signum] = signal.signal(signum, self._on_signal)
      except ValueError:  # not the main thread: leave signals to the caller
        pass

  def _on_signal(self, signum, frame):
    del frame
    if signum == signal.SIGINT and self.received == signal.SIGINT:
      raise KeyboardInterrupt  # the second Ctrl-C: stop now
    if self.received is None:
      self.received = signum
    if signum == signal.SIGINT:
      # os.write, not print: the handler may have interrupted a print.
      os.write(sys.stderr.fileno(), b'\njaxcl: Ctrl-C: finishing this step to save it (Ctrl-C '
                                    b'again to stop at once)\n')

  def close(self) -> None:
    """Gives the signals back to their previous handlers."""
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}

  @property
  def exit_code(self) -> int:
    return 0 if self.received in (None, signal.SIGTERM) else 128 + self.received

  def describe(self) -> str:
    return 'interrupted (Ctrl-C)' if self.received == signal.SIGINT else 'preempted (SIGTERM)'

  def reached(self, step: int) -> bool:
    """Called by every process at every step."""
    if self.native:
      return bool(multihost_utils.reached_preemption_sync_point(step))
    if jax.process_count() > 1:  # jax's preemption service is off: share the flags (~2 ms)
      return bool(np.any(multihost_utils.process_allgather(np.int32(self.received is not None))))
    return self.received is not None


SKIPPED_IMAGES_FILE = files.SKIPPED_IMAGES_FILE
MAX_LISTED = 5


def _report_skipped_images(workdir, exp: Experiment, eval_data: EvalData) -> list[str]:
  """Lines naming an image folder's empty class folders and the images it
  left out (unreadable or wrongly sized; all of them go to
  workdir/skipped_images.json)."""
  d = exp.config.dataset
  splits = [(d.train_split, exp.train_source), (d.eval_train_split, eval_data.train),
            (d.eval_test_split, eval_data.test)]  # the same split may come twice
  skipped = {split: source.skipped for split, source in splits
             if getattr(source, 'skipped', None)}
  empty = sorted({folder for _, source in splits
                  for folder in getattr(source, 'empty_classes', ())})
  lines = [f'jaxcl: class folder {folder} has no images (its class has no examples in that '
           f'split)' for folder in empty]
  if not skipped:
    return lines
  if jax.process_index() == 0:
    files.write_atomically(epath.Path(workdir) / SKIPPED_IMAGES_FILE,
                           json.dumps(skipped, indent=1) + '\n')
  for split, items in skipped.items():
    lines.append(f'jaxcl: {len(items)} image(s) of split {split!r} skipped (unreadable or '
                 f'wrongly sized; all listed in {SKIPPED_IMAGES_FILE}):')
    lines += [f'  {path}: {why}' for path, why in items[:MAX_LISTED]]
    if len(items) > MAX_LISTED:
      lines.append(f'  ... and {len(items) - MAX_LISTED} more')
  return lines


BATCH_HISTORY_FILE = files.BATCH_HISTORY_FILE


def batch_history(workdir, batch_size: int, step: int) -> list:
  """[[first step, global batch size], ...]: the run's segments up to
  `step`, where this run continues with `batch_size`."""
  path = epath.Path(workdir) / BATCH_HISTORY_FILE
  if path.exists():
    history = json.loads(path.read_text())
  elif (epath.Path(workdir) / config_lib.CONFIG_FILE).exists():  # a run from before the file
    history = [[0, config_lib.load_saved(workdir).batch_size]]
  else:
    history = []
  history = [[s, b] for s, b in history if s < step]  # a fallback may have gone back
  if not history or history[-1][1] != batch_size:
    history.append([step, batch_size])
  return history


def data_position(history: list, step: int) -> tuple[int, int]:
  """(start_record, start_batch) of jaxcl.data.train_iterator for resuming
  at `step`: the records the earlier segments read, and the batches of the
  current one read so far."""
  records = sum(b * (s_next - s) for (s, b), (s_next, _) in zip(history, history[1:]))
  return records, step - history[-1][0]


def _drop_metrics_after(workdir, step: int) -> None:
  """Removes metrics.jsonl rows past `step`: a killed run logged them, the
  resumed run logs them again."""
  path = epath.Path(workdir) / files.METRICS_FILE
  if not path.exists():
    return
  rows = path.read_text().splitlines()
  kept = [r for r in rows if _row_step(r) is not None and _row_step(r) <= step]
  if len(kept) != len(rows):  # also drops a line a full disk cut short
    files.write_atomically(path, ''.join(r + '\n' for r in kept))


def _row_step(row: str) -> int | None:
  try:
    return int(json.loads(row)['step'])
  except (ValueError, KeyError, TypeError):
    return None


def saved_tokenizer(workdir):
  """The tokenizer a run in `workdir` saved, or None."""
  if not (epath.Path(workdir) / tokenizers.SPEC_FILE).exists():
    return None
  try:
    return tokenizers.load_tokenizer(workdir)
  except (ValueError, RuntimeError, OSError) as e:  # corrupt, missing or swapped files
    raise config_lib.ConfigError(f'cannot load the tokenizer saved in {workdir}: '
                                 f'{errors.first_line(e)}'
                                 ) from None


def load_trained(workdir):
  """(Experiment, state) of the latest checkpoint in a finished or running workdir."""
  config = config_lib.load_saved(workdir)
  try:
    config_lib.validate(config)  # on the devices present now
  except config_lib.ConfigError as e:
    if not str(e).startswith('mesh:'):
      raise
    config.mesh = config_lib.base_config().mesh  # trained on a pod, evaluated on a laptop
    config_lib.validate(config)
  if not (epath.Path(workdir) / files.CHECKPOINT_DIR).is_dir():
    raise config_lib.ConfigError(f'{workdir} has no checkpoint to load')
  exp = setup(config, tokenizer=saved_tokenizer(workdir))
  manager = checkpoint_manager(workdir, config, read_only=True)
  try:
    state, failures = restore_newest(manager, exp)
  except CheckpointError as e:
    raise config_lib.ConfigError(str(e)) from None
  finally:
    manager.close()
  for step, error in failures:  # left in place: the run that owns the workdir sets them aside
    print(f'jaxcl: checkpoint {step} does not restore ({error}); using step {int(state.step)}',
          file=sys.stderr)
  if state is None:
    raise config_lib.ConfigError(f'{workdir} has no checkpoint to load')
  return exp, state


def evaluate_workdir(workdir) -> dict:
  """`jaxcl eval`: recomputes eval.json from the latest checkpoint."""
  exp, state = load_trained(workdir)
  results = run_evaluation(exp, state, EvalData(exp.config), make_embed_fns(exp))
  write_eval(workdir, int(state.step), results)
  return {'step': int(state.step), **results}
