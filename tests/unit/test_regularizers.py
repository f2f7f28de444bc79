"""Tests of the group-lasso mask penalty (fedmask_tff.masks.regularizers); plain Keras, no TFF.

Expected values are computed by hand in numpy: ``sum_g sqrt(|g|) * ||M_g||_2``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf

from fedmask_tff.masks import regularizers as R
from fedmask_tff.masks.layers import MaskedConv2D, MaskedDense
from fedmask_tff.masks.lstm import MaskedLSTM


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def test_dense_group_lasso_by_hand():
  m = np.array([[0.5, 0.2], [0.0, 0.0], [0.3, 0.4]], np.float32)
  rows = math.sqrt(2) * (math.sqrt(0.25 + 0.04) + 0.0 + 0.5)
  cols = math.sqrt(3) * (math.sqrt(0.25 + 0.09) + math.sqrt(0.04 + 0.16))
  assert float(R.group_lasso(m, "dense")) == pytest.approx(rows + cols, rel=1e-6)
  assert float(R.group_lasso(m, "dense", groups=("in",))) == pytest.approx(rows, rel=1e-6)
  assert float(R.group_lasso(m, "dense", groups=("out",))) == pytest.approx(cols, rel=1e-6)
  assert float(R.group_lasso(m, "auto")) == pytest.approx(rows + cols, rel=1e-6)
  # A group of p equal values c costs c * p (the sqrt(|g|) weighting).
  assert float(R.group_lasso(np.full((4, 5), 0.5, np.float32), "dense")) == pytest.approx(
      0.5 * 20 * 2, rel=1e-6)


def test_conv_group_lasso_by_hand():
  m = np.random.default_rng(0).uniform(0, 1, (2, 2, 3, 4)).astype(np.float32)
  out = math.sqrt(2 * 2 * 3) * sum(np.linalg.norm(m[..., j]) for j in range(4))
  inp = math.sqrt(2 * 2 * 4) * sum(np.linalg.norm(m[:, :, i, :]) for i in range(3))
  assert float(R.group_lasso(m, "conv")) == pytest.approx(out, rel=1e-5)
  assert float(R.group_lasso(m, "auto")) == pytest.approx(out, rel=1e-5)
  assert float(R.group_lasso(m, "conv", groups=("out", "in"))) == pytest.approx(out + inp,
                                                                                 rel=1e-5)


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match="kind"):
    R.group_lasso(np.ones((2, 2), np.float32), "lstm")
  with pytest.raises(ValueError, match="rank"):
    R.group_lasso(np.ones((2, 2), np.float32), "conv")
  with pytest.raises(ValueError, match="rank"):
    R.group_lasso(np.ones((2, 2, 2), np.float32), "auto")
  with pytest.raises(ValueError, match="groups"):
    R.group_lasso(np.ones((2, 2), np.float32), "dense", groups=("rows",))
  with pytest.raises(ValueError, match="groups"):
    R.group_lasso(np.ones((2, 2), np.float32), "dense", groups=())


def _numeric_grad(f, s, eps=1e-6):
  grad = np.zeros_like(s)
  for idx in np.ndindex(s.shape):
    plus, minus = s.copy(), s.copy()
    plus[idx] += eps
    minus[idx] -= eps
    grad[idx] = (f(plus) - f(minus)) / (2 * eps)
  return grad


@pytest.mark.parametrize("shape,kind,groups", [((3, 4), "dense", None),
                                               ((2, 2, 2, 3), "conv", ("out", "in"))])
def test_gradient_matches_finite_differences(shape, kind, groups):
  rng = np.random.default_rng(1)
  s = rng.normal(0, 1, shape)
  keep = np.ones(shape)
  keep[1] = 0.0  # a whole group (row / kernel row) pruned: its norm is 0, gradient must stay finite

  def f(scores):
    return float(R.group_lasso(tf.constant(_sigmoid(scores) * keep), kind, groups))

  var = tf.Variable(s)
  with tf.GradientTape() as tape:
    value = R.group_lasso(R.soft_mask_values(var, tf.constant(keep)), kind, groups)
  grad = tape.gradient(value, var).numpy()
  assert np.all(np.isfinite(grad))
  np.testing.assert_allclose(grad, _numeric_grad(f, s), rtol=1e-5, atol=1e-7)
  assert np.all(grad[1] == 0.0)
  if kind == "dense":  # closed form: sigma' * keep * (sqrt(n_out) M/||row|| + sqrt(n_in) M/||col||)
    m = _sigmoid(s) * keep
    rows = np.linalg.norm(m, axis=1, keepdims=True)
    cols = np.linalg.norm(m, axis=0, keepdims=True)
    by_row = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
    expected = _sigmoid(s) * (1 - _sigmoid(s)) * keep * (
        math.sqrt(shape[1]) * by_row + math.sqrt(shape[0]) * m / cols)
    np.testing.assert_allclose(grad, expected, rtol=1e-10)


def test_all_zero_mask_has_zero_penalty_and_gradient():
  var = tf.Variable(np.zeros((3, 3), np.float32))
  with tf.GradientTape() as tape:
    value = R.group_lasso(var * 0.0, "dense")
  assert float(value) == 0.0
  np.testing.assert_array_equal(tape.gradient(value, var).numpy(), 0.0)


def _small_masked_model():
  return tf.keras.Sequential([
      tf.keras.Input((6, 6, 2)),
      MaskedConv2D(3, 3, activation="relu", seed=0, score_init=0.3),
      tf.keras.layers.Reshape((6, 18)),
      MaskedLSTM(4, seed=1000, score_init=-0.2),
      MaskedDense(5, seed=2000, score_init=0.1),
  ])


def test_structured_penalty_sums_over_masked_weights():
  model = _small_masked_model()
  conv, lstm, dense = model.layers[0], model.layers[2].cell, model.layers[3]
  dense.keep.assign(np.concatenate([np.zeros((4, 2)), np.ones((4, 3))], 1).astype(np.float32))
  expected, elements = 0.0, 0
  for layer in (conv, lstm, dense):
    for _, kernel, scores, keep in layer.masked_weights:
      m = _sigmoid(scores.numpy()) * keep.numpy()
      expected += float(R.group_lasso(m, "auto"))
      elements += m.size
  assert elements == 3 * 3 * 2 * 3 + 18 * 16 + 4 * 16 + 4 * 5
  assert float(R.structured_penalty(model)) == pytest.approx(expected, rel=1e-5)
  assert float(R.structured_penalty(model, normalize=True)) == pytest.approx(expected / elements,
                                                                             rel=1e-5)
  with_inputs = float(R.structured_penalty(model, conv_groups=("out", "in")))
  assert with_inputs > expected
  with tf.GradientTape() as tape:
    penalty = R.structured_penalty(model)
  grads = tape.gradient(penalty, model.trainable_variables)
  assert len(grads) == 4 and all(g is not None for g in grads)
  assert all(np.all(g.numpy() >= 0) for g in grads)  # the penalty only pushes scores down
  plain = tf.keras.Sequential([tf.keras.Input((3,)), tf.keras.layers.Dense(2)])
  with pytest.raises(ValueError, match="no masked weights"):
    R.structured_penalty(plain)


def test_zero_groups_by_hand():
  mask = np.array([[1, 0, 0], [0, 0, 0], [1, 0, 1], [0, 0, 0]], np.float32)
  assert R.zero_groups(mask, "dense") == {"in": (2, 4), "out": (1, 3)}
  conv = np.ones((3, 3, 2, 4), np.float32)
  conv[..., 1] = 0.0
  conv[..., 3] = 0.0
  assert R.zero_groups(conv, "conv") == {"out": (2, 4)}
  assert R.zero_groups(conv, "conv", ("out", "in")) == {"out": (2, 4), "in": (0, 2)}
  model = _small_masked_model()
  stats = R.model_zero_groups(model)
  # The LSTM's scores start at -0.2 (binary mask all zero): all its groups are zero.
  lstm_keys = [k for k in stats if "/cell/" in k]
  assert len(lstm_keys) == 2
  assert all(z == n for k in lstm_keys for z, n in stats[k].values())
  assert stats["total"] == (18 + 16 + 4 + 16, 3 + 18 + 16 + 4 + 16 + 4 + 5)


def test_penalty_zeroes_more_whole_groups_on_a_toy_task():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((64, 10)).astype(np.float32)
  y = (x[:, 0] + x[:, 1] > 0).astype(np.int32)  # only 2 of the 10 inputs matter

  def train(lam, steps=100):
    model = tf.keras.Sequential([tf.keras.Input((10,)),
                                 MaskedDense(16, activation="relu", seed=0),
                                 MaskedDense(2, seed=1000)])
    scores = model.trainable_variables
    opt = tf.keras.optimizers.SGD(1.0)

    @tf.function
    def step():
      with tf.GradientTape() as tape:
        logits = model(x, training=True)
        loss = tf.reduce_mean(tf.keras.losses.sparse_categorical_crossentropy(
            y, logits, from_logits=True))
        loss += lam * R.structured_penalty(model, normalize=True)
      opt.apply_gradients(zip(tape.gradient(loss, scores), scores))

    for _ in range(steps):
      step()
    accuracy = float(np.mean(np.argmax(model(x).numpy(), 1) == y))
    return R.model_zero_groups(model)["total"], accuracy

  (zeros_plain, groups), acc_plain = train(0.0)
  (zeros_lasso, _), acc_lasso = train(1.0)
  assert groups == 10 + 16 + 16 + 2
  assert zeros_lasso >= zeros_plain + 10, (zeros_plain, zeros_lasso)
  assert acc_plain >= 0.9 and acc_lasso >= 0.9, (acc_plain, acc_lasso)
