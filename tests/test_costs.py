"""FLOP counts from layer shapes, checked against numbers worked out by hand."""

import tensorflow as tf

from fedmask_tff import costs, models
from fedmask_tff.layers import MaskedConv2D, MaskedDense
from fedmask_tff.lstm import MaskedLSTM


def test_cnn_forward_flops_by_hand():
  model = models.build_cnn()
  conv1 = 2 * 28 * 28 * 3 * 3 * 1 * 32
  conv2 = 2 * 14 * 14 * 3 * 3 * 32 * 64
  fc1 = 2 * (7 * 7 * 64) * 128
  fc2 = 2 * 128 * 10
  assert costs.forward_flops_per_example(model) == conv1 + conv2 + fc1 + fc2
  assert costs.train_flops_per_example(model) == 3 * (conv1 + conv2 + fc1 + fc2)


def test_masked_and_dense_counterparts_count_the_same():
  assert (costs.forward_flops_per_example(models.build_cnn())
          == costs.forward_flops_per_example(models.build_reference_cnn()))


def test_strided_valid_conv_and_3d_dense():
  model = tf.keras.Sequential([tf.keras.Input((9, 9, 2)),
                               MaskedConv2D(3, 3, strides=2, padding="valid"),
                               tf.keras.layers.Reshape((16, 3)), MaskedDense(5)])
  # valid 3x3 stride 2 on 9x9 -> 4x4 outputs; then 16 rows of a 3->5 product.
  assert costs.forward_flops_per_example(model) == 2 * 4 * 4 * 9 * 2 * 3 + 2 * 16 * 3 * 5


def test_lstm_flops():
  model = tf.keras.Sequential([tf.keras.Input((7, 4)), MaskedLSTM(6)])
  assert costs.forward_flops_per_example(model) == 2 * 7 * (4 + 6) * 4 * 6
