"""Tests of one-shot pruning (fedmask_tff.masks.pruning) and of the score restart rule
(fedmask_tff.masks.masking.scores_from_mask_values)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf

from fedmask_tff.masks import masking, pruning
from fedmask_tff.masks.masking import scores_from_mask_values

LOGIT_099 = math.log(0.99 / 0.01)  # 4.59511985...


# ------------------------------------------------------------ top magnitude ---

def test_top_magnitude_hand_case_with_tie():
  kernel = tf.constant([[1.0, -2.0], [3.0, 0.5]])
  scores = tf.constant([[1.0, 1.0], [-1.0, 4.0]])
  # |W * s| = [[1, 2], [3, 2]]; k = round(0.5 * 4) = 2: the 3 (flat index 2) and,
  # of the two 2s (flat indices 1 and 3), the lower index 1.
  keep = pruning.top_magnitude_keep(kernel, scores, 0.5)
  assert keep.dtype == tf.float32 and keep.shape == (2, 2)
  np.testing.assert_array_equal(keep.numpy(), [[0, 1], [1, 0]])


def test_top_magnitude_hand_cases():
  kernel = tf.constant([0.5, -1.0, 2.0, -0.25, 1.0])
  scores = tf.constant([2.0, 0.1, -0.3, 8.0, -1.5])
  # |W * s| = [1.0, 0.1, 0.6, 2.0, 1.5]
  np.testing.assert_array_equal(pruning.top_magnitude_keep(kernel, scores, 0.2).numpy(),
                                [0, 0, 0, 1, 0])  # k = 1
  np.testing.assert_array_equal(pruning.top_magnitude_keep(kernel, scores, 0.4).numpy(),
                                [0, 0, 0, 1, 1])  # k = 2
  np.testing.assert_array_equal(pruning.top_magnitude_keep(kernel, scores, 0.6).numpy(),
                                [1, 0, 0, 1, 1])  # k = 3
  np.testing.assert_array_equal(pruning.top_magnitude_keep(kernel, scores, 0.8).numpy(),
                                [1, 0, 1, 1, 1])  # k = 4
  # A tiny rate still keeps one element.
  np.testing.assert_array_equal(pruning.top_magnitude_keep(kernel, scores, 0.01).numpy(),
                                [0, 0, 0, 1, 0])


def test_all_ties_keep_lowest_indices():
  # Signed-constant kernels with equal scores: every magnitude is equal.
  kernel = tf.constant([[-0.5, 0.5, 0.5], [0.5, -0.5, 0.5]])
  scores = tf.fill([2, 3], 0.05)
  np.testing.assert_array_equal(pruning.top_magnitude_keep(kernel, scores, 0.5).numpy(),
                                [[1, 1, 1], [0, 0, 0]])
  np.testing.assert_array_equal(pruning.top_magnitude_keep(kernel, scores, 0.34).numpy(),
                                [[1, 1, 0], [0, 0, 0]])


@pytest.mark.parametrize("n,rate,expected", [
    (4, 0.5, 2), (10, 0.2, 2), (10, 0.26, 3), (10, 0.24, 2), (3, 0.1, 1), (1, 0.2, 1),
    (1000, 0.2, 200), (1000, 0.0004, 1), (1000, 0.0006, 1), (1000, 0.0016, 2), (7, 1.0, 7),
    (45, 0.2, 9), (401408, 0.2, 80282),
])
def test_kept_count(n, rate, expected):
  assert pruning.kept_count(n, rate) == expected


@pytest.mark.parametrize("shape", [(10,), (6, 7), (3, 3, 2, 4), (1, 1)])
@pytest.mark.parametrize("rate", [0.05, 0.2, 0.5, 0.9, 1.0])
def test_keeps_exactly_k_of_the_largest(shape, rate):
  rng = np.random.default_rng(sum(shape) + int(100 * rate))
  kernel = rng.standard_normal(shape).astype(np.float32)
  scores = rng.standard_normal(shape).astype(np.float32)
  keep = pruning.top_magnitude_keep(tf.constant(kernel), tf.constant(scores), rate).numpy()
  n = int(np.prod(shape))
  k = max(1, round(rate * n))
  assert keep.shape == shape
  assert set(np.unique(keep)) <= {0.0, 1.0}
  assert int(keep.sum()) == k == pruning.kept_count(n, rate)
  magnitude = np.abs(kernel * scores)
  if k < n:
    assert magnitude[keep == 1].min() >= magnitude[keep == 0].max()
  # Same as sorting in numpy (stable sort: ties toward the lower index).
  order = np.argsort(-magnitude.reshape(-1), kind="stable")
  expected = np.zeros(n, np.float32)
  expected[order[:k]] = 1
  np.testing.assert_array_equal(keep.reshape(-1), expected)


def test_prune_rate_one_keeps_all():
  kernel = tf.constant([[0.0, -1.0], [2.0, 0.0]])
  scores = tf.constant([[5.0, 0.0], [-1.0, 3.0]])  # magnitudes with zeros
  np.testing.assert_array_equal(pruning.top_magnitude_keep(kernel, scores, 1.0).numpy(),
                                np.ones((2, 2)))


def test_works_in_tf_function():
  kernel = tf.constant([[1.0, -2.0], [3.0, 0.5]])

  @tf.function
  def f(scores):
    return pruning.top_magnitude_keep(kernel, scores, 0.5)

  np.testing.assert_array_equal(f(tf.constant([[1.0, 1.0], [-1.0, 4.0]])).numpy(), [[0, 1], [1, 0]])
  np.testing.assert_array_equal(f(tf.constant([[9.0, 1.0], [-1.0, 4.0]])).numpy(), [[1, 0], [1, 0]])


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, 1.0000001, float("nan"), float("inf")])
def test_invalid_prune_rate(bad):
  with pytest.raises(ValueError, match="prune_rate"):
    pruning.check_prune_rate(bad)
  with pytest.raises(ValueError, match="prune_rate"):
    pruning.kept_count(10, bad)
  with pytest.raises(ValueError, match="prune_rate"):
    pruning.top_magnitude_keep(tf.ones([2, 2]), tf.ones([2, 2]), bad)


def test_check_prune_rate_returns_float():
  assert pruning.check_prune_rate(1) == 1.0 and isinstance(pruning.check_prune_rate(1), float)
  assert pruning.check_prune_rate("0.25") == 0.25


# ----------------------------------------------------- scores from values ---

def test_scaled_logit_hand_values():
  v = np.array([1.0, 0.5, 0.0, 0.75, 0.25, 0.995, 0.001])
  expected = np.array([0.1 * LOGIT_099,       # clipped to 0.99: 0.4595...
                       0.0,
                       -0.1 * LOGIT_099,      # clipped to 0.01
                       0.1 * math.log(3.0),   # 3-of-4 vote: 0.1099
                       -0.1 * math.log(3.0),
                       0.1 * LOGIT_099,       # above 1 - eps: clipped
                       -0.1 * LOGIT_099])
  out = scores_from_mask_values(v)
  assert isinstance(out, np.ndarray)
  np.testing.assert_allclose(out, expected, rtol=0, atol=1e-12)
  np.testing.assert_allclose(out[:4], [0.45951199, 0.0, -0.45951199, 0.10986123], atol=1e-7)
  # The docstring's numbers: a unanimous 1 restarts at sigmoid 0.61.
  assert abs(1 / (1 + math.exp(-out[0])) - 0.613) < 1e-3


def test_scaled_logit_other_scale_and_eps():
  out = scores_from_mask_values(np.array([1.0, 0.0, 0.9]), scale=0.5, eps=0.1)
  np.testing.assert_allclose(out, [0.5 * math.log(9), -0.5 * math.log(9), 0.5 * math.log(9)],
                             atol=1e-12)


def test_linear_hand_values():
  v = np.array([1.0, 0.5, 0.0, 0.75, 2 / 3])
  out = scores_from_mask_values(v, rule="linear")
  np.testing.assert_allclose(out, [0.2, 0.0, -0.2, 0.1, 0.4 / 6], rtol=0, atol=1e-12)
  np.testing.assert_allclose(scores_from_mask_values(v, rule="linear", scale=0.25),
                             [0.5, 0.0, -0.5, 0.25, 1 / 6], rtol=0, atol=1e-12)


def test_rules_agree_near_threshold():
  v = np.array([0.49, 0.5, 0.51])
  a = scores_from_mask_values(v, "scaled_logit")
  b = scores_from_mask_values(v, "linear")
  np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("rule", ["scaled_logit", "linear"])
def test_sign_matches_vote(rule):
  v = np.linspace(0, 1, 101)
  out = scores_from_mask_values(v, rule)
  np.testing.assert_array_equal(out >= 0, v >= 0.5)
  # And the binary mask of the restarted scores is the vote's decision.
  m = masking.binary_mask(tf.constant(out, tf.float32)).numpy()
  np.testing.assert_array_equal(m, (v >= 0.5).astype(np.float32))
  # Monotone (non-decreasing; flat only where clipped).
  assert np.all(np.diff(out) >= 0)


@pytest.mark.parametrize("rule", ["scaled_logit", "linear"])
def test_other_threshold(rule):
  tau = 0.3
  v = np.array([0.0, 0.1, 0.29, 0.31, 0.6, 1.0])
  out = scores_from_mask_values(v, rule, threshold=tau)
  np.testing.assert_allclose(scores_from_mask_values(np.array([tau]), rule, threshold=tau),
                             [math.log(tau / (1 - tau))], atol=1e-12)
  m = masking.binary_mask(tf.constant(out, tf.float32), tau).numpy()
  np.testing.assert_array_equal(m, (v >= tau).astype(np.float32))


@pytest.mark.parametrize("rule", ["scaled_logit", "linear"])
def test_numpy_and_tf_same_numbers(rule):
  v = np.array([[0.0, 0.25, 1 / 3], [0.5, 2 / 3, 1.0]], np.float32)
  out_np = scores_from_mask_values(v, rule)
  out_tf = scores_from_mask_values(tf.constant(v), rule)
  assert isinstance(out_tf, tf.Tensor) and out_tf.dtype == tf.float32
  np.testing.assert_allclose(out_tf.numpy(), out_np, rtol=1e-6, atol=1e-6)
  out_var = scores_from_mask_values(tf.Variable(v), rule)
  np.testing.assert_allclose(np.asarray(out_var), out_np, rtol=1e-6, atol=1e-6)
  # Also inside a tf.function.
  f = tf.function(lambda x: scores_from_mask_values(x, rule))
  np.testing.assert_allclose(f(tf.constant(v)).numpy(), out_np, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    (dict(rule="logit"), "restart rule"),
    (dict(rule=""), "restart rule"),
    (dict(scale=0.0), "scale"),
    (dict(scale=-1.0), "scale"),
    (dict(eps=0.0), "eps"),
    (dict(eps=0.5), "eps"),
])
def test_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    scores_from_mask_values(np.array([0.5]), **kwargs)
