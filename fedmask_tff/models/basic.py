"""Masked model builders (plain Keras; every weight frozen and masked).

Each builder returns an uncompiled ``tf.keras.Model`` whose masked layers draw
their frozen weights from ``seed`` (layer ``i`` uses ``seed + 1000 * i``), so
every process that calls the builder with the same arguments gets the same W.
``MODEL_BUILDERS`` maps the ``--model`` names to builders; :mod:`fedmask_tff.models`
holds every model's builders.
"""

from __future__ import annotations

import tensorflow as tf

from fedmask_tff.masks.layers import MaskedConv2D, MaskedDense


def scaled(channels: int, width: float) -> int:
  """``channels`` times the width multiplier, rounded, at least 1."""
  if not width > 0:
    raise ValueError(f"model width must be > 0, got {width}")
  return max(1, int(round(channels * width)))


def build_cnn(input_shape=(28, 28, 1), num_classes: int = 10, width: float = 1.0,
              seed: int = 0, mask_mode: str = "ste", score_init: float = 0.05,
              kernel_init: str = "signed_constant") -> tf.keras.Model:
  """conv3x3(32)-pool-conv3x3(64)-pool-fc(128)-fc(classes), all masked, returns logits.

  Input ``[batch, 28, 28, 1]`` float32; output ``[batch, num_classes]`` logits.
  ``width`` scales every hidden layer. With ``width=1`` on 28x28 inputs:
  288 + 18,432 + 401,408 + 1,280 = 421,408 masked elements; the last two
  (the classifier, 402,688 elements) are the ones one-shot pruning thins.
  """
  common = dict(mask_mode=mask_mode, score_init=score_init, kernel_init=kernel_init)
  return tf.keras.Sequential([
      tf.keras.Input(shape=input_shape, dtype=tf.float32),
      MaskedConv2D(scaled(32, width), 3, activation="relu", seed=seed, name="conv1", **common),
      tf.keras.layers.MaxPool2D(2),
      MaskedConv2D(scaled(64, width), 3, activation="relu", seed=seed + 1000, name="conv2",
                   **common),
      tf.keras.layers.MaxPool2D(2),
      tf.keras.layers.Flatten(),
      MaskedDense(scaled(128, width), activation="relu", seed=seed + 2000, name="fc1", **common),
      MaskedDense(num_classes, seed=seed + 3000, name="fc2", **common),
  ], name="masked_cnn")


def build_mlp(input_shape=(28, 28, 1), num_classes: int = 10, width: float = 1.0,
              seed: int = 0, mask_mode: str = "ste", score_init: float = 0.05,
              kernel_init: str = "signed_constant") -> tf.keras.Model:
  """flatten-fc(200)-fc(200)-fc(classes), all masked: a small, fast model for tests."""
  common = dict(mask_mode=mask_mode, score_init=score_init, kernel_init=kernel_init)
  return tf.keras.Sequential([
      tf.keras.Input(shape=input_shape, dtype=tf.float32),
      tf.keras.layers.Flatten(),
      MaskedDense(scaled(200, width), activation="relu", seed=seed, name="fc1", **common),
      MaskedDense(scaled(200, width), activation="relu", seed=seed + 1000, name="fc2", **common),
      MaskedDense(num_classes, seed=seed + 2000, name="fc3", **common),
  ], name="masked_mlp")


MODEL_BUILDERS = {"cnn": build_cnn, "mlp": build_mlp}


def build_reference_cnn(input_shape=(28, 28, 1), num_classes: int = 10, width: float = 1.0,
                        seed: int = 0) -> tf.keras.Model:
  """The dense, trainable counterpart of :func:`build_cnn` (same shapes, no bias, no masks).

  What FedAvg-style baselines train; its float32 weights are what dense FedAvg sends.
  """
  init = lambda offset: tf.keras.initializers.HeNormal(seed=seed + offset)  # noqa: E731
  return tf.keras.Sequential([
      tf.keras.Input(shape=input_shape, dtype=tf.float32),
      tf.keras.layers.Conv2D(scaled(32, width), 3, padding="same", activation="relu",
                             use_bias=False, kernel_initializer=init(0), name="conv1"),
      tf.keras.layers.MaxPool2D(2),
      tf.keras.layers.Conv2D(scaled(64, width), 3, padding="same", activation="relu",
                             use_bias=False, kernel_initializer=init(1000), name="conv2"),
      tf.keras.layers.MaxPool2D(2),
      tf.keras.layers.Flatten(),
      tf.keras.layers.Dense(scaled(128, width), activation="relu", use_bias=False,
                            kernel_initializer=init(2000), name="fc1"),
      tf.keras.layers.Dense(num_classes, use_bias=False, kernel_initializer=init(3000), name="fc2"),
  ], name="reference_cnn")


def build_reference_mlp(input_shape=(28, 28, 1), num_classes: int = 10, width: float = 1.0,
                        seed: int = 0) -> tf.keras.Model:
  """The dense, trainable counterpart of :func:`build_mlp` (same shapes, no bias)."""
  init = lambda offset: tf.keras.initializers.HeNormal(seed=seed + offset)  # noqa: E731
  return tf.keras.Sequential([
      tf.keras.Input(shape=input_shape, dtype=tf.float32),
      tf.keras.layers.Flatten(),
      tf.keras.layers.Dense(scaled(200, width), activation="relu", use_bias=False,
                            kernel_initializer=init(0), name="fc1"),
      tf.keras.layers.Dense(scaled(200, width), activation="relu", use_bias=False,
                            kernel_initializer=init(1000), name="fc2"),
      tf.keras.layers.Dense(num_classes, use_bias=False, kernel_initializer=init(2000), name="fc3"),
  ], name="reference_mlp")


# The dense, trainable counterparts that FedAvg-style baselines train, by ``--model`` name.
DENSE_MODEL_BUILDERS = {"cnn": build_reference_cnn, "mlp": build_reference_mlp}
