"""kNN and linear probe against hand-computed cases."""

import numpy as np
import pytest

from jaxcl import evaluate


def test_weighted_knn_hand_computed():
  # Bank on the unit circle: two of class 0 near angle 0, one of class 1 at 90 degrees.
  bank = np.array([[1.0, 0.0], [np.cos(0.3), np.sin(0.3)], [0.0, 1.0]], np.float32)
  labels = np.array([0, 0, 1])
  # Query at 60 degrees: cosines 0.5 (class 0), cos(0.747) = 0.7336 (class 0), 0.866 (class 1).
  query = np.array([[np.cos(np.pi / 3), np.sin(np.pi / 3)]], np.float32)
  # k=1: the nearest is class 1.
  assert evaluate.knn_top1(bank, labels, query, np.array([1]), 2, k=1) == 1.0
  # k=3, T=1: class 0 gets e^0.5 + e^0.7336 = 3.731, class 1 e^0.866 = 2.377 -> class 0.
  assert evaluate.knn_top1(bank, labels, query, np.array([0]), 2, k=3, temperature=1.0) == 1.0
  # k=3, T=0.07: weights sharpen, e^(0.866/0.07) dominates -> class 1.
  assert evaluate.knn_top1(bank, labels, query, np.array([1]), 2, k=3, temperature=0.07) == 1.0


def test_knn_counts_over_chunks():
  rng = np.random.default_rng(0)
  bank = rng.normal(size=(50, 4)).astype(np.float32)
  labels = rng.integers(0, 3, 50)
  # Each query is a bank point: with k=1 it finds itself, so accuracy counts exact labels.
  queries, truth = bank[:23], labels[:23].copy()
  truth[:5] = (truth[:5] + 1) % 3  # five wrong on purpose
  assert evaluate.knn_top1(bank, labels, queries, truth, 3, k=1, chunk=8) == pytest.approx(18 / 23)


def test_linear_probe_separates_separable_classes():
  rng = np.random.default_rng(1)
  centers = np.eye(4, 8) * 6
  y_train, y_test = rng.integers(0, 4, 200), rng.integers(0, 4, 100)
  x_train = centers[y_train] + rng.normal(size=(200, 8))
  x_test = centers[y_test] + rng.normal(size=(100, 8))
  assert evaluate.linear_probe_top1(x_train, y_train, x_test, y_test, 4, steps=300) == 1.0
  # Minibatch path gives the same answer on this easy case.
  assert evaluate.linear_probe_top1(x_train, y_train, x_test, y_test, 4, steps=300,
                                    batch_size=32) == 1.0
  # Shuffled labels: no better than chance on the test points.
  acc = evaluate.linear_probe_top1(x_train, rng.permutation(y_train), x_test, y_test, 4,
                                   steps=300)
  assert acc < 0.5
