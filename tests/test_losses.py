"""Each loss against a float64 NumPy reference written from the papers' formulas.

Values and gradients (embeddings and τ; SigLIP's bias too), on one device and
sharded over 8 simulated devices (one mesh axis, and a tuple of two axes).
Reference gradients are central finite differences of the float64 reference.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from helpers import assert_close
from jaxcl import losses


# ------------------------------------------------------------- references ---
def _lse(x):
  m = x.max()
  return m + np.log(np.exp(x - m).sum())


def ref_info_nce(q, k, tau):
  s = q @ k.T / tau
  return np.mean([_lse(s[i]) - s[i, i] for i in range(len(q))])


def ref_clip(a, b, tau):
  return 0.5 * (ref_info_nce(a, b, tau) + ref_info_nce(b, a, tau))


def ref_nt_xent(z1, z2, tau):
  n = len(z1)
  z = np.concatenate([z1, z2])
  s = z @ z.T / tau
  terms = []
  for i in range(2 * n):
    others = [j for j in range(2 * n) if j != i]
    terms.append(_lse(s[i, others]) - s[i, (i + n) % (2 * n)])
  return np.mean(terms)


def ref_siglip(a, b, tau, bias):
  logits = a @ b.T / tau + bias
  y = 2 * np.eye(len(a)) - 1
  return -np.sum(np.log(1 / (1 + np.exp(-y * logits)))) / len(a)


def finite_diff(f, args, eps=1e-6):
  """Central differences of f with respect to every argument (float64)."""
  grads = []
  for idx, x in enumerate(args):
    x = np.asarray(x, np.float64)
    g = np.zeros_like(x)
    for pos in np.ndindex(x.shape):
      plus, minus = x.copy(), x.copy()
      plus[pos] += eps
      minus[pos] -= eps
      up = list(args); up[idx] = plus
      down = list(args); down[idx] = minus
      g[pos] = (f(*up) - f(*down)) / (2 * eps)
    grads.append(g)
  return grads


def unit_rows(rng, n, d):
  x = rng.normal(size=(n, d))
  return x / np.linalg.norm(x, axis=1, keepdims=True)


# -------------------------------------------------------------- the cases ---
# float32 against float64 (tests/helpers.py: assert_close): the loss sums <= 32
# logits per row and 32 rows [worst measured 7.8e-8]; its gradient adds the
# reduction over rows [1.9e-7] (the float64 finite differences are exact to
# ~1e-10).
RTOL_VALUE = 2e-6
RTOL_GRAD = 2e-6

N, D = 16, 6
CASES = {
    # name: (jaxcl function taking (x, y, tau, extra), reference, extra args)
    'nt_xent': (lambda x, y, t, axis: losses.nt_xent(x, y, temperature=t, axis_name=axis),
                ref_nt_xent),
    'info_nce': (lambda x, y, t, axis: losses.info_nce(x, y, temperature=t, axis_name=axis),
                 ref_info_nce),
    'clip_loss': (lambda x, y, t, axis: losses.clip_loss(x, y, temperature=t, axis_name=axis),
                  ref_clip),
}


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  return unit_rows(rng, N, D), unit_rows(rng, N, D)


def _mesh(shape, names):
  return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names))


def _sharded(fn, mesh, axis, num_args):
  """fn(x, y, *scalars) run under shard_map with rows split over `axis`."""
  spec = P(axis)
  return jax.shard_map(fn, mesh=mesh, in_specs=(spec, spec) + (P(),) * (num_args - 2),
                       out_specs=P())


LAYOUTS = {
    'single': None,
    'data8': ((8,), ('data',), 'data'),
    'tuple4x2': ((4, 2), ('data', 'fsdp'), ('data', 'fsdp')),
}


@pytest.mark.parametrize('layout', LAYOUTS)
@pytest.mark.parametrize('name', CASES)
def test_softmax_losses_match_reference(name, layout):
  fn, ref = CASES[name]
  x, y = _inputs()
  tau = 0.3
  if LAYOUTS[layout] is None:
    loss_fn = lambda a, b, t: fn(a, b, t, None)
  else:
    shape, names, axis = LAYOUTS[layout]
    loss_fn = _sharded(lambda a, b, t: fn(a, b, t, axis), _mesh(shape, names), axis, 3)
  args = (jnp.float32(x), jnp.float32(y), jnp.float32(tau))
  value, grads = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1, 2)))(*args)
  assert_close(value, ref(x, y, tau), rtol=RTOL_VALUE, what='loss')
  for got, want, what in zip(grads, finite_diff(ref, [x, y, tau]), ('x', 'y', 'tau')):
    assert_close(got, want, rtol=RTOL_GRAD, what=what)


@pytest.mark.parametrize('layout', LAYOUTS)
def test_siglip_matches_reference(layout):
  x, y = _inputs(1)
  tau, bias = 0.5, -2.0
  fn = lambda a, b, t, c, axis: losses.siglip_loss(a, b, temperature=t, bias=c, axis_name=axis)
  if LAYOUTS[layout] is None:
    loss_fn = lambda a, b, t, c: fn(a, b, t, c, None)
  else:
    shape, names, axis = LAYOUTS[layout]
    loss_fn = _sharded(lambda a, b, t, c: fn(a, b, t, c, axis), _mesh(shape, names), axis, 4)
  args = (jnp.float32(x), jnp.float32(y), jnp.float32(tau), jnp.float32(bias))
  value, grads = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1, 2, 3)))(*args)
  assert_close(value, ref_siglip(x, y, tau, bias), rtol=RTOL_VALUE, what='loss')
  for got, want, what in zip(grads, finite_diff(ref_siglip, [x, y, tau, bias]),
                             ('x', 'y', 'tau', 'bias')):
    assert_close(got, want, rtol=RTOL_GRAD, what=what)


def test_sharded_negatives_are_global():
  """A sharded loss that only used local negatives would be much smaller."""
  x, y = _inputs(2)
  local_only = np.mean([ref_nt_xent(x[i:i + 2], y[i:i + 2], 0.1) for i in range(0, N, 2)])
  mesh = _mesh((8,), ('data',))
  fn = _sharded(lambda a, b: losses.nt_xent(a, b, temperature=0.1, axis_name='data'), mesh,
                'data', 2)
  value = fn(jnp.float32(x), jnp.float32(y))
  assert_close(value, ref_nt_xent(x, y, 0.1), rtol=RTOL_VALUE)
  assert abs(float(value) - local_only) > 0.5


def test_bf16_inputs_give_float32_logits():
  x, y = _inputs(3)
  value = losses.nt_xent(jnp.bfloat16(x), jnp.bfloat16(y), temperature=0.1)
  assert value.dtype == jnp.float32
  xb = np.asarray(jnp.bfloat16(x), np.float64)
  yb = np.asarray(jnp.bfloat16(y), np.float64)
  assert_close(value, ref_nt_xent(xb, yb, 0.1), rtol=RTOL_VALUE)  # the same bf16 inputs


def ref_contrastive_accuracy(z1, z2, k):
  n = len(z1)
  z = np.concatenate([z1, z2])
  s = z @ z.T
  hits = 0
  for i in range(2 * n):
    pos = (i + n) % (2 * n)
    beaten = sum(1 for j in range(2 * n) if j not in (i, pos) and s[i, j] >= s[i, pos])
    hits += beaten < k
  return hits / (2 * n)


@pytest.mark.parametrize('layout', ['single', 'data8'])
def test_contrastive_accuracy_metrics(layout):
  rng = np.random.default_rng(4)
  x = unit_rows(rng, N, D)
  y = x + 0.6 * rng.normal(size=x.shape)  # noisy second view: some anchors miss
  y /= np.linalg.norm(y, axis=1, keepdims=True)
  fn = lambda a, b, axis: losses.nt_xent(a, b, temperature=0.2, axis_name=axis,
                                         with_metrics=True)
  if layout == 'single':
    _, metrics = fn(jnp.float32(x), jnp.float32(y), None)
  else:
    mesh = _mesh((8,), ('data',))
    _, metrics = jax.shard_map(functools.partial(fn, axis='data'), mesh=mesh,
                               in_specs=(P('data'), P('data')), out_specs=P())(
                                   jnp.float32(x), jnp.float32(y))
  top1, top5 = ref_contrastive_accuracy(x, y, 1), ref_contrastive_accuracy(x, y, 5)
  assert 0 < top1 < 1  # the case is informative
  np.testing.assert_allclose(metrics['contrastive_top1'], top1, atol=1e-6)
  np.testing.assert_allclose(metrics['contrastive_top5'], top5, atol=1e-6)
  # Collapsed embeddings: every candidate ties with the positive, top-1 is 0.
  same = jnp.ones((N, D)) / np.sqrt(D)
  _, collapsed = losses.nt_xent(same, same, temperature=0.2, with_metrics=True)
  assert float(collapsed['contrastive_top1']) == 0.0
