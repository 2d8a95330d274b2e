"""Distillation from a teacher (issue 33, part 4): the loss against a float64
NumPy reference and open_clip's own DistillClipLoss, on one device and
sharded over 8 simulated devices."""

import dataclasses
import functools
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import helpers
from helpers import assert_close
from jaxcl import config as config_lib, losses, parallel
from jaxcl.data import augment
from jaxcl.hub import importer
from jaxcl.trainer import (
  checkpoints,
  experiment,
  teacher as teacher_lib,
  train_step,
  trained,
  validation,
)
from test_losses import LAYOUTS, RTOL_GRAD, RTOL_VALUE, _mesh, finite_diff, unit_rows


def _log_softmax(x):
  x = x - x.max(axis=1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def ref_distill(a, b, teacher_a, teacher_b, tau, teacher_tau):
  """open_clip's form, in float64: each direction's mean over anchors of
  -Σ_j softmax(teacher)_ij log softmax(student)_ij, averaged."""
  def direction(student, teacher):
    return np.mean(-(np.exp(_log_softmax(teacher)) * _log_softmax(student)).sum(axis=1))
  student, teacher = a @ b.T / tau, teacher_a @ teacher_b.T / teacher_tau
  return 0.5 * (direction(student, teacher) + direction(student.T, teacher.T))


def ref_kl(a, b, teacher_a, teacher_b, tau, teacher_tau):
  def direction(student, teacher):
    p = np.exp(_log_softmax(teacher))
    return np.mean((p * (_log_softmax(teacher) - _log_softmax(student))).sum(axis=1))
  student, teacher = a @ b.T / tau, teacher_a @ teacher_b.T / teacher_tau
  return 0.5 * (direction(student, teacher) + direction(student.T, teacher.T))


N, D, TEACHER_D = 16, 6, 10


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  return (unit_rows(rng, N, D), unit_rows(rng, N, D), unit_rows(rng, N, TEACHER_D),
          unit_rows(rng, N, TEACHER_D), 0.3, 0.05)


def _on_layout(layout):
  """distill_loss as a function of (a, b, teacher_a, teacher_b, τ, τ'):
  on one device, or in shard_map with the rows split over the layout's axes."""
  def fn(a, b, ta, tb, tau, teacher_tau, axis=None):
    result = losses.distill_loss(a, b, ta, tb, tau, teacher_tau, losses.LossOptions(axis))
    return result.loss, result.metrics['distill_kl']

  if LAYOUTS[layout] is None:
    return fn
  shape, names, axis = LAYOUTS[layout]
  spec = jax.sharding.PartitionSpec(axis)
  return jax.shard_map(lambda *args: fn(*args, axis=axis), mesh=_mesh(shape, names),
                       in_specs=(spec,) * 4 + (jax.sharding.PartitionSpec(),) * 2,
                       out_specs=jax.sharding.PartitionSpec())


@pytest.mark.parametrize('layout', LAYOUTS)
def test_distill_loss_matches_the_float64_reference(layout):
  inputs = _inputs()
  fn = _on_layout(layout)
  args = tuple(jnp.float32(v) for v in inputs)
  (value, kl), grads = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3, 4), has_aux=True))(
      *args)
  assert_close(value, ref_distill(*inputs), rtol=RTOL_VALUE, what='loss')
  assert_close(kl, ref_kl(*inputs), rtol=RTOL_VALUE, what='kl')
  a, b, teacher_a, teacher_b, tau, teacher_tau = inputs
  want = finite_diff(lambda a, b, tau: ref_distill(a, b, teacher_a, teacher_b, tau, teacher_tau),
                     [a, b, tau])
  for got, expected, what in zip((grads[0], grads[1], grads[4]), want, ('a', 'b', 'tau')):
    assert_close(got, expected, rtol=RTOL_GRAD, what=what)
  # The teacher is a constant: no gradient reaches its embeddings.
  assert not np.any(grads[2]) and not np.any(grads[3])


def test_a_student_equal_to_its_teacher_has_no_kl_and_the_teachers_entropy():
  a, b, _, _, tau, _ = _inputs(1)
  result = losses.distill_loss(a, b, a, b, tau, tau)
  assert abs(float(result.metrics['distill_kl'])) < 1e-6
  logits = a @ b.T / tau
  entropy = lambda s: np.mean(-(np.exp(_log_softmax(s)) * _log_softmax(s)).sum(axis=1))
  assert_close(result.loss, 0.5 * (entropy(logits) + entropy(logits.T)), rtol=RTOL_VALUE,
               what='entropy')


def test_per_direction_temperatures_take_their_direction():
  a, b, ta, tb, _, _ = _inputs(2)
  got = losses.distill_loss(a, b, ta, tb, jnp.float32([0.2, 0.5]), jnp.float32([0.07, 0.1]))
  want = 0.5 * (ref_distill_rows_only(a, b, ta, tb, 0.2, 0.07)
                + ref_distill_rows_only(b, a, tb, ta, 0.5, 0.1))
  assert_close(got.loss, want, rtol=RTOL_VALUE, what='loss')


def ref_distill_rows_only(a, b, teacher_a, teacher_b, tau, teacher_tau):
  """The images-over-texts direction alone."""
  student, teacher = a @ b.T / tau, teacher_a @ teacher_b.T / teacher_tau
  return np.mean(-(np.exp(_log_softmax(teacher)) * _log_softmax(student)).sum(axis=1))


@pytest.mark.slow  # imports torch and open_clip
def test_distill_loss_equals_open_clips():
  """open_clip's DistillClipLoss (torch, one process) on the same features:
  its logit scales are 1/τ."""
  torch = pytest.importorskip('torch')
  from open_clip.loss import DistillClipLoss  # noqa: PLC0415  (a test-only reference)
  a, b, ta, tb, tau, teacher_tau = _inputs(3)
  as_torch = lambda x: torch.tensor(x, dtype=torch.float64)
  _, want = DistillClipLoss()(as_torch(a), as_torch(b), torch.tensor(1 / tau, dtype=torch.float64),
                              as_torch(ta), as_torch(tb),
                              torch.tensor(1 / teacher_tau, dtype=torch.float64))
  got = losses.distill_loss(jnp.float32(a), jnp.float32(b), jnp.float32(ta), jnp.float32(tb),
                            tau, teacher_tau).loss
  assert_close(got, float(want), rtol=RTOL_VALUE, what='distill_loss')


# -------------------------------------------------------- in the step ---
@pytest.fixture(scope='module')
def teacher_workdir(tmp_path_factory):
  """A CLIP that open_clip builds at random initialization (a 32-px ViT,
  OpenAI's BPE tokens of length 20, its own mean and std), imported: a
  teacher with another architecture and tokenizer than the student's."""
  from test_import import make_open_clip  # noqa: PLC0415  (its open_clip test model)
  root = tmp_path_factory.mktemp('teacher')
  make_open_clip(root / 'open_clip')
  importer.import_checkpoint(root / 'open_clip', root / 'workdir')
  return root / 'workdir'


def _student(teacher_workdir, run_workdir, devices=1, weight=0.5, start_step=0, **extra):
  config = helpers.tiny_config(helpers.CLIP_CONFIG, helpers.TINY_TWO_TOWER, batch_size=16,
                               **extra)
  config.distill.update(teacher=str(teacher_workdir), weight=weight, start_step=start_step)
  validation.validate(config)
  exp = experiment.setup(config, devices=jax.devices()[:devices])
  return dataclasses.replace(exp, teacher=teacher_lib.load(str(teacher_workdir), exp,
                                                           run_workdir))


def _loss_and_grads(exp, state, batch):
  return jax.jit(train_step.make_loss_and_grads(exp))(state, batch, exp.teacher.weights)


def _reference(exp, state, batch):
  """(contrastive loss, distill_loss) of the step's crops, computed here from
  the two towers (the teacher with its own tokenizer, image size and
  standardization) and the two loss functions."""
  teacher = exp.teacher
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  keys = augment.view_keys(key, 1, len(batch['text']))
  model = nnx.merge(exp.eval_graphdef, state.params, state.batch_stats)
  a, b = model(*exp.method.model_inputs(keys, batch, exp.config))
  views = augment.random_views(keys, batch['image'], exp.config.augment)[0]
  teacher_model = nnx.merge(teacher.graphdef, *teacher.weights)
  mean, std = (jnp.asarray(teacher.config.dataset[k], jnp.float32) for k in ('mean', 'std'))
  teacher_a, teacher_b = teacher_model((views - mean) / std, batch['teacher_text'])
  tau = model.temperature(state.step)
  return (losses.clip_loss(a, b, tau).loss,
          losses.distill_loss(a, b, teacher_a, teacher_b, tau, teacher_model.temperature(0)).loss)


@pytest.mark.slow  # a student and an imported teacher set up twice, their steps compiled
def test_the_step_adds_the_teachers_term_from_its_start_step(teacher_workdir, tmp_path):
  """The step's loss is the contrastive loss plus weight x distill_loss of
  the student's and the teacher's embeddings of the same crops; before
  distill.start_step, the contrastive loss alone. On 8 devices, with FSDP
  (the teacher's weights sharded as the student's) and microbatches, the
  step is the same."""
  exp = _student(teacher_workdir, tmp_path, weight=0.5, start_step=1)
  assert exp.teacher.text_key == 'teacher_text'  # OpenAI's BPE, not the student's bytes
  host = helpers.two_tower_batch(exp, 16)
  batch = parallel.put_batch(exp.mesh, {k: host[k] for k in train_step.step_batch_keys(exp)})
  reference = jax.jit(functools.partial(_reference, exp))
  state = exp.init_state()
  results = []
  for step, weight in ((0, 0.0), (1, 0.5)):
    state = state.replace(step=jnp.int32(step))
    (value, (metrics, *_)), grads = _loss_and_grads(exp, state, batch)
    contrastive, distill = reference(state, batch)
    assert_close(metrics['distill_loss'], distill, rtol=1e-5, what='distill_loss')
    assert_close(value, contrastive + weight * distill, rtol=1e-5, what=f'loss at step {step}')
    assert float(metrics['distill_kl']) > 0
    results.append(jax.device_get((value, metrics['distill_loss'], grads)))
  assert any(not np.allclose(g, h) for g, h in zip(*(jax.tree.leaves(r[2]) for r in results)))

  sharded = _student(teacher_workdir, tmp_path, devices=8, weight=0.5, start_step=1,
                     microbatch_size=8, **{'mesh.fsdp': 2})
  assert any(spec != jax.sharding.PartitionSpec()
             for spec in jax.tree.leaves(jax.tree.map(lambda s: s.spec,
                                                      sharded.teacher.shardings[0])))
  batch = parallel.put_batch(sharded.mesh,
                             {k: host[k] for k in train_step.step_batch_keys(sharded)})
  state = sharded.init_state().replace(step=jnp.int32(1))
  (value, (metrics, *_)), grads = _loss_and_grads(sharded, state, batch)
  assert_close(value, results[1][0], rtol=1e-5, what='loss on 8 devices')
  assert_close(metrics['distill_loss'], results[1][1], rtol=1e-5, what='distill_loss')
  assert_close(jax.device_get(grads), results[1][2], rtol=3e-5, what='grads on 8 devices')


# ------------------------------------------------------- checks and runs ---
def _config(**distill):
  config = helpers.tiny_config(helpers.CLIP_CONFIG, helpers.TINY_TWO_TOWER)
  config.distill.update(**distill)
  return config


def _clip_without_checkpoints(folder):
  folder.mkdir()
  config_lib.save(_config(), folder)
  return folder


@pytest.mark.parametrize('change, message', [
    (dict(method='simclr'), 'distill.teacher teaches an image-text model'),
    ({'temperature.mode': 'predicted'}, 'one τ per softmax direction'),
    ({'dataset.resolution': 'naflex', 'model.name': 'vit'}, 'reads square images'),
    ({'distill.weight': -1.0}, 'distill.weight must be a number >= 0'),
    ({'distill.start_step': -1}, 'distill.start_step must be an integer >= 0'),
    ({'distill.teacher': '/nowhere'}, 'distill.teacher: /nowhere has no config.json'),
])
def test_a_bad_distill_group_is_one_line(change, message, tmp_path):
  config = _config(teacher=str(_clip_without_checkpoints(tmp_path / 'teacher')))
  config.update_from_flattened_dict(change)
  with pytest.raises(config_lib.ConfigError, match=message) as raised:
    validation.validate(config)
  assert '\n' not in str(raised.value)


def test_a_teacher_that_cannot_teach_is_one_line(tmp_path):
  teacher = _clip_without_checkpoints(tmp_path / 'clip')
  with pytest.raises(config_lib.ConfigError, match='has no checkpoint to teach with'):
    validation.validate(_config(teacher=str(teacher)))
  simclr = tmp_path / 'simclr'
  simclr.mkdir()
  config_lib.save(config_lib.base_config(), simclr)
  with pytest.raises(config_lib.ConfigError, match='is a simclr run: a teacher is an image-text'):
    validation.validate(_config(teacher=str(simclr)))
  free = tmp_path / 'free'
  free.mkdir()
  free_config = _config()
  free_config.temperature.mode = 'free'
  config_lib.save(free_config, free)
  with pytest.raises(config_lib.ConfigError, match=r'has no τ \(temperature.mode=free\)'):
    validation.validate(_config(teacher=str(free)))
  proc = helpers.jaxcl('train', '--config', helpers.CLIP_CONFIG, '--workdir',
                       str(tmp_path / 'run'), f'--config.distill.teacher={simclr}', check=False)
  assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
  assert not (tmp_path / 'run').exists()


@pytest.mark.slow  # two short taught runs: the resume, and its pinned teacher, show only in a run
def test_a_taught_run_resumes_exactly_with_its_teacher_pinned(teacher_workdir, tmp_path):
  """A run with every recipe term on (the teacher, the LocCa decoder and its
  tasks drawn per example, self-distillation from step 1 with its EMA
  teacher) killed after its checkpoint 2 and resumed gives the whole run's
  weights and EMA teacher, although its teacher's workdir gained a newer
  checkpoint (other weights) meanwhile: the run keeps the teacher's step it
  started with. Its checkpoints load (as eval and export load them) with
  the teacher gone."""
  teacher = tmp_path / 'teacher'
  shutil.copytree(teacher_workdir, teacher)
  whole, resumed = tmp_path / 'whole', tmp_path / 'resumed'
  args = ('--config', helpers.CLIP_CONFIG, *helpers.tiny_overrides(helpers.TINY_TWO_TOWER),
          f'--config.distill.teacher={teacher}', '--config.decoder.weight=0.5',
          '--config.self_distill.weight=1.0', '--config.self_distill.masked_weight=0.25',
          '--config.self_distill.start_step=1', '--config.self_distill.local_views=2',
          '--config.self_distill.head_hidden=16', '--config.self_distill.head_bottleneck=8',
          '--config.self_distill.prototypes=32',
          '--config.total_steps=4',
          '--config.checkpoint_every_steps=2', '--config.eval_every_steps=4',
          '--config.log_every_steps=2')
  out = helpers.jaxcl('train', '--workdir', str(whole), *args).stdout
  assert f'taught by {teacher} (step 0, clip, vit, its own tokenizer)' in out
  rows = [json.loads(line) for line in (whole / 'metrics.jsonl').read_text().splitlines()]
  assert all(row['distill_loss'] > 0 and row['distill_kl'] > 0 and row['decoder_loss'] > 0
             and row['self_distill_loss'] > 0 and row['masked_loss'] > 0
             for row in rows if 'loss' in row)
  _add_a_newer_checkpoint(teacher, step=7)
  shutil.copytree(whole, resumed)
  shutil.rmtree(resumed / 'checkpoints' / '4')
  (resumed / 'eval.json').unlink()
  out = helpers.jaxcl('train', '--workdir', str(resumed), *args).stdout
  assert 'resuming from step 2' in out and f'taught by {teacher} (step 0,' in out
  shutil.rmtree(teacher)  # what eval and export load needs no teacher
  (_, state_a), (_, state_b) = (trained.load_trained(str(w)) for w in (whole, resumed))
  assert int(state_a.step) == int(state_b.step) == 4 and state_a.ema
  for a, b in zip(*(jax.tree.leaves(jax.device_get((s.params, s.ema)))
                    for s in (state_a, state_b))):
    np.testing.assert_array_equal(a, b)


def _add_a_newer_checkpoint(workdir, step: int):
  """Checkpoint `step` in `workdir`: its newest weights, each doubled."""
  exp, state = trained.load_trained(str(workdir), open_data=False)
  manager = checkpoints.checkpoint_manager(workdir, None)
  checkpoints.save_checkpoint(manager, state.replace(
      step=jnp.int32(step), params=jax.tree.map(lambda x: 2 * x, state.params)))
  checkpoints.finish_checkpoints(manager)
  manager.close()
  del exp
