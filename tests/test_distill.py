"""Distillation from a teacher (issue 33, part 4): the loss against a float64
NumPy reference and open_clip's own DistillClipLoss, on one device and
sharded over 8 simulated devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import assert_close
from jaxcl import losses
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
