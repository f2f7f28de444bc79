"""Masks as trained probabilities, against numbers computed by hand: the sampled mask's
straight-through gradient, the Beta-Bernoulli posterior (reset and kept evidence), theta's
quantization and its bits, the start scores, and a sampled layer's pruned elements."""

import math

import numpy as np
import pytest
import tensorflow as tf

from fedmask_tff.masks import masking, probability
from fedmask_tff.masks.layers import MaskedDense


def _sig(x):
  return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def test_sampled_mask_forward_is_a_sample_and_gradient_is_straight_through():
  s = tf.constant([0.0, 2.0, -1.0, 30.0, -30.0])
  seed = tf.constant([1, 2], tf.int64)
  u = tf.random.stateless_uniform([5], seed=seed).numpy()
  with tf.GradientTape() as tape:
    tape.watch(s)
    m = masking.sampled_mask(s, seed)
    loss = tf.reduce_sum(m * tf.constant([1.0, 2.0, 3.0, 4.0, 5.0]))
  np.testing.assert_array_equal(m.numpy(), (u < _sig(s.numpy())).astype(np.float32))
  assert m.numpy()[3] == 1.0 and m.numpy()[4] == 0.0
  by_hand = np.array([1, 2, 3, 4, 5]) * _sig(s.numpy()) * (1 - _sig(s.numpy()))
  np.testing.assert_allclose(tape.gradient(loss, s).numpy(), by_hand, rtol=1e-5, atol=1e-12)


def test_sampled_mask_mean_is_the_probability():
  s = tf.fill([20000], math.log(0.3 / 0.7))
  m = masking.sampled_mask(s, tf.constant([5, 6], tf.int64)).numpy()
  assert abs(m.mean() - 0.3) < 0.015


def test_posterior_reset_every_round_by_hand():
  alpha, beta = np.ones(3), np.ones(3)
  ones, count = np.array([3.0, 0.0, 1.0]), np.array([3.0, 3.0, 1.0])
  a, b = probability.posterior(alpha, beta, ones, count, decay=0.0, prior=1.0, min_shared=2)
  np.testing.assert_allclose(a, [4.0, 1.0, 1.0])  # the third: one client only, unchanged
  np.testing.assert_allclose(b, [1.0, 4.0, 1.0])
  np.testing.assert_allclose(probability.theta(a, b), [0.8, 0.2, 0.5])
  # The next round forgets: the same evidence again gives the same belief, not more.
  a2, b2 = probability.posterior(a, b, ones, count, decay=0.0, prior=1.0, min_shared=2)
  np.testing.assert_allclose(a2, a)
  np.testing.assert_allclose(b2, b)


def test_posterior_keeps_a_share_of_evidence():
  a, b = probability.posterior(np.array([5.0]), np.array([1.0]), np.array([1.0]), np.array([2.0]),
                               decay=0.5, prior=1.0)
  # alpha = 1 + 0.5 * (5 - 1) + 1 = 4, beta = 1 + 0.5 * 0 + 1 = 2
  np.testing.assert_allclose([a[0], b[0]], [4.0, 2.0])
  assert probability.theta(a, b)[0] == pytest.approx(4 / 6)


def test_posterior_tf_equals_numpy():
  rng = np.random.default_rng(0)
  alpha, beta = rng.uniform(1, 5, 50), rng.uniform(1, 5, 50)
  count = rng.integers(0, 5, 50).astype(np.float64)
  ones = np.floor(count * rng.uniform(0, 1, 50))
  want = probability.posterior(alpha, beta, ones, count, 0.3, 1.0, 2)
  got = probability.posterior(*(tf.constant(x) for x in (alpha, beta, ones, count)), 0.3, 1.0, 2)
  for w, g in zip(want, got):
    np.testing.assert_allclose(g.numpy(), w)


@pytest.mark.parametrize("bits,expected", [
    (1, [0, 0, 1, 1, 1]),
    (2, [0, 1 / 3, 2 / 3, 1, 1]),  # 0.2*3=0.6 -> 1; 0.5*3=1.5 -> 2 (half to even); 0.9*3=2.7 -> 3
    (32, [0, 0.2, 0.5, 0.9, 1]),
])
def test_theta_quantization_by_hand(bits, expected):
  values = np.array([0.0, 0.2, 0.5, 0.9, 1.0])
  payload = probability.quantize_theta(values, bits)
  assert 8 * payload.nbytes == (8 * math.ceil(5 * bits / 8) if bits < 32 else 5 * 32)
  np.testing.assert_allclose(probability.dequantize_theta(payload, 5, bits), expected, rtol=1e-6)
  tf_payload = probability.quantize_theta_tf(tf.constant(values, tf.float32), bits).numpy()
  np.testing.assert_array_equal(tf_payload, payload)
  np.testing.assert_allclose(probability.dequantize_theta_tf(tf.constant(payload), 5, bits).numpy(),
                             expected, rtol=1e-6)


def test_theta_bits_and_levels():
  with pytest.raises(ValueError, match="one of"):
    probability.quantize_theta([0.5], 3)
  values = np.linspace(0, 1, 1001)
  for bits in (2, 4, 8):
    back = probability.dequantize_theta(probability.quantize_theta(values, bits), values.size, bits)
    assert np.max(np.abs(back - values)) <= 0.5 / ((1 << bits) - 1) + 1e-7
    assert len(np.unique(back)) == 1 << bits


def test_start_scores_by_hand():
  np.testing.assert_allclose(probability.start_scores(np.array([0.5, 1.0, 0.0, 0.75]), 0.01),
                             [0.0, math.log(99), -math.log(99), math.log(3)], rtol=1e-6)
  np.testing.assert_allclose(probability.start_scores(tf.constant([0.75, 1.0]), 0.01).numpy(),
                             [math.log(3), math.log(99)], rtol=1e-5)


def test_sampled_layer_samples_anew_each_pass_and_keeps_pruned_elements_zero():
  layer = MaskedDense(64, mask_mode="sampled", score_init=0.0, score_init_std=1.0, seed=4)
  x = tf.eye(16)
  layer(x)
  keep = np.zeros((16, 64), np.float32)
  keep[:, :8] = 1.0
  layer.keep.assign(keep)
  layer.scores.assign(tf.fill((16, 64), 0.0))  # sigmoid 0.5: 128 kept elements, each a coin
  w = layer.kernel.numpy()
  y1, y2 = layer(x, training=True).numpy(), layer(x, training=True).numpy()
  assert not np.array_equal(y1, y2)
  np.testing.assert_array_equal(y1[:, 8:], 0.0)  # pruned: zero in every sample
  np.testing.assert_array_equal(y2[:, 8:], 0.0)
  # Inference thresholds: deterministic, the binary mask (sigmoid(0) = 0.5 >= 0.5: on).
  np.testing.assert_array_equal(layer(x).numpy(), w * keep)
  # The seed restarts a stream exactly.
  layer.sample_seed.assign([7, 0])
  a = layer(x, training=True).numpy()
  layer.sample_seed.assign([7, 0])
  np.testing.assert_array_equal(layer(x, training=True).numpy(), a)


def test_sampled_layer_inference_options():
  layer = MaskedDense(4, mask_mode="sampled", inference_mask="expected", score_init=0.0)
  x = tf.eye(3)
  np.testing.assert_allclose(layer(x).numpy(), 0.5 * layer.kernel.numpy(), rtol=1e-6)
  with pytest.raises(ValueError, match="inference_mask"):
    MaskedDense(4, inference_mask="mean")
  with pytest.raises(ValueError, match="score_init_std"):
    MaskedDense(4, score_init_std=-1.0)


def test_fedpm_weight_scale():
  layer = MaskedDense(5, kernel_init="signed_constant_e", seed=1)
  layer(tf.zeros([1, 9]))
  np.testing.assert_allclose(np.abs(layer.kernel.numpy()), math.e / 3.0, rtol=1e-6)
