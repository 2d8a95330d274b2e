"""The training step, a function of (state, batch), for every method.

Inside the jitted step the device augments the images (the method's views),
the towers run on the whole batch under GSPMD (so batch-norm statistics are
global), or on microbatches of it (`microbatch_size`, jaxcl.trainer.grad_cache),
and the loss runs in `jax.shard_map`: each device scores its rows
against the embeddings gathered from all devices (jaxcl.losses). `jax.grad`
is taken outside the shard_map, the optimizer updates the parameters, and
the temperature is clamped back into range. With a teacher
(config.distill, jaxcl.trainer.teacher) its embeddings of the same crops
and captions join the loss's shard_map: the distillation term
(jaxcl.losses.distill) is added with its weight from its start step; so
are the decoder's (config.decoder) and, from theirs, the self-distillation
terms of an EMA teacher kept in the state (jaxcl.trainer.ema_teacher).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxcl import losses, name_patterns, parallel
from jaxcl.data import augment
from jaxcl.losses import estimators
from jaxcl.models import param_groups
from jaxcl.models.temperature import logit_transform, project_all
from jaxcl.trainer import ema_teacher, grad_cache, per_example, recipe_terms
from jaxcl.trainer.experiment import Experiment, TrainState


class StepAux(NamedTuple):
  """What the loss of a step gives beside its value."""
  metrics: dict
  batch_stats: Any  # the towers' batch statistics after the step
  temperature: jax.Array  # τ the loss used (scalar, or [directions])
  bias: jax.Array | None  # SigLIP's logit bias
  per_example: dict  # the batch's rows of TrainState.per_example after the step
  centers: dict  # the EMA teacher's centers after the step (config.self_distill), or {}


def make_towers(exp: Experiment):
  """(merge, encode) for the config's method. merge(params, batch_stats) ->
  the model (frozen parameter groups behind stop_gradient); encode(params,
  batch_stats, (batch, view keys [n, V])) -> ((a, b) embeddings [n, d], new
  batch stats): the augmentation and the towers on n rows of the batch;
  with the decoder's rows in the batch (config.decoder), (a, b, its logits)."""
  method, config = exp.method, exp.config
  frozen = name_patterns.as_patterns(config.optimizer.frozen)

  def merge(params, batch_stats):
    if frozen:  # no gradient flows into them: a tower frozen whole runs no backward pass
      params = jax.tree.map(lambda p, f: jax.lax.stop_gradient(p) if f else p, params,
                            param_groups.selected(params, frozen))
    return nnx.merge(exp.train_graphdef, params, batch_stats, copy=True)

  def encode(params, batch_stats, inputs):
    model = merge(params, batch_stats)
    batch, keys = inputs
    outputs = method.embeddings(model, method.model_inputs(keys, batch, config))
    return tuple(outputs), nnx.state(model, nnx.BatchStat)

  return merge, encode


def make_loss_and_grads(exp: Experiment):
  """(state, batch) -> ((loss, aux), grads) for the config's method.

  batch: the method's batch_keys, e.g. {'image': uint8 [N, H, W, C]} (+
  'text': int32 [N, L] for a text tower; + 'index' int32 [N], the rows'
  dataset indices, with per-example state), split over the batch axes.
  aux: a StepAux. The loss is computed in
  shard_map over the global batch, every device's embeddings gathered; with
  `microbatch_size` the towers run in chunks (jaxcl.trainer.grad_cache).
  """
  method, config, batch_spec = exp.method, exp.config, P(parallel.BATCH_AXES)
  merge, encode = make_towers(exp)
  options = losses.LossOptions(parallel.BATCH_AXES, config.loss.impl, config.loss.block_size,
                               logit_transform(config.temperature.mode))

  def loss(a, b, tau, bias, rows, taught):
    """rows: this device's rows of the per-example state (TrainState.per_example);
    taught: () or the teacher's (a', b', τ') and the term's weight at this step."""
    state = estimators.from_rows(rows, config.loss, config.temperature)
    result = method.loss(a, b, tau, bias, options, state=state)
    value, metrics = result.loss, result.metrics
    if taught:
      teacher_a, teacher_b, teacher_tau, weight = taught
      term = losses.distill_loss(a, b, teacher_a, teacher_b, tau, teacher_tau, options)
      value = value + weight * term.loss
      metrics = {**metrics, 'distill_loss': term.loss, **term.metrics}
    geometry = losses.alignment_uniformity(jax.lax.stop_gradient(a), jax.lax.stop_gradient(b),
                                           axis_name=parallel.BATCH_AXES)
    new_rows = rows if state is None else result.state.rows()
    return value, {**metrics, **geometry}, new_rows

  def loss_on_mesh(a, b, tau, bias, rows, taught):
    tau_spec = batch_spec if jnp.ndim(tau) == 2 else P()  # one τ per anchor: split like the rows
    taught_specs = (batch_spec, batch_spec, P(), P()) if taught else ()
    return jax.shard_map(loss, mesh=exp.mesh,
                         in_specs=(batch_spec, batch_spec, tau_spec, P(), batch_spec,
                                   taught_specs),
                         out_specs=(P(), P(), batch_spec))(a, b, tau, bias, rows, taught)

  def loss_and_grads(state: TrainState, batch, teacher_weights=None):
    """teacher_weights: the teacher's (params, batch_stats), with a teacher."""
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    n = jax.tree.leaves(batch)[0].shape[0]
    inputs = (model_inputs_of(batch), augment.view_keys(key, method.num_views, n))
    rows = per_example.gather(state.per_example, batch)
    taught = ()
    if exp.teacher is not None:  # outside the gradient; the same crops as the student's
      teacher = exp.teacher
      views = method.views(inputs[1], inputs[0], config)
      teacher_a, teacher_b, teacher_tau = teacher.embeddings(teacher_weights, views,
                                                             batch[teacher.text_key])
      taught = (teacher_a, teacher_b, jnp.asarray(teacher_tau, jnp.float32),
                recipe_terms.term_weight(config.distill, state.step))

    def head(params, a, b):
      """The global-batch loss of the embeddings; τ and the bias are the model's.
      aux: (metrics, τ, bias, the batch's per-example rows after the step)."""
      model = merge(params, state.batch_stats)
      tau, bias = method.temperature(model, state.step, (a, b)), method.bias(model)
      value, metrics, new_rows = loss_on_mesh(a, b, tau,
                                              jnp.float32(0) if bias is None else bias, rows,
                                              taught)
      return value, (metrics, tau, bias, new_rows)

    terms = recipe_terms.Terms(config, state, batch, key, merge)

    def encode_with_terms(params, batch_stats, chunk):
      """Rows' embeddings (a, b) and their share of the per-example terms
      (value, (metrics, centers)), from one forward pass; new batch stats."""
      rows_batch, keys, extras = chunk
      (a, b, *decoded), stats = encode(params, batch_stats, (rows_batch, keys))
      return ((a, b), terms(params, rows_batch, extras, decoded)), stats

    if config.microbatch_size:
      # The embeddings' pass reads no decoder rows; the pass that takes gradients does.
      plain = lambda params, stats, chunk: encode(
          params, stats, ({k: v for k, v in chunk[0].items() if k != 'decoder_ids'}, chunk[1]))
      (value, (head_aux, (term_metrics, centers), batch_stats)), grads = (
          grad_cache.loss_and_grads(
              plain, head, state.params, state.batch_stats, (*inputs, terms.extras),
              microbatch_size=config.microbatch_size, mesh=exp.mesh,
              param_shardings=exp.state_sharding.params,
              encode_with_terms=encode_with_terms if terms else None))
    else:
      def loss_fn(params):
        ((a, b), (term, term_aux)), batch_stats = encode_with_terms(
            params, state.batch_stats, (*inputs, terms.extras))
        value, head_aux = head(params, a, b)
        return value + term, (head_aux, term_aux, batch_stats)

      (value, (head_aux, (term_metrics, centers), batch_stats)), grads = jax.value_and_grad(
          loss_fn, has_aux=True)(state.params)
    head_aux = ({**head_aux[0], **term_metrics}, *head_aux[1:])
    metrics, tau, bias, rows = head_aux
    return (value, StepAux(metrics, batch_stats, tau, bias, rows, centers)), grads

  return loss_and_grads


def make_train_step(exp: Experiment):
  """The jitted step: (state, batch) -> (new state, metrics). The state is
  donated; the batch is split over the batch axes."""
  loss_and_grads = make_loss_and_grads(exp)

  def train_step(state: TrainState, batch, *teacher_weights):
    (loss, (metrics, batch_stats, tau, bias, rows, centers)), grads = loss_and_grads(
        state, batch, *teacher_weights)
    updates, opt_state = exp.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # Clamp log τ into [log τ_min, log τ_max] after the update (open_clip's way).
    model = nnx.merge(exp.train_graphdef, params, batch_stats)
    project_all(model)
    params = nnx.state(model, nnx.Param)
    grad_norm = optax.global_norm(grads)
    metrics = dict(metrics, loss=loss, **exp.method.temperature_metrics(tau),
                   grad_norm=grad_norm, learning_rate=exp.schedule(state.step))
    if bias is not None:
      metrics['bias'] = bias
    metrics.update(per_example.metrics(rows))
    ema = ema_teacher.updated(state.ema, state.params, params, centers, state.step,
                              exp.config.self_distill)
    updated = (params, batch_stats, opt_state, rows, ema)
    if exp.config.nonfinite == 'skip':  # a non-finite step leaves the state as it was
      finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
      updated = jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated,
                             (state.params, state.batch_stats, state.opt_state,
                              per_example.gather(state.per_example, batch), state.ema))
      metrics['skipped'] = 1.0 - finite.astype(jnp.float32)
    params, batch_stats, opt_state, rows, ema = updated
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                              opt_state=opt_state,
                              per_example=per_example.scatter(state.per_example, batch, rows),
                              ema=ema)
    return new_state, metrics

  teacher = () if exp.teacher is None else (exp.teacher.shardings,)
  return jax.jit(train_step, in_shardings=(exp.state_sharding, parallel.batch_sharding(exp.mesh),
                                           *teacher),
                 out_shardings=(exp.state_sharding, exp.replicated), donate_argnums=0)


def abstract_batch(exp: Experiment, batch_size: int | None = None) -> dict:
  """Shapes, dtypes and shardings of the global batch the step reads (its
  batch_keys): uint8 images of the dataset's shape, int32 token ids."""
  n = batch_size or exp.config.batch_size
  shapes = {'image': exp.image_shapes(n), 'index': ((n,), jnp.int32)}
  if exp.tokenizer is not None:
    shapes['text'] = ((n, exp.tokenizer.max_length), jnp.int32)
  if exp.teacher is not None:
    shapes['teacher_text'] = ((n, exp.teacher.tokenizer.max_length), jnp.int32)
  if exp.config.decoder.weight:
    shapes['decoder_ids'] = ((n, exp.tokenizer.max_length), jnp.int32)
    shapes['decoder_weights'] = ((n, exp.tokenizer.max_length), jnp.float32)
  sharding = parallel.batch_sharding(exp.mesh)
  struct = lambda shape_dtype: jax.ShapeDtypeStruct(*shape_dtype, sharding=sharding)
  return {key: jax.tree.map(struct, shapes[key], is_leaf=lambda x: isinstance(x, tuple))
          for key in step_batch_keys(exp)}


def compile_step(exp: Experiment):
  """The train step compiled ahead of time from the state's and the batch's
  shapes: nothing is allocated, and XLA's memory and cost analyses are
  there before the first step (jaxcl.trainer.step_memory)."""
  teacher = () if exp.teacher is None else (jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      exp.teacher.weights),)
  return make_train_step(exp).lower(exp.abstract_state(), abstract_batch(exp),
                                    *teacher).compile()


def runnable(exp: Experiment, compiled):
  """The compiled step as the loop calls it, step(state, batch): with a
  teacher, its weights passed along; for NaFlex batches at a smaller patch
  budget than the largest (whose memory was checked), the same step
  compiled at its first batch of that budget."""
  teacher = () if exp.teacher is None else (exp.teacher.weights,)
  if exp.patching is None or len(exp.patching.budgets) == 1:
    return lambda state, batch: compiled(state, batch, *teacher)
  jitted, largest = make_train_step(exp), exp.patching.eval_budget

  def step(state, batch):
    at_largest = batch['image']['patches'].shape[1] == largest
    return (compiled if at_largest else jitted)(state, batch, *teacher)

  return step


def step_batch_keys(exp: Experiment) -> tuple[str, ...]:
  """The arrays of a batch the step reads: the method's, the rows' dataset
  indices when there is per-example state, a teacher's own token ids, and
  the decoder's rows (config.decoder)."""
  teacher = exp.teacher
  return (exp.method.batch_keys + (('index',) if exp.config.loss.estimator != 'batch' else ())
          + ((teacher.text_key,) if teacher is not None and teacher.text_key != 'text' else ())
          + (('decoder_ids', 'decoder_weights') if exp.config.decoder.weight else ()))


def model_inputs_of(batch: dict) -> dict:
  """The batch without its dataset indices, a teacher's token ids and the
  decoder's weights: what augmentation and the student's model read."""
  return {k: v for k, v in batch.items()
          if k not in ('index', 'teacher_text', 'decoder_weights')}


def model_batch(exp: Experiment, batch: dict) -> dict:
  """The arrays of a host batch the step reads (the labels it does not)."""
  return {k: batch[k] for k in step_batch_keys(exp)}
