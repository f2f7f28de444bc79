"""Tests of randomized response (fedmask_tff.wire.ldp): flip rate, unbiased debiasing, accounting."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf

from fedmask_tff.wire import ldp


@pytest.mark.parametrize("epsilon", [0.1, 1.0, 3.0])
def test_flip_rate_matches(epsilon):
  p = math.exp(epsilon) / (1 + math.exp(epsilon))
  assert ldp.keep_probability(epsilon) == pytest.approx(p)
  n = 200_000
  bits = (np.random.default_rng(0).random(n) < 0.3).astype(np.float32)
  for out in (ldp.randomized_response(bits, epsilon, seed=1),
              ldp.randomized_response_tf(tf.constant(bits), epsilon, tf.constant([1, 2])).numpy()):
    assert out.dtype == np.float32 and out.shape == bits.shape
    assert set(np.unique(out)) <= {0.0, 1.0}
    flips = np.mean(out != bits)
    assert abs(flips - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)


def test_seeded_and_shape_kept():
  bits = np.random.default_rng(0).integers(0, 2, (4, 5, 6)).astype(np.uint8)
  a = ldp.randomized_response(bits, 1.0, seed=7)
  assert a.shape == bits.shape and a.dtype == np.uint8
  np.testing.assert_array_equal(a, ldp.randomized_response(bits, 1.0, seed=7))
  b = ldp.randomized_response_tf(tf.constant(bits, tf.float32), 1.0, tf.constant([3, 4]))
  assert b.shape == (4, 5, 6)


@pytest.mark.parametrize("epsilon", [0.5, 2.0])
def test_debiasing_unbiased(epsilon):
  # 2000 elements reported by n = 10 clients each, simulated 400 times.
  rng = np.random.default_rng(0)
  n_clients, n_elements, trials = 10, 2000, 400
  true = (rng.random((n_clients, n_elements)) < rng.random(n_elements)).astype(np.int64)
  true_count = true.sum(0)
  errors = []
  for t in range(trials):
    reports = ldp.randomized_response(true, epsilon, seed=10_000 + t)  # not seed 0: made `true`
    est = ldp.debias_sum(reports.sum(0), n_clients, epsilon)
    errors.append(est - true_count)
  errors = np.array(errors)
  var = ldp.debiased_variance(n_clients, epsilon)
  # Mean error over all elements and trials -> 0 (its std is sqrt(var / (trials * elements))).
  assert abs(errors.mean()) < 5 * math.sqrt(var / errors.size)
  # Per element too, and the variance formula holds.
  assert np.all(np.abs(errors.mean(0)) < 5.5 * math.sqrt(var / trials))
  assert errors.var() == pytest.approx(var, rel=0.05)
  tf_est = ldp.debias_sum_tf(tf.constant(reports.sum(0)), n_clients, epsilon).numpy()
  np.testing.assert_allclose(tf_est, est, rtol=1e-4, atol=1e-3)


def test_infinite_epsilon_is_identity():
  bits = np.random.default_rng(0).integers(0, 2, 1000).astype(np.float32)
  np.testing.assert_array_equal(ldp.randomized_response(bits, math.inf, seed=0), bits)
  np.testing.assert_array_equal(ldp.randomized_response_tf(tf.constant(bits), math.inf,
                                                           tf.constant([0, 0])).numpy(), bits)
  np.testing.assert_allclose(ldp.debias_sum([3.0, 5.0], [4, 9], math.inf), [3.0, 5.0])
  # Very large finite eps: p == 1 in float64, also the identity.
  np.testing.assert_array_equal(ldp.randomized_response(bits, 50.0, seed=0), bits)


@pytest.mark.parametrize("bad", [0, 0.0, -1.0, math.nan, -math.inf, "x", None])
def test_bad_epsilon_raises(bad):
  with pytest.raises(ValueError):
    ldp.randomized_response(np.zeros(3), bad, seed=0)
  with pytest.raises(ValueError):
    ldp.debias_sum(1.0, 2, bad)
  with pytest.raises(ValueError):
    ldp.privacy_spent(bad, 10, 5)
  with pytest.raises(ValueError):
    ldp.randomized_response_tf(tf.zeros(3), bad, tf.constant([0, 0]))


def test_non_binary_input_raises():
  with pytest.raises(ValueError):
    ldp.randomized_response(np.array([0, 2]), 1.0)


def test_privacy_accounting():
  spent = ldp.privacy_spent(0.5, bits_per_round=1000, rounds=20)
  assert spent.per_element_per_round == 0.5
  assert spent.per_element_total == pytest.approx(10.0)
  assert spent.per_report == pytest.approx(500.0)
  assert spent.per_client_total == pytest.approx(10_000.0)
  none = ldp.privacy_spent(math.inf, 1000, 0)
  assert none.per_element_total == 0.0 and none.per_client_total == 0.0
  with pytest.raises(ValueError):
    ldp.privacy_spent(1.0, -1, 3)
