"""Each loss against a float64 NumPy reference written from the papers' formulas.

Values and gradients (embeddings and τ; SigLIP's bias too), on one device and
sharded over 8 simulated devices (one mesh axis, and a tuple of two axes).
Reference gradients are central finite differences of the float64 reference.
"""


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
      up, down = list(args), list(args)
      up[idx], down[idx] = plus, minus
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
    'nt_xent': (lambda x, y, t, axis: losses.nt_xent(x, y, t, losses.LossOptions(axis)).loss,
                ref_nt_xent),
    'info_nce': (lambda x, y, t, axis: losses.info_nce(x, y, t, losses.LossOptions(axis)).loss,
                 ref_info_nce),
    'clip_loss': (lambda x, y, t, axis: losses.clip_loss(x, y, t, losses.LossOptions(axis)).loss,
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


def _on_layout(fn, layout, num_args):
  """fn(*args, axis_name) as a function of its args: on one device, or in
  shard_map with the rows split over the layout's axes."""
  if LAYOUTS[layout] is None:
    return lambda *args: fn(*args, None)
  shape, names, axis = LAYOUTS[layout]
  return _sharded(lambda *args: fn(*args, axis), _mesh(shape, names), axis, num_args)


def _assert_matches(loss_fn, ref, inputs, names):
  """loss_fn's value and gradients (float32, jitted) against ref's value and
  its float64 central differences, for the first len(names) inputs."""
  args = tuple(jnp.float32(v) for v in inputs)
  value, grads = jax.jit(jax.value_and_grad(loss_fn, argnums=tuple(range(len(names)))))(*args)
  assert_close(value, ref(*inputs), rtol=RTOL_VALUE, what='loss')
  for got, want, what in zip(grads, finite_diff(ref, list(inputs)), names):
    assert_close(got, want, rtol=RTOL_GRAD, what=what)


@pytest.mark.parametrize('layout', LAYOUTS)
@pytest.mark.parametrize('name', CASES)
def test_softmax_losses_match_reference(name, layout):
  fn, ref = CASES[name]
  x, y = _inputs()
  _assert_matches(_on_layout(fn, layout, 3), ref, (x, y, 0.3), ('x', 'y', 'tau'))


@pytest.mark.parametrize('layout', LAYOUTS)
def test_siglip_matches_reference(layout):
  x, y = _inputs(1)
  fn = lambda a, b, t, c, axis: losses.siglip_loss(a, b, t, c, losses.LossOptions(axis)).loss
  _assert_matches(_on_layout(fn, layout, 4), ref_siglip, (x, y, 0.5, -2.0),
                  ('x', 'y', 'tau', 'bias'))


def test_sharded_negatives_are_global():
  """A sharded loss that only used local negatives would be much smaller."""
  x, y = _inputs(2)
  local_only = np.mean([ref_nt_xent(x[i:i + 2], y[i:i + 2], 0.1) for i in range(0, N, 2)])
  mesh = _mesh((8,), ('data',))
  fn = _sharded(lambda a, b: losses.nt_xent(a, b, 0.1, losses.LossOptions('data')).loss, mesh,
                'data', 2)
  value = fn(jnp.float32(x), jnp.float32(y))
  assert_close(value, ref_nt_xent(x, y, 0.1), rtol=RTOL_VALUE)
  assert abs(float(value) - local_only) > 0.5


def test_bf16_inputs_give_float32_logits():
  x, y = _inputs(3)
  value = losses.nt_xent(jnp.bfloat16(x), jnp.bfloat16(y), 0.1).loss
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
  fn = lambda a, b, axis: losses.nt_xent(a, b, 0.2, losses.LossOptions(axis))
  if layout == 'single':
    metrics = fn(jnp.float32(x), jnp.float32(y), None).metrics
  else:
    mesh = _mesh((8,), ('data',))
    metrics = jax.shard_map(lambda a, b: fn(a, b, 'data').metrics, mesh=mesh,
                            in_specs=(P('data'), P('data')), out_specs=P())(
                                jnp.float32(x), jnp.float32(y))
  top1, top5 = ref_contrastive_accuracy(x, y, 1), ref_contrastive_accuracy(x, y, 5)
  assert 0 < top1 < 1  # the case is informative
  np.testing.assert_allclose(metrics['contrastive_top1'], top1, atol=1e-6)
  np.testing.assert_allclose(metrics['contrastive_top5'], top5, atol=1e-6)
  # Collapsed embeddings: every candidate ties with the positive, top-1 is 0.
  same = jnp.ones((N, D)) / np.sqrt(D)
  collapsed = losses.nt_xent(same, same, 0.2).metrics
  assert float(collapsed['contrastive_top1']) == 0.0


# ------------------------------- the τ-free logits and CLIP's per-direction τ ---
def _ref_info_nce_logits(logits):
  return np.mean([_lse(logits[i]) - logits[i, i] for i in range(len(logits))])


def ref_free_clip(x, y, tau):
  s = 2 * np.arctanh(x @ y.T) / tau
  return 0.5 * (_ref_info_nce_logits(s) + _ref_info_nce_logits(s.T))


def ref_free_nt_xent(z1, z2, tau):
  n, z = len(z1), np.concatenate([z1, z2])
  s = 2 * np.arctanh(np.clip(z @ z.T, -1, 1 - 1e-12)) / tau  # the diagonal is left out
  return np.mean([_lse(s[i, [j for j in range(2 * n) if j != i]]) - s[i, (i + n) % (2 * n)]
                  for i in range(2 * n)])


def ref_free_siglip(a, b, tau, bias):
  logits = 2 * np.arctanh(a @ b.T) / tau + bias
  y = 2 * np.eye(len(a)) - 1
  return -np.sum(np.log(1 / (1 + np.exp(-y * logits)))) / len(a)


FREE_CASES = {
    'nt_xent': (lambda x, y, t, c, options: losses.nt_xent(x, y, t, options).loss,
                lambda x, y, t, c: ref_free_nt_xent(x, y, t)),
    'clip_loss': (lambda x, y, t, c, options: losses.clip_loss(x, y, t, options).loss,
                  lambda x, y, t, c: ref_free_clip(x, y, t)),
    'siglip_loss': (lambda x, y, t, c, options: losses.siglip_loss(x, y, t, c, options).loss,
                    ref_free_siglip),
}


IMPLS = ['dense', 'blockwise', pytest.param('ring', marks=pytest.mark.slow)]


@pytest.mark.parametrize('impl', IMPLS)
@pytest.mark.parametrize('layout', ['single', 'data8'])
@pytest.mark.parametrize('name', FREE_CASES)
def test_free_logits_match_reference(name, layout, impl):
  fn, ref = FREE_CASES[name]
  x, y = _inputs(2)
  loss_fn = _on_layout(lambda a, b, t, c, axis: fn(a, b, t, c, losses.LossOptions(
      axis, impl, block_size=4, transform='arctanh')), layout, 4)
  names = ('x', 'y', 'tau', 'bias') if name == 'siglip_loss' else ('x', 'y', 'tau')
  _assert_matches(loss_fn, ref, (x, y, 1.0, -1.0), names)


def ref_clip_per_direction(a, b, taus):
  return 0.5 * (ref_info_nce(a, b, taus[0]) + ref_info_nce(b, a, taus[1]))


@pytest.mark.parametrize('impl', IMPLS)
@pytest.mark.parametrize('layout', ['single', 'data8'])
def test_clip_per_direction_temperatures_match_reference(layout, impl):
  x, y = _inputs(3)
  loss_fn = _on_layout(lambda a, b, t, axis: losses.clip_loss(
      a, b, t, losses.LossOptions(axis, impl, block_size=4)).loss, layout, 3)
  _assert_matches(loss_fn, ref_clip_per_direction, (x, y, np.array([0.2, 0.5])),
                  ('x', 'y', 'taus'))
  # equal τ both ways is the one-τ loss
  same = jax.jit(loss_fn)(jnp.float32(x), jnp.float32(y), jnp.float32([0.3, 0.3]))
  assert_close(same, ref_clip(x, y, 0.3), rtol=RTOL_VALUE, what='equal taus')


# ---------------------------------------------- per-anchor temperatures ---
# τ per row (the per-example τ modes): row i's logits are s_ij / τ_i.
def ref_info_nce_rows(q, k, taus):
  s = q @ k.T / taus[:, None]
  return np.mean([_lse(s[i]) - s[i, i] for i in range(len(q))])


def ref_clip_rows(a, b, taus):
  return 0.5 * (ref_info_nce_rows(a, b, taus[:, 0]) + ref_info_nce_rows(b, a, taus[:, 1]))


def ref_nt_xent_rows(z1, z2, taus):
  n = len(z1)
  z = np.concatenate([z1, z2])
  s = z @ z.T / np.concatenate([taus[:, 0], taus[:, 1]])[:, None]
  return np.mean([_lse(s[i, [j for j in range(2 * n) if j != i]]) - s[i, (i + n) % (2 * n)]
                  for i in range(2 * n)])


ROW_CASES = {'nt_xent': ref_nt_xent_rows, 'clip_loss': ref_clip_rows,
             'info_nce': lambda q, k, taus: ref_info_nce_rows(q, k, taus[:, 0])}


@pytest.mark.parametrize('impl', IMPLS)
@pytest.mark.parametrize('layout', ['single', 'data8'])
@pytest.mark.parametrize('name', ROW_CASES)
def test_per_anchor_temperatures_match_reference(name, layout, impl):
  x, y = _inputs(4)
  taus = np.random.default_rng(4).uniform(0.1, 0.6, size=(N, 2))
  fn = getattr(losses, name)

  def loss(a, b, t, axis):
    return fn(a, b, t[:, 0] if name == 'info_nce' else t,
              losses.LossOptions(axis, impl, block_size=4)).loss

  if LAYOUTS[layout] is None:
    loss_fn = lambda a, b, t: loss(a, b, t, None)
  else:
    shape, names, axis = LAYOUTS[layout]
    loss_fn = jax.shard_map(lambda a, b, t: loss(a, b, t, axis), mesh=_mesh(shape, names),
                            in_specs=(P(axis),) * 3, out_specs=P())
  _assert_matches(loss_fn, ROW_CASES[name], (x, y, taus), ('x', 'y', 'taus'))
