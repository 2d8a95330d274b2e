"""jaxcl's trainer, top to bottom: set-up, mesh, input, model, step,
checkpoint, evaluation, loop.

One global batch flows like this: each process reads its rows of uint8
images with grain (jaxcl.data) and places them on the mesh as one global
array split over the `data` axis (jaxcl.parallel); inside the jitted step the
device makes two augmented views per image (jaxcl.augment), the encoder and
head run on both views as one 2N batch under GSPMD (so batch-norm statistics
are global), and the loss runs in `jax.shard_map`: each device scores its
rows against the embeddings gathered from all devices (jaxcl.losses).
`jax.grad` is taken outside the shard_map, the optimizer updates the
replicated parameters, and the temperature is clamped back into range.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from typing import Any

import flax
import grain
import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxcl import augment, data, evaluate, losses, models, optim, parallel
from jaxcl import config as config_lib
from jaxcl.metric_writer import MetricWriter
from jaxcl.temperature import project_all

EVAL_FILE = 'eval.json'


# ================================================================ state ====
@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes; all of it is checkpointed."""
  step: jax.Array  # int32 scalar: steps taken
  params: Any  # nnx.State of nnx.Param (encoder, head, log τ)
  batch_stats: Any  # nnx.State of nnx.BatchStat
  opt_state: Any
  rng: jax.Array  # uint32 key data; step s uses fold_in(rng, s)


# =============================================================== set-up ====
@dataclasses.dataclass
class Experiment:
  """What a config builds before any data flows: the mesh, the model's two
  graph definitions (train and eval mode), the optimizer and its schedule."""
  config: Any
  mesh: jax.sharding.Mesh
  info: data.DatasetInfo
  train_source: Any  # random-access records of the pretraining split
  train_graphdef: Any
  eval_graphdef: Any
  optimizer: optax.GradientTransformation
  schedule: optax.Schedule

  @property
  def replicated(self):
    return parallel.replicated(self.mesh)

  def init_state(self) -> TrainState:
    """A fresh state, created under jit directly in its replicated layout."""

    def init():
      model = _new_model(self.config, self.info)
      _, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
      return TrainState(step=jnp.int32(0), params=params, batch_stats=batch_stats,
                        opt_state=self.optimizer.init(params),
                        rng=jax.random.key_data(rng_streams(self.config.seed)['augment']))

    return jax.jit(init, out_shardings=self.replicated)()

  def abstract_state(self) -> TrainState:
    """Shapes, dtypes and shardings of the state, for restoring checkpoints."""
    shapes = jax.eval_shape(self.init_state)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=self.replicated),
                        shapes)

  def model_inputs(self, images):
    """float32 images in [0, 1] -> the encoder's normalized input."""
    return augment.standardize(images, self.config.dataset.mean, self.config.dataset.std)

  def embed(self, params, batch_stats, images_uint8):
    """Frozen-encoder features of uint8 images [b, H, W, C] -> [b, D] float32."""
    model = nnx.merge(self.eval_graphdef, params, batch_stats)
    views = augment.eval_view(images_uint8, self.config.augment.image_size)
    return model.embed(self.model_inputs(views))


def rng_streams(seed: int) -> dict:
  """Independent keys for parameter init and for augmentation."""
  init, augment_key = jax.random.split(jax.random.key(seed))
  return {'init': init, 'augment': augment_key}


def _new_model(config, info):
  return models.build_model(config, info.image_shape[-1], nnx.Rngs(rng_streams(config.seed)['init']))


def setup(config, devices=None) -> Experiment:
  """Builds the Experiment for a validated config on `devices` (default: all).
  The dataset's metadata is read, and the embedded dataset prepared, here."""
  mesh = parallel.make_mesh(config.mesh, devices)
  train_source, info = data.load_source(config.dataset, config.dataset.train_split)
  abstract_model = nnx.eval_shape(lambda: _new_model(config, info))
  train_graphdef, _, _ = nnx.split(abstract_model, nnx.Param, nnx.BatchStat)
  abstract_model.eval()
  eval_graphdef, _, _ = nnx.split(abstract_model, nnx.Param, nnx.BatchStat)
  schedule = optim.learning_rate_schedule(config, config.total_steps)
  return Experiment(config=config, mesh=mesh, info=info, train_source=train_source,
                    train_graphdef=train_graphdef,
                    eval_graphdef=eval_graphdef,
                    optimizer=optim.build_optimizer(config, config.total_steps),
                    schedule=schedule)


# ================================================================= step ====
def make_loss_and_grads(exp: Experiment):
  """(state, images uint8 [N, H, W, C]) -> ((loss, aux), grads) for SimCLR.

  aux = (metrics, new batch stats, τ). The loss is NT-Xent over the global
  batch, computed in shard_map with every device's embeddings gathered.
  """
  batch_spec = P(parallel.BATCH_AXES)
  loss_on_mesh = jax.shard_map(
      lambda z1, z2, tau: losses.nt_xent(z1, z2, temperature=tau, axis_name=parallel.BATCH_AXES,
                                         with_metrics=True),
      mesh=exp.mesh, in_specs=(batch_spec, batch_spec, P()), out_specs=(P(), P()))

  def loss_and_grads(state: TrainState, images):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    view1, view2 = augment.two_views(key, images, exp.config.augment)
    n = images.shape[0]
    # Interleave the views, [N, 2, ...] -> [2N, ...], so each device's rows stay on it.
    both = jnp.stack([view1, view2], axis=1).reshape(2 * n, *view1.shape[1:])
    inputs = exp.model_inputs(both)

    def loss_fn(params):
      model = nnx.merge(exp.train_graphdef, params, state.batch_stats, copy=True)
      z = model(inputs).reshape(n, 2, -1)
      tau = model.temperature()
      loss, metrics = loss_on_mesh(z[:, 0], z[:, 1], tau)
      return loss, (metrics, nnx.state(model, nnx.BatchStat), tau)

    return jax.value_and_grad(loss_fn, has_aux=True)(state.params)

  return loss_and_grads


def make_train_step(exp: Experiment):
  """The jitted step: (state, images) -> (new state, metrics). The state is
  replicated and donated; images are split over the batch axes."""
  loss_and_grads = make_loss_and_grads(exp)

  def train_step(state: TrainState, images):
    (loss, (metrics, batch_stats, tau)), grads = loss_and_grads(state, images)
    updates, opt_state = exp.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # Clamp log τ into [log τ_min, log τ_max] after the update (open_clip's way).
    model = nnx.merge(exp.train_graphdef, params, batch_stats)
    project_all(model)
    params = nnx.state(model, nnx.Param)
    metrics = dict(metrics, loss=loss, temperature=tau, inv_temperature=1.0 / tau,
                   grad_norm=optax.global_norm(grads), learning_rate=exp.schedule(state.step))
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                              opt_state=opt_state)
    return new_state, metrics

  return jax.jit(train_step, in_shardings=(exp.replicated, parallel.batch_sharding(exp.mesh)),
                 out_shardings=(exp.replicated, exp.replicated), donate_argnums=0)


# =========================================================== checkpoint ====
def checkpoint_manager(workdir, config) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=config.get('keep_checkpoints', 3),
                                         enable_async_checkpointing=True)
  return ocp.CheckpointManager(epath.Path(workdir).absolute() / 'checkpoints', options=options)


def save_checkpoint(manager, state: TrainState, data_iterator) -> None:
  """Train state, this process's data-iterator position, and (in the state) the RNG."""
  step = int(state.step)
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                             data=grain.checkpoint.CheckpointSave(data_iterator)))


def restore_checkpoint(manager, exp: Experiment, data_iterator=None, step=None):
  """The state (and, if given, the iterator's position) of checkpoint `step`
  (default: the latest). Returns None when there is no checkpoint."""
  step = manager.latest_step() if step is None else step
  if step is None:
    return None
  items = {'state': ocp.args.StandardRestore(exp.abstract_state())}
  if data_iterator is not None:
    items['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
  return manager.restore(step, args=ocp.args.Composite(**items)).state


# =========================================================== evaluation ====
class EvalData:
  """The labeled splits the frozen encoder is evaluated on (opened once)."""

  def __init__(self, config):
    d = config.dataset
    self.train, info = data.load_source(d, d.eval_train_split)
    self.test, _ = data.load_source(d, d.eval_test_split)
    self.num_classes = info.num_classes


def run_evaluation(exp: Experiment, state: TrainState, eval_data: EvalData, embed_fn) -> dict:
  """{'knn_top1', 'linear_top1'} of the encoder in `state` (fractions); {}
  when the evaluation splits have no labels."""
  cfg = exp.config.eval
  if not eval_data.num_classes:
    return {}
  features = functools.partial(embed_fn, state.params, state.batch_stats)
  train = evaluate.extract_features(features, exp.mesh, eval_data.train, batch_size=cfg.batch_size,
                                    max_examples=cfg.max_train_examples or None,
                                    seed=exp.config.seed)
  test = evaluate.extract_features(features, exp.mesh, eval_data.test, batch_size=cfg.batch_size)
  return evaluate.evaluate_features(train, test, eval_data.num_classes, cfg)


def make_embed_fn(exp: Experiment):
  return jax.jit(exp.embed, in_shardings=(exp.replicated, exp.replicated,
                                          parallel.batch_sharding(exp.mesh)),
                 out_shardings=parallel.batch_sharding(exp.mesh))


def write_eval(workdir, step: int, results: dict) -> None:
  if jax.process_index() == 0:
    epath.Path(workdir).joinpath(EVAL_FILE).write_text(
        json.dumps({'step': int(step), **results}, indent=2) + '\n')


# ================================================================= loop ====
def train_and_evaluate(config, workdir) -> dict:
  """Trains, evaluates and checkpoints a validated config in `workdir`;
  resumes from the latest checkpoint there. Returns the final eval results."""
  workdir = epath.Path(workdir)
  # Everything that can fail on bad input comes before the first write.
  config_lib.check_resumable(config, workdir)
  exp = setup(config)
  train_source = exp.train_source
  eval_data = EvalData(config)
  workdir.mkdir(parents=True, exist_ok=True)
  train_iter = data.train_iterator(train_source, batch_size=config.batch_size, seed=config.seed,
                                   process_index=jax.process_index(),
                                   process_count=jax.process_count())
  manager = checkpoint_manager(workdir, config)
  state = restore_checkpoint(manager, exp, train_iter)
  resumed = state is not None
  if state is None:
    state = exp.init_state()
  start_step = int(state.step)
  if jax.process_index() == 0:
    config_lib.save(config, workdir)
    _drop_metrics_after(workdir, start_step)  # steps the resumed run is about to redo
  total = config.total_steps
  writer = MetricWriter(workdir, total_steps=max(total, start_step), initial_step=start_step)
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  writer.print(
      f'jaxcl: {jax.device_count()} {jax.devices()[0].platform} device(s), '
      f'{jax.process_count()} process(es), mesh {dict(exp.mesh.shape)}; global batch '
      f'{config.batch_size}; {config.dataset.name} {len(train_source)} train images '
      f'{exp.info.image_shape}; {config.model.name} {num_params / 1e6:.2f}M params; '
      + (f'resuming from step {start_step}' if resumed else 'starting from step 0'))

  train_step = make_train_step(exp)
  embed_fn = make_embed_fn(exp)
  if not eval_data.num_classes:
    writer.print('the evaluation splits have no labels: kNN and linear probe are skipped')

  step = start_step
  interval_start, interval_steps, data_wait = time.perf_counter(), 0, 0.0
  previous_metrics = None
  while step < total:
    t0 = time.perf_counter()
    batch = next(train_iter)
    images = parallel.put_batch(exp.mesh, batch['image'])
    data_wait += time.perf_counter() - t0
    state, metrics = train_step(state, images)
    # Keep one step in flight: dispatch runs ahead of the device by one step
    # at most, so the progress bar and timings count finished steps.
    jax.block_until_ready(previous_metrics)
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
      metrics.update(examples_per_sec=interval_steps * config.batch_size / elapsed,
                     step_time=elapsed / interval_steps,
                     data_wait_fraction=data_wait / elapsed)
      writer.write(step, metrics)
      writer.advance(0, loss=metrics['loss'], tau=metrics['temperature'],
                     acc=metrics['contrastive_top1'])
      interval_start, interval_steps, data_wait = time.perf_counter(), 0, 0.0

    if step % config.checkpoint_every_steps == 0 or step == total:
      save_checkpoint(manager, state, train_iter)

    if step % config.eval_every_steps == 0 and step != total and eval_data.num_classes:
      results = run_evaluation(exp, state, eval_data, embed_fn)
      writer.write(step, results)
      writer.print(f'step {step}: ' + ', '.join(f'{k} {v:.4f}' for k, v in results.items()))
      interval_start, interval_steps, data_wait = time.perf_counter(), 0, 0.0

  if manager.latest_step() is None:  # total_steps=0: keep the initial encoder for eval/export
    save_checkpoint(manager, state, train_iter)
  manager.wait_until_finished()
  results = run_evaluation(exp, state, eval_data, embed_fn)
  if results:
    writer.write(step, results)
  write_eval(workdir, step, results)
  writer.print(f'final (step {step}): ' + ', '.join(f'{k} {v:.4f}' for k, v in results.items())
               + f'  -> {workdir / EVAL_FILE}')
  writer.close()
  manager.close()
  return results


def _drop_metrics_after(workdir, step: int) -> None:
  """Removes metrics.jsonl rows past `step`: a killed run logged them, the
  resumed run logs them again."""
  path = epath.Path(workdir) / 'metrics.jsonl'
  if not path.exists():
    return
  rows = path.read_text().splitlines()
  kept = [r for r in rows if r.strip() and json.loads(r)['step'] <= step]
  if len(kept) != len(rows):
    path.write_text(''.join(r + '\n' for r in kept))


def load_trained(workdir):
  """(Experiment, state) of the latest checkpoint in a finished or running workdir."""
  config = config_lib.load_saved(workdir)
  config_lib.validate(config)  # on the devices present now
  exp = setup(config)
  manager = checkpoint_manager(workdir, config)
  state = restore_checkpoint(manager, exp)
  manager.close()
  if state is None:
    raise config_lib.ConfigError(f'{workdir} has no checkpoint to load')
  return exp, state


def evaluate_workdir(workdir) -> dict:
  """`jaxcl eval`: recomputes eval.json from the latest checkpoint."""
  exp, state = load_trained(workdir)
  results = run_evaluation(exp, state, EvalData(exp.config), make_embed_fn(exp))
  write_eval(workdir, int(state.step), results)
  return {'step': int(state.step), **results}
