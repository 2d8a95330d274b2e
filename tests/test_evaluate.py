"""kNN and linear probe against hand-computed cases."""

import numpy as np
import pytest

from jaxcl.evaluation import probes


def test_weighted_knn_hand_computed():
  # Bank on the unit circle: two of class 0 near angle 0, one of class 1 at 90 degrees.
  bank = np.array([[1.0, 0.0], [np.cos(0.3), np.sin(0.3)], [0.0, 1.0]], np.float32)
  labels = np.array([0, 0, 1])
  # Query at 60 degrees: cosines 0.5 (class 0), cos(0.747) = 0.7336 (class 0), 0.866 (class 1).
  query = np.array([[np.cos(np.pi / 3), np.sin(np.pi / 3)]], np.float32)
  # k=1: the nearest is class 1.
  assert probes.knn_top1(bank, labels, query, np.array([1]), 2, k=1) == 1.0
  # k=3, T=1: class 0 gets e^0.5 + e^0.7336 = 3.731, class 1 e^0.866 = 2.377 -> class 0.
  assert probes.knn_top1(bank, labels, query, np.array([0]), 2, k=3, temperature=1.0) == 1.0
  # k=3, T=0.07: weights sharpen, e^(0.866/0.07) dominates -> class 1.
  assert probes.knn_top1(bank, labels, query, np.array([1]), 2, k=3, temperature=0.07) == 1.0


def test_knn_counts_over_chunks():
  rng = np.random.default_rng(0)
  bank = rng.normal(size=(50, 4)).astype(np.float32)
  labels = rng.integers(0, 3, 50)
  # Each query is a bank point: with k=1 it finds itself, so accuracy counts exact labels.
  queries, truth = bank[:23], labels[:23].copy()
  truth[:5] = (truth[:5] + 1) % 3  # five wrong on purpose
  assert probes.knn_top1(bank, labels, queries, truth, 3, k=1, chunk=8) == pytest.approx(18 / 23)


def test_linear_probe_separates_separable_classes():
  rng = np.random.default_rng(1)
  centers = np.eye(4, 8) * 6
  y_train, y_test = rng.integers(0, 4, 200), rng.integers(0, 4, 100)
  x_train = centers[y_train] + rng.normal(size=(200, 8))
  x_test = centers[y_test] + rng.normal(size=(100, 8))
  assert probes.linear_probe_top1(x_train, y_train, x_test, y_test, 4, steps=300) == 1.0
  # Minibatch path gives the same answer on this easy case.
  assert probes.linear_probe_top1(x_train, y_train, x_test, y_test, 4, steps=300,
                                    batch_size=32) == 1.0
  # Shuffled labels: no better than chance on the test points.
  acc = probes.linear_probe_top1(x_train, rng.permutation(y_train), x_test, y_test, 4,
                                   steps=300)
  assert acc < 0.5


# -------------------------------------------- tolerance, uniformity, calibration ---
def test_tolerance_and_uniformity_hand_computed():
  # three unit vectors: two of class 0 at 60 degrees, one unlabeled at 90 degrees from both
  # (not unit: normalized)
  z = np.array([[1.0, 0.0, 0.0], [0.5, np.sqrt(3) / 2, 0.0], [0.0, 0.0, 2.0]])
  labels = np.array([0, 0, -1])
  out = probes.tolerance_uniformity(z, labels)
  assert out['tolerance'] == pytest.approx(0.5)  # cos 60°, the one same-class pair (both orders)
  # squared distances: 2 - 2cos: pair (0,1) -> 1, pairs with 2 -> 2; six ordered pairs
  expected = np.log((2 * np.exp(-2.0) + 4 * np.exp(-4.0)) / 6)
  assert out['test_uniformity'] == pytest.approx(expected, rel=1e-12)
  assert 'tolerance' not in probes.tolerance_uniformity(z, np.array([0, 1, 2]))


def test_tolerance_uniformity_subsamples_large_sets():
  rng = np.random.default_rng(0)
  z = rng.normal(size=(300, 8))
  labels = rng.integers(0, 3, 300)
  full = probes.tolerance_uniformity(z, labels)
  part = probes.tolerance_uniformity(z, labels, max_rows=200)
  assert part != full and part['tolerance'] == pytest.approx(full['tolerance'], abs=0.03)


def test_expected_calibration_error_hand_computed():
  probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.55, 0.45]])
  labels = np.array([0, 1, 1, 0])
  # bins of width 1/15: 0.9 and 0.8 fall in different bins (13, 12), 0.7 in 10, 0.55 in 8;
  # each bin one prediction: |correct - confidence| = 0.1, 0.8, 0.3, 0.45
  assert probes.expected_calibration_error(probs, labels) == pytest.approx(
      (0.1 + 0.8 + 0.3 + 0.45) / 4)
  # two bins: [0, 0.5) and [0.5, 1]: all four in the upper bin, accuracy 3/4, confidence 0.7375
  assert probes.expected_calibration_error(probs, labels, bins=2) == pytest.approx(
      abs(0.75 - (0.9 + 0.8 + 0.7 + 0.55) / 4))


def test_fit_temperature_recovers_the_generating_one():
  rng = np.random.default_rng(0)
  sims = rng.uniform(-1, 1, (20000, 10))
  for tau in (0.05, 0.3):
    p = np.exp(sims / tau)
    p /= p.sum(1, keepdims=True)
    labels = np.array([rng.choice(10, p=row) for row in p])
    assert probes.fit_temperature(sims, labels) == pytest.approx(tau, rel=0.05)


def test_zeroshot_calibration_fits_on_half_and_scores_the_other():
  rng = np.random.default_rng(1)
  classifier = np.eye(4)
  images = rng.normal(size=(400, 4)) + 2 * np.eye(4)[rng.integers(0, 4, 400)]
  images /= np.linalg.norm(images, axis=1, keepdims=True)
  labels = np.argmax(images, axis=1)
  out = probes.zeroshot_calibration(images, labels, classifier, temperature=0.05)
  sims = images @ classifier.T

  def softmax(logits):
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)

  assert out['zeroshot_ece'] == probes.expected_calibration_error(softmax(sims / 0.05), labels)
  fitted = probes.fit_temperature(sims[0::2], labels[0::2])
  assert out['zeroshot_fitted_temperature'] == fitted
  assert out['zeroshot_ece_fitted'] == probes.expected_calibration_error(
      softmax(sims[1::2] / fitted), labels[1::2])
  assert out['zeroshot_ece_fitted'] < out['zeroshot_ece']  # τ 0.05 is overconfident here
