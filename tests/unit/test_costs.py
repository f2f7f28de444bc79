"""FLOP counts from layer shapes, checked against numbers worked out by hand."""

import tensorflow as tf

from fedmask_tff.models import costs, basic
from fedmask_tff.masks.layers import MaskedConv2D, MaskedDense
from fedmask_tff.masks.lstm import MaskedLSTM


def test_cnn_forward_flops_by_hand():
  model = basic.build_cnn()
  conv1 = 2 * 28 * 28 * 3 * 3 * 1 * 32
  conv2 = 2 * 14 * 14 * 3 * 3 * 32 * 64
  fc1 = 2 * (7 * 7 * 64) * 128
  fc2 = 2 * 128 * 10
  assert costs.forward_flops_per_example(model) == conv1 + conv2 + fc1 + fc2
  assert costs.train_flops_per_example(model) == 3 * (conv1 + conv2 + fc1 + fc2)


def test_masked_and_dense_counterparts_count_the_same():
  assert (costs.forward_flops_per_example(basic.build_cnn())
          == costs.forward_flops_per_example(basic.build_reference_cnn()))


def test_strided_valid_conv_and_3d_dense():
  model = tf.keras.Sequential([tf.keras.Input((9, 9, 2)),
                               MaskedConv2D(3, 3, strides=2, padding="valid"),
                               tf.keras.layers.Reshape((16, 3)), MaskedDense(5)])
  # valid 3x3 stride 2 on 9x9 -> 4x4 outputs; then 16 rows of a 3->5 product.
  assert costs.forward_flops_per_example(model) == 2 * 4 * 4 * 9 * 2 * 3 + 2 * 16 * 3 * 5


def test_lstm_flops():
  model = tf.keras.Sequential([tf.keras.Input((7, 4)), MaskedLSTM(6)])
  assert costs.forward_flops_per_example(model) == 2 * 7 * (4 + 6) * 4 * 6


# --- The per-weight counter every algorithm reports (train_flops) ---------------------------------

def test_dense_layer_train_flops_by_hand():
  model = tf.keras.Sequential([tf.keras.Input((784,)), tf.keras.layers.Dense(10, use_bias=False)])
  (w,) = costs.weight_costs(model)
  assert (w.positions, w.elements, w.first) == (1, 7840, True)
  # First layer: forward 7840 MACs + weight gradient 7840 MACs (no input gradient) = 2 * 2 * 7840.
  assert costs.train_flops([w], 1) == 2 * (7840 + 7840)
  assert costs.train_flops([w], 5) == 5 * 2 * (7840 + 7840)


def test_conv_then_dense_train_flops_by_hand():
  model = tf.keras.Sequential([tf.keras.Input((28, 28, 1)),
                               tf.keras.layers.Conv2D(32, 3, padding="same", use_bias=False),
                               tf.keras.layers.Flatten(),
                               tf.keras.layers.Dense(10, use_bias=False)])
  conv, dense = costs.weight_costs(model)
  assert (conv.positions, conv.elements, conv.first) == (784, 288, True)
  assert (dense.positions, dense.elements, dense.first) == (1, 25088 * 10, False)
  conv_macs = 784 * 288
  dense_macs = 250880
  expected = 2 * (conv_macs * 2 + dense_macs * 3)  # the dense layer also propagates to its input
  assert costs.train_flops([conv, dense], 1) == expected


def test_masked_layers_count_only_nonzero_and_trainable_elements():
  model = tf.keras.Sequential([tf.keras.Input((28, 28, 1)),
                               MaskedConv2D(32, 3, padding="same"),
                               tf.keras.layers.Flatten(), MaskedDense(10)])
  conv, dense = costs.weight_costs(model)
  assert (conv.positions, conv.elements) == (784, 288)
  # Mask: 100 of the conv's 288 elements are 1 (all 288 still trainable); the dense layer is
  # pruned to 20 % kept (50,176 trainable) of which 30,000 are 1.
  got = costs.train_flops([conv, dense], 3, nonzeros=[100, 30000], trainable=[288, 50176])
  per_example = 2 * (784 * (100 + 288) + 1 * (30000 * 2 + 50176))
  assert got == 3 * per_example
  assert costs.forward_flops([conv, dense], [100, 30000]) == 2 * (784 * 100 + 30000)
  # Dense counterpart with every element: more.
  assert costs.train_flops([conv, dense], 3) > got


def test_counter_works_on_tensors():
  model = tf.keras.Sequential([tf.keras.Input((4,)), MaskedDense(3)])
  (w,) = costs.weight_costs(model)
  got = costs.train_flops([w], tf.constant(2.0, tf.float64), [tf.constant(5.0, tf.float64)],
                          [tf.constant(12.0, tf.float64)])
  assert float(got) == 2 * 2 * (5 + 12)


def test_lstm_weights_are_kernel_and_recurrent():
  model = tf.keras.Sequential([tf.keras.Input((7, 4)), MaskedLSTM(6)])
  kernel, recurrent = costs.weight_costs(model)
  assert (kernel.positions, kernel.elements, kernel.first) == (7, 4 * 24, True)
  assert (recurrent.positions, recurrent.elements, recurrent.first) == (7, 6 * 24, False)
