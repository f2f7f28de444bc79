"""``vgg16_paper``: the VGG-16 the FedMask paper ran, torchvision's ImageNet-shaped VGG-16.

Architecture (configuration D of Simonyan & Zisserman, as ``torchvision.models.vgg16``):
thirteen 3x3 convolutions ``64,64,M,128,128,M,256,256,256,M,512,512,512,M,512,512,512,M``
with biases and ReLU, 2x2 max-pools at each M, an adaptive average pool to 7 x 7
(:class:`AdaptiveAveragePooling2D`, torch's ``adaptive_avg_pool2d``), flatten (25,088 =
7 * 7 * 512 features), then ``fc 4096 - ReLU - dropout 0.5 - fc 4096 - ReLU - dropout 0.5 -
fc classes`` with biases; outputs ``[batch, num_classes]`` logits. On 32 x 32 inputs the
feature map is 1 x 1 before the adaptive pool, which copies it to 7 x 7 (as torchvision does);
pools use "same" padding and are skipped on a 1 x 1 map (:func:`paper.vgg_plan`), so 28 x 28
inputs work too.

Parameters (weights and biases) at width 1: 134,301,514 with 10 classes = 537.21 MB in float32
and 134,522,752 with 64 classes = 538.09 MB, the "Baseline" sizes of the paper's Table 5 to the
printed digit (:func:`parameter_count` gives the arithmetic). ``width`` scales every conv's
channels and the two hidden FC layers (``max(1, round(c * width))``); the flattened feature is
``49 * round(512 * width)``.

Three versions with the same layer names (``conv1..conv13``, ``fc1..fc3``) and kernel shapes:

* masked (:func:`build_vgg16_paper`): frozen random W (layer ``i`` from ``seed + 1000 * i``)
  times a learned binary mask; frozen zero biases, not masked (torchvision initialises its
  biases to zero, so the frozen random model is the paper's);
* dense (:func:`build_reference_vgg16_paper`): trainable Keras layers with biases, He-normal
  kernels from ``seed``;
* binarized (:func:`build_binary_vgg16_paper`): binarized conv/FC layers (no biases, as every
  binarized model here).

One-shot pruning thins the last 8 masked layers (conv9..conv13, fc1..fc3), the paper's setting.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from fedmask_tff.masks.layers import MaskedConv2D, MaskedDense
from fedmask_tff.models.basic import scaled
from fedmask_tff.models.binarized import BinaryConv2D, BinaryDense, ClippedHeNormal
from fedmask_tff.models.paper import SEED_STRIDE, VGG16_FEATURES, vgg_plan

POOLED_SIZE = 7  # torchvision's AdaptiveAvgPool2d((7, 7))
HIDDEN = (4096, 4096)
DROPOUT = 0.5


def _dense_chain_parameters(sizes) -> int:
  """Weights and biases of fully connected layers ``sizes[0] -> sizes[1] -> ...``."""
  return sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))


def parameter_count(num_classes: int, width: float = 1.0, in_channels: int = 3) -> int:
  """Weights and biases of ``vgg16_paper``, by arithmetic (no model built).

  Width 1, 3 input channels: 14,714,688 in the convolutions plus 25088-4096-4096-classes,
  i.e. 134,301,514 for 10 classes and 134,522,752 for 64.
  """
  total, channels = 0, in_channels
  for item in VGG16_FEATURES:
    if item != "M":
      out = scaled(item, width)
      total += 9 * channels * out + out
      channels = out
  hidden = [scaled(u, width) for u in HIDDEN]
  return total + _dense_chain_parameters([POOLED_SIZE * POOLED_SIZE * channels, *hidden,
                                          num_classes])


def _pool_matrix(size: int, out: int) -> np.ndarray:
  """``[out, size]`` averaging weights of torch's adaptive pooling along one axis: output
  ``i`` averages inputs ``floor(i * size / out)`` to ``ceil((i + 1) * size / out) - 1``."""
  m = np.zeros((out, size), np.float32)
  for i in range(out):
    start, end = (i * size) // out, -((-(i + 1) * size) // out)
    m[i, start:end] = 1.0 / (end - start)
  return m


@tf.keras.utils.register_keras_serializable(package="fedmask_tff")
class AdaptiveAveragePooling2D(tf.keras.layers.Layer):
  """torch's ``adaptive_avg_pool2d``: ``[batch, H, W, C]`` -> ``[batch, size, size, C]``.

  Each output cell averages its window of the input (windows overlap when ``size`` does not
  divide ``H``); an input smaller than ``size`` is copied (a 1 x 1 map becomes ``size x size``
  copies of itself). No weights.
  """

  def __init__(self, size: int = POOLED_SIZE, **kwargs):
    super().__init__(**kwargs)
    self.size = int(size)

  def call(self, inputs):
    h, w = int(inputs.shape[1]), int(inputs.shape[2])
    rows = tf.constant(_pool_matrix(h, self.size))
    cols = tf.constant(_pool_matrix(w, self.size))
    return tf.einsum("ih,bhwc,jw->bijc", rows, inputs, cols)

  def compute_output_shape(self, input_shape):
    return tf.TensorShape([input_shape[0], self.size, self.size, input_shape[-1]])

  def get_config(self):
    return dict(super().get_config(), size=self.size)


def _stack(conv, dense, input_shape, num_classes, width, dropout, name):
  """The layer list: ``conv(channels, index)`` and ``dense(units, index, activation)`` build
  the weight layers (index 0-based over all 16)."""
  layers = [tf.keras.Input(shape=input_shape, dtype=tf.float32)]
  i = 0
  for kind, channels in vgg_plan(input_shape, width):
    if kind == "pool":
      layers.append(tf.keras.layers.MaxPool2D(2, padding="same"))
    else:
      layers.append(conv(channels, i))
      i += 1
  layers += [AdaptiveAveragePooling2D(POOLED_SIZE), tf.keras.layers.Flatten()]
  for j, units in enumerate(HIDDEN):
    layers.append(dense(scaled(units, width), i + j, "relu"))
    if dropout:
      layers.append(tf.keras.layers.Dropout(dropout, seed=i + j))
  layers.append(dense(num_classes, i + len(HIDDEN), None))
  return tf.keras.Sequential(layers, name=name)


def build_vgg16_paper(input_shape=(32, 32, 3), num_classes: int = 10, width: float = 1.0,
                      seed: int = 0, mask_mode: str = "ste", score_init: float = 0.05,
                      kernel_init: str = "signed_constant",
                      dropout: float = DROPOUT) -> tf.keras.Model:
  """Masked ``vgg16_paper`` (16 masked layers with frozen zero biases); returns logits."""
  common = dict(mask_mode=mask_mode, score_init=score_init, kernel_init=kernel_init,
                use_bias=True)

  def conv(channels, i):
    return MaskedConv2D(channels, 3, activation="relu", seed=seed + SEED_STRIDE * i,
                        name=f"conv{i + 1}", **common)

  def dense(units, i, activation):
    return MaskedDense(units, activation=activation, seed=seed + SEED_STRIDE * i,
                       name=f"fc{i - 12}", **common)

  return _stack(conv, dense, input_shape, num_classes, width, dropout, "masked_vgg16_paper")


def _trainable(conv_cls, dense_cls, init, name, input_shape, num_classes, width, dropout,
               **kwargs):
  def conv(channels, i):
    return conv_cls(channels, 3, padding="same", activation="relu",
                    kernel_initializer=init(SEED_STRIDE * i), name=f"conv{i + 1}", **kwargs)

  def dense(units, i, activation):
    return dense_cls(units, activation=activation, kernel_initializer=init(SEED_STRIDE * i),
                     name=f"fc{i - 12}", **kwargs)

  return _stack(conv, dense, input_shape, num_classes, width, dropout, name)


def build_reference_vgg16_paper(input_shape=(32, 32, 3), num_classes: int = 10,
                                width: float = 1.0, seed: int = 0,
                                dropout: float = DROPOUT) -> tf.keras.Model:
  """The dense, trainable ``vgg16_paper`` (biases included, He-normal kernels)."""
  init = lambda offset: tf.keras.initializers.HeNormal(seed=seed + offset)  # noqa: E731
  return _trainable(tf.keras.layers.Conv2D, tf.keras.layers.Dense, init,
                    "reference_vgg16_paper", input_shape, num_classes, width, dropout,
                    use_bias=True)


def build_binary_vgg16_paper(input_shape=(32, 32, 3), num_classes: int = 10,
                             width: float = 1.0, seed: int = 0,
                             dropout: float = DROPOUT) -> tf.keras.Model:
  """The binarized ``vgg16_paper`` (signs of the same He draw; no biases)."""
  init = lambda offset: ClippedHeNormal(seed=seed + offset)  # noqa: E731
  return _trainable(BinaryConv2D, BinaryDense, init, "binary_vgg16_paper", input_shape,
                    num_classes, width, dropout)


MASKED_BUILDERS = {"vgg16_paper": build_vgg16_paper}
DENSE_BUILDERS = {"vgg16_paper": build_reference_vgg16_paper}
BINARY_BUILDERS = {"vgg16_paper": build_binary_vgg16_paper}
