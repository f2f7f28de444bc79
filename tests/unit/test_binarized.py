"""Tests of the binarized Keras layers (fedmask_tff.models.binarized); plain Keras, no TFF.

Expected outputs and gradients are computed by hand in numpy: the effective
weight is ``sign(latent) * sqrt(2 / fan_in)`` (sign(0) = +1) and the
straight-through gradient of ``sum(outputs)`` with respect to a latent weight
``W[i, j]`` of a dense layer is ``scale * sum_b x[b, i]`` where ``|W[i, j]| <= 1``,
else 0.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import tensorflow as tf

from fedmask_tff.models import binarized, costs, basic
from fedmask_tff.models.binarized import BinaryConv2D, BinaryDense


def _dense(units, latent, activation=None):
  layer = BinaryDense(units, activation=activation)
  layer.build((None, latent.shape[0]))
  layer.kernel.assign(latent)
  return layer


def test_binarize_sign_convention():
  x = tf.constant([-2.0, -0.1, 0.0, 0.3, 5.0])
  np.testing.assert_array_equal(binarized.binarize(x).numpy(), [-1, -1, 1, 1, 1])
  np.testing.assert_array_equal(binarized.sign_bits(x).numpy(), [0, 0, 1, 1, 1])


def test_binary_dense_forward_is_sign_times_scale():
  rng = np.random.default_rng(0)
  latent = rng.uniform(-1, 1, (6, 4)).astype(np.float32)
  latent[0, 0] = 0.0  # sign(0) counts as +1
  x = rng.standard_normal((3, 6)).astype(np.float32)
  layer = _dense(4, latent)
  assert layer.scale == pytest.approx(math.sqrt(2 / 6))
  expected = x @ (np.where(latent >= 0, 1.0, -1.0) * math.sqrt(2 / 6))
  np.testing.assert_allclose(layer(x).numpy(), expected, rtol=1e-5, atol=1e-6)
  relu = _dense(4, latent, activation="relu")
  np.testing.assert_allclose(relu(x).numpy(), np.maximum(expected, 0), rtol=1e-5, atol=1e-6)


def test_binary_conv_forward_matches_numpy_convolution():
  rng = np.random.default_rng(1)
  latent = rng.uniform(-1, 1, (3, 3, 2, 2)).astype(np.float32)
  x = rng.standard_normal((1, 4, 4, 2)).astype(np.float32)
  layer = BinaryConv2D(2, 3, padding="same")
  layer.build((None, 4, 4, 2))
  layer.kernel.assign(latent)
  scale = math.sqrt(2 / (3 * 3 * 2))
  assert layer.scale == pytest.approx(scale)
  w = np.where(latent >= 0, 1.0, -1.0) * scale
  padded = np.pad(x[0], ((1, 1), (1, 1), (0, 0)))
  expected = np.zeros((4, 4, 2))
  for i in range(4):
    for j in range(4):
      for o in range(2):
        expected[i, j, o] = np.sum(padded[i:i + 3, j:j + 3, :] * w[:, :, :, o])
  np.testing.assert_allclose(layer(x).numpy()[0], expected, rtol=1e-5, atol=1e-5)


def test_ste_gradient_is_zero_where_latent_exceeds_one():
  rng = np.random.default_rng(2)
  latent = rng.uniform(-1, 1, (5, 3)).astype(np.float32)
  latent[1, 2], latent[3, 0], latent[4, 1] = 1.5, -2.0, 1.0  # the last is on the edge: passes
  x = rng.standard_normal((4, 5)).astype(np.float32)
  layer = _dense(3, latent)
  with tf.GradientTape() as tape:
    out = tf.reduce_sum(layer(x))
  grad = tape.gradient(out, layer.kernel).numpy()
  expected = np.repeat(x.sum(axis=0)[:, None], 3, axis=1) * math.sqrt(2 / 5)
  expected[np.abs(latent) > 1] = 0.0
  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-6)
  assert grad[1, 2] == 0 and grad[3, 0] == 0 and grad[4, 1] != 0


def test_clip_latent_and_keras_constraint_keep_weights_in_range():
  v = tf.Variable([[-3.0, 0.5], [2.0, -0.2]])
  binarized.clip_latent([v])
  np.testing.assert_array_equal(v.numpy(), np.float32([[-1.0, 0.5], [1.0, -0.2]]))
  # Plain Keras training with a huge step: the kernel constraint clips after each update.
  model = binarized.build_binary_mlp(input_shape=(4, 4, 1), num_classes=2, width=0.05, seed=1)
  model.compile(optimizer=tf.keras.optimizers.SGD(1000.0),
                loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  x = np.random.default_rng(3).random((8, 4, 4, 1)).astype(np.float32)
  model.fit(x, np.arange(8) % 2, batch_size=4, epochs=1, verbose=0)
  assert max(float(np.abs(w.numpy()).max()) for w in model.weights) <= 1.0
  assert any(float(np.abs(w.numpy()).max()) == 1.0 for w in model.weights)


@pytest.mark.parametrize("kind", ["cnn", "mlp"])
def test_builders_match_reference_shapes_names_and_signs(kind):
  binary = binarized.BINARY_MODEL_BUILDERS[kind](width=0.25, seed=7)
  ref = basic.DENSE_MODEL_BUILDERS[kind](width=0.25, seed=7)
  assert [w.name for w in binary.weights] == [w.name for w in ref.weights]
  assert [w.shape for w in binary.weights] == [w.shape for w in ref.weights]
  assert [l.name for l in binarized.binary_layers(binary)] == \
      [l.name for l in ref.layers if l.weights]
  assert not any("bias" in w.name for w in binary.weights)
  for b, r in zip(binary.weights, ref.weights):  # init: the reference's He-normal, clipped
    np.testing.assert_allclose(b.numpy(), np.clip(r.numpy(), -1, 1), rtol=1e-6)
  assert costs.weight_costs(binary) == costs.weight_costs(ref)
  x = np.zeros((2, 28, 28, 1), np.float32)
  assert binary(x).shape == (2, 10)


def test_config_round_trip_and_save_load(tmp_path):
  layer = BinaryDense(5, activation="relu", name="fc")
  clone = BinaryDense.from_config(layer.get_config())
  assert clone.get_config() == layer.get_config()
  conv = BinaryConv2D(4, 3, padding="same", name="c")
  assert BinaryConv2D.from_config(conv.get_config()).get_config() == conv.get_config()

  model = binarized.build_binary_cnn(width=0.25, seed=2)
  rebuilt = tf.keras.Sequential.from_config(model.get_config())
  rebuilt.set_weights(model.get_weights())
  x = np.random.default_rng(4).random((3, 28, 28, 1)).astype(np.float32)
  np.testing.assert_allclose(rebuilt(x).numpy(), model(x).numpy(), rtol=1e-5, atol=1e-6)
  path = os.path.join(tmp_path, "bnn.keras")
  model.save(path)
  loaded = tf.keras.models.load_model(path)
  assert isinstance(loaded.layers[0], BinaryConv2D)
  np.testing.assert_allclose(loaded(x).numpy(), model(x).numpy(), rtol=1e-5, atol=1e-6)
