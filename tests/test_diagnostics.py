"""The step's temperature diagnostics against float64 NumPy on small batches."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from helpers import assert_close
from jaxcl import losses


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _reference(q, k, tau):
  """info_nce's diagnostics in float64: row i's positive is column i."""
  logits = q @ k.T / tau
  lse = np.log(np.sum(np.exp(logits), axis=1))
  p = np.exp(logits - lse[:, None])
  n = len(q)
  p_pos = p[np.arange(n), np.arange(n)]
  negatives = np.where(np.eye(n, dtype=bool), -np.inf, logits)
  entropy = np.mean(-np.sum(p * np.log(p), axis=1))
  beaten = np.sum(negatives >= np.diag(logits)[:, None], axis=1)
  return {'positive_prob': np.mean(p_pos), 'entropy': entropy,
          'effective_negatives': np.exp(entropy),
          'hardest_negative_share': np.mean(np.max(np.exp(negatives - lse[:, None]), axis=1)
                                            / (1 - p_pos)),
          'contrastive_top1': np.mean(beaten < 1), 'contrastive_top5': np.mean(beaten < 5)}


@pytest.mark.parametrize('impl', ['dense', 'blockwise'])
def test_diagnostics_match_numpy(impl):
  rng = np.random.default_rng(0)
  q, k = _unit(rng.normal(size=(12, 6))), _unit(rng.normal(size=(12, 6)))
  got = losses.info_nce(jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32), 0.3,
                        losses.LossOptions(impl=impl, block_size=5)).metrics
  want = _reference(q, k, 0.3)
  # float32 sums of 12 terms per row against float64 (tests/helpers.py:
  # assert_close); measured worst on 2 x86 cores: 1.3e-7.
  assert_close({key: got[key] for key in want}, want, rtol=2e-6, what='diagnostics')


def test_clear_positive_by_hand():
  # Two pairs on orthogonal axes, τ = 0.1: each anchor's positive has logit
  # 10, its single negative 0. p(pos) = e^10 / (e^10 + 1); the one negative
  # carries all of the negatives' weight (share 1).
  q = jnp.array([[1.0, 0.0], [0.0, 1.0]])
  m = losses.info_nce(q, q, 0.1).metrics
  p_pos = np.exp(10) / (np.exp(10) + 1)
  # float32 holds log-sum-exp = 10.0000454 to 4.8e-7: p = exp(10 - lse) to
  # about that, relative (measured 3.8e-7).
  assert float(m['positive_prob']) == pytest.approx(p_pos, rel=2e-6)
  entropy = -(p_pos * np.log(p_pos) + (1 - p_pos) * np.log(1 - p_pos))
  # H = 5.0e-4 comes from log(1 + e^-10), and float32 rounds 1 + e^-10 by up
  # to 6e-8: 1.2e-4 of H (measured 3.8e-5).
  assert float(m['entropy']) == pytest.approx(entropy, rel=3e-4)
  assert float(m['hardest_negative_share']) == pytest.approx(1.0, rel=1e-5)
  assert float(m['contrastive_top1']) == 1.0
  # Anchor 0 of four: positive logit 10, negatives at 0, 0 and -10: the hardest
  # negative carries 1 / (2 + e^-10) of the negatives' weight.
  q4 = jnp.array([[1.0, 0.0]] * 4)
  k4 = jnp.array([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0], [-1.0, 0.0]])
  logits = np.array([[10.0, 0, 0, -10]] * 4)  # the same for every row
  shares = []
  for i in range(4):
    p = np.exp(logits[i] - np.log(np.sum(np.exp(logits[i]))))
    negatives = np.delete(p, i)
    shares.append(negatives.max() / negatives.sum())
  assert shares[0] == pytest.approx(1 / (2 + np.exp(-10)))
  m4 = losses.info_nce(q4, k4, 0.1).metrics
  assert float(m4['hardest_negative_share']) == pytest.approx(np.mean(shares), rel=1e-5)


def test_alignment_and_uniformity_match_numpy():
  rng = np.random.default_rng(1)
  a, b = _unit(rng.normal(size=(8, 5))), _unit(rng.normal(size=(8, 5)))
  got = losses.alignment_uniformity(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
  assert float(got['alignment']) == pytest.approx(np.mean(np.sum((a - b) ** 2, axis=1)),
                                                  rel=1e-5)
  z = np.concatenate([a, b])
  sq = np.sum((z[:, None] - z[None]) ** 2, axis=-1)
  off = ~np.eye(16, dtype=bool)
  assert float(got['uniformity']) == pytest.approx(np.log(np.mean(np.exp(-2 * sq[off]))),
                                                   rel=1e-5)


def test_uniformity_of_a_large_batch_uses_its_first_rows(monkeypatch):
  """Past UNIFORMITY_ROWS rows per device, uniformity is estimated on the
  first ones (memory bounded whatever the batch); alignment uses them all."""
  monkeypatch.setattr(losses.contrastive, 'UNIFORMITY_ROWS', 3)
  rng = np.random.default_rng(4)
  a, b = _unit(rng.normal(size=(10, 5))), _unit(rng.normal(size=(10, 5)))
  got = losses.alignment_uniformity(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
  assert float(got['alignment']) == pytest.approx(np.mean(np.sum((a - b) ** 2, axis=1)),
                                                  rel=1e-5)
  z = np.concatenate([a[:3], b[:3]])
  sq = np.sum((z[:, None] - z[None]) ** 2, axis=-1)
  off = ~np.eye(6, dtype=bool)
  assert float(got['uniformity']) == pytest.approx(np.log(np.mean(np.exp(-2 * sq[off]))),
                                                   rel=1e-5)


def test_sharded_uniformity_is_the_mean_of_the_shards():
  rng = np.random.default_rng(2)
  a, b = (jnp.asarray(_unit(rng.normal(size=(16, 4))), jnp.float32) for _ in range(2))
  mesh = jax.make_mesh((8,), ('data',), axis_types=(AxisType.Auto,), devices=jax.devices()[:8])
  sharded = jax.shard_map(functools.partial(losses.alignment_uniformity, axis_name='data'),
                          mesh=mesh, in_specs=(P('data'), P('data')), out_specs=P())(a, b)
  shards = [losses.alignment_uniformity(a[i:i + 2], b[i:i + 2]) for i in range(0, 16, 2)]
  whole = losses.alignment_uniformity(a, b)
  assert float(sharded['alignment']) == pytest.approx(float(whole['alignment']), rel=1e-5)
  assert float(sharded['uniformity']) == pytest.approx(
      np.mean([float(s['uniformity']) for s in shards]), rel=1e-5)
