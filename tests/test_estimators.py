"""SogCLR's moving-average estimator (loss.estimator=sogclr) against float64
NumPy references written from the paper's update and gradient.

For NT-Xent and CLIP, with the dense, blockwise and ring losses, on one device
and on 8: the value stays the batch loss, the new averages follow
u <- (1 - γ) u + γ g (g the batch's mean negative term; an anchor not seen yet
takes g), and the gradient in the embeddings and τ is that of
-x_ii + Σ_j exp(x_ij) / (|negatives| u_i) with the new u held fixed. With
γ = 1 that is the gradient of the negatives-only objective itself.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

import test_losses
from helpers import assert_close
from jaxcl import losses
from jaxcl.losses import estimators
from test_losses import finite_diff, ref_clip, ref_nt_xent, unit_rows

N, D, GAMMA = 16, 6, 0.3
RTOL = 2e-6  # float32 against float64, as tests/test_losses.py states
IMPLS = ['dense', 'blockwise', pytest.param('ring', marks=pytest.mark.slow)]


# ------------------------------------------------------------- references ---
def _lse(x):
  m = x.max()
  return m + np.log(np.exp(x - m).sum())


def _anchor_rows(q, k, tau, negatives_of, positive_of):
  """Per anchor i: (positive logit, [logits of its negatives])."""
  s = q @ k.T / tau
  return [(s[i, positive_of(i)], s[i, negatives_of(i)]) for i in range(len(q))]


def _nt_xent_rows(z1, z2, tau):
  n = len(z1)
  z = np.concatenate([z1, z2])
  return _anchor_rows(z, z, tau,
                      lambda i: [j for j in range(2 * n) if j not in (i, (i + n) % (2 * n))],
                      lambda i: (i + n) % (2 * n))


def _clip_rows(a, b, tau):
  n = len(a)
  negatives = lambda i: [j for j in range(n) if j != i]
  return _anchor_rows(a, b, tau, negatives, lambda i: i) + _anchor_rows(b, a, tau, negatives,
                                                                         lambda i: i)


ROWS = {'nt_xent': _nt_xent_rows, 'clip_loss': _clip_rows}
VALUE = {'nt_xent': ref_nt_xent, 'clip_loss': ref_clip}


def ref_new_log_u(rows, log_u, gamma):
  """Anchor order: column 0's N anchors, then column 1's (log_u [N, 2])."""
  old = np.concatenate([log_u[:, 0], log_u[:, 1]])
  g = np.array([np.exp(_lse(neg)) / len(neg) for _, neg in rows])
  new = np.where(np.isfinite(old), (1 - gamma) * np.exp(old) + gamma * g, g)
  return np.log(new).reshape(2, -1).T


def ref_surrogate(name, u):
  """The objective whose gradient SogCLR takes, u [N, 2] held fixed."""
  flat = np.concatenate([u[:, 0], u[:, 1]])

  def surrogate(x, y, tau):
    rows = ROWS[name](x, y, tau)
    return np.mean([-pos + np.exp(neg).sum() / (len(neg) * flat[i])
                    for i, (pos, neg) in enumerate(rows)])

  return surrogate


def ref_negatives_only(name):
  """-x_ii + log mean_{j negative} exp(x_ij), averaged over the anchors."""
  return lambda x, y, tau: np.mean([-pos + _lse(neg) - np.log(len(neg))
                                    for pos, neg in ROWS[name](x, y, tau)])


# --------------------------------------------------------------- the runs ---
def _loss(name, impl, axis_name, gamma):
  fn = getattr(losses, name)

  def loss(x, y, tau, log_u):
    result = fn(x, y, tau, losses.LossOptions(axis_name, impl, block_size=4),
                state=estimators.Moving(log_u, gamma))
    return result.loss, result.state.log_u

  return loss


def _value_grads_and_u(name, impl, devices, inputs, gamma):
  x, y, tau, log_u = inputs
  if devices == 1:
    fn = _loss(name, impl, None, gamma)
  else:
    mesh = jax.make_mesh((devices,), ('data',), axis_types=(AxisType.Auto,))
    fn = jax.shard_map(_loss(name, impl, 'data', gamma), mesh=mesh,
                       in_specs=(P('data'), P('data'), P(), P('data')),
                       out_specs=(P(), P('data')))
  grad = jax.value_and_grad(fn, argnums=(0, 1, 2), has_aux=True)
  (value, new_log_u), grads = jax.jit(grad)(jnp.float32(x), jnp.float32(y), jnp.float32(tau),
                                            jnp.float32(log_u))
  return value, grads, new_log_u


def _inputs(seed, seen=True):
  rng = np.random.default_rng(seed)
  x, y = unit_rows(rng, N, D), unit_rows(rng, N, D)
  log_u = rng.normal(size=(N, 2)) + 2.0
  if seen:
    log_u[::3, 1] = -np.inf  # some anchors new
  else:
    log_u[:] = -np.inf
  return x, y, 0.3, log_u


@pytest.mark.parametrize('impl', IMPLS)
@pytest.mark.parametrize('devices', [1, 8])
@pytest.mark.parametrize('name', ['nt_xent', 'clip_loss'])
def test_sogclr_matches_reference(name, devices, impl):
  x, y, tau, log_u = inputs = _inputs(4)
  value, grads, new_log_u = _value_grads_and_u(name, impl, devices, inputs, GAMMA)
  assert_close(value, VALUE[name](x, y, tau), rtol=RTOL, what='loss (the batch value)')
  new = ref_new_log_u(ROWS[name](x, y, tau), log_u, GAMMA)
  assert_close(new_log_u, new, rtol=RTOL, what='new log u')
  want = finite_diff(ref_surrogate(name, np.exp(new)), [x, y, tau])
  for got, expected, what in zip(grads, want, ('x', 'y', 'tau')):
    assert_close(got, expected, rtol=RTOL, what=what)


@pytest.mark.parametrize('name', ['nt_xent', 'clip_loss'])
def test_sogclr_with_gamma_one_is_the_negatives_only_gradient(name):
  x, y, tau, log_u = inputs = _inputs(5)
  _, grads, _ = _value_grads_and_u(name, 'dense', 1, inputs, 1.0)
  want = finite_diff(ref_negatives_only(name), [x, y, tau])
  for got, expected, what in zip(grads, want, ('x', 'y', 'tau')):
    assert_close(got, expected, rtol=RTOL, what=what)


def test_unseen_anchors_start_from_the_batch_estimate():
  """First visit: u = g whatever γ, so the step is the negatives-only gradient."""
  x, y, tau, _ = inputs = _inputs(6, seen=False)
  _, grads, new_log_u = _value_grads_and_u('nt_xent', 'blockwise', 8, inputs, GAMMA)
  g = ref_new_log_u(ROWS['nt_xent'](x, y, tau), np.full((N, 2), -np.inf), 1.0)
  assert_close(new_log_u, g, rtol=RTOL, what='log u = log g')
  want = finite_diff(ref_negatives_only('nt_xent'), [x, y, tau])
  for got, expected, what in zip(grads, want, ('x', 'y', 'tau')):
    assert_close(got, expected, rtol=RTOL, what=what)


def test_small_temperature_keeps_log_u_finite():
  """At τ = 0.01 exp(x) reaches e^100, past float32: the averages live in log space."""
  x, y, _, log_u = _inputs(7)
  _, grads, new_log_u = _value_grads_and_u('clip_loss', 'blockwise', 1, (x, y, 0.01, log_u),
                                           GAMMA)
  assert np.all(np.isfinite(np.asarray(new_log_u)))
  assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)


# ------------------------------------------- iSogCLR: individual τ (Qiu et al.) ---
HYPER = dict(gamma=GAMMA, beta=0.6, eta=0.05, rho=0.3, tau_min=0.05, tau_max=0.7)


def _rows_with_taus(name, x, y, taus):
  """Per anchor (positive logit, negatives' logits) at each anchor's own τ
  (anchor order: column 0's N, then column 1's)."""
  flat = np.concatenate([taus[:, 0], taus[:, 1]])
  unit = ROWS[name](x, y, 1.0)  # similarities
  return [(pos / t, neg / t) for (pos, neg), t in zip(unit, flat)]


def ref_individual(name, x, y, taus, log_u, moment):
  """(value, new log u, new τ, new moment, surrogate of the model's gradient)."""
  rows = _rows_with_taus(name, x, y, taus)
  new_log_u = ref_new_log_u(rows, log_u, GAMMA)
  u = np.exp(np.concatenate([new_log_u[:, 0], new_log_u[:, 1]]))
  flat_tau = np.concatenate([taus[:, 0], taus[:, 1]])
  grad = np.array([np.log(u[i]) + HYPER['rho'] - np.sum(np.exp(neg) * neg) / (len(neg) * u[i])
                   for i, (_, neg) in enumerate(rows)])
  old_moment = np.concatenate([moment[:, 0], moment[:, 1]])
  new_moment = (1 - HYPER['beta']) * old_moment + HYPER['beta'] * grad
  new_tau = np.clip(flat_tau - HYPER['eta'] * new_moment, HYPER['tau_min'], HYPER['tau_max'])
  as_columns = lambda v: v.reshape(2, -1).T

  def surrogate(a, b):
    return np.mean([t * (-pos + np.exp(neg).sum() / (len(neg) * u[i]))
                    for i, ((pos, neg), t) in enumerate(zip(_rows_with_taus(name, a, b, taus),
                                                            flat_tau))])

  value = {'nt_xent': test_losses.ref_nt_xent_rows, 'clip_loss': test_losses.ref_clip_rows}[name]
  return (value(x, y, taus), new_log_u, as_columns(new_tau), as_columns(new_moment), surrogate)


@pytest.mark.parametrize('impl', IMPLS)
@pytest.mark.parametrize('devices', [1, 8])
@pytest.mark.parametrize('name', ['nt_xent', 'clip_loss'])
def test_individual_temperatures_match_reference(name, devices, impl):
  x, y, _, log_u = _inputs(8)
  rng = np.random.default_rng(8)
  taus, moment = rng.uniform(0.1, 0.5, size=(N, 2)), rng.normal(size=(N, 2))
  fn = getattr(losses, name)

  def loss(a, b, t, lu, m, axis):
    state = estimators.Individual(lu, t, m, **HYPER)
    # the loss takes each anchor's τ from the state, not from its temperature
    result = fn(a, b, 1.0, losses.LossOptions(axis, impl, block_size=4), state=state)
    return result.loss, (result.state.log_u, result.state.tau, result.state.moment)

  if devices == 1:
    run = lambda *args: loss(*args, None)
  else:
    mesh = jax.make_mesh((devices,), ('data',), axis_types=(AxisType.Auto,))
    run = jax.shard_map(lambda *args: loss(*args, 'data'), mesh=mesh,
                        in_specs=(P('data'),) * 5, out_specs=(P(), P('data')))
  (value, (new_log_u, new_tau, new_moment)), grads = jax.jit(
      jax.value_and_grad(run, argnums=(0, 1), has_aux=True))(
          *(jnp.float32(v) for v in (x, y, taus, log_u, moment)))
  want_value, want_u, want_tau, want_moment, surrogate = ref_individual(name, x, y, taus, log_u,
                                                                        moment)
  assert_close(value, want_value, rtol=RTOL, what='loss (the batch value)')
  assert_close(new_log_u, want_u, rtol=RTOL, what='new log u')
  assert_close(new_moment, want_moment, rtol=1e-5, what='τ moment')
  assert_close(new_tau, want_tau, rtol=RTOL, what='new τ')
  assert np.any(np.asarray(new_tau) != taus.astype(np.float32))
  for got, expected, what in zip(grads, finite_diff(surrogate, [x, y]), ('x', 'y')):
    assert_close(got, expected, rtol=RTOL, what=what)
