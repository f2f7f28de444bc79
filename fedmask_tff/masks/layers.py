"""Masked Keras layers: a frozen random weight tensor W and a learnable mask over it.

Each layer holds, per masked weight tensor of shape S:

* ``kernel`` (S, float32, **not trainable**): W, drawn deterministically from the
  layer's ``seed`` (the same seed gives the same W in every process, so W is
  never communicated);
* ``scores`` (S, float32, trainable): the real-valued mask scores ``m_r``;
* ``keep`` (S, float32 0/1, not trainable): the fixed pruning mask; 1 everywhere
  until one-shot pruning sets it (:mod:`fedmask_tff.masks.pruning`).

The effective weight is ``W * mask(m_r) * keep``; the mask is binary at
inference and in ``"ste"`` training, ``sigmoid(m_r)`` in ``"soft"`` training
(see :mod:`fedmask_tff.masks.masking`). Optional biases are frozen and unmasked.

The layers work in any Keras model with ``model.fit``; nothing here knows TFF.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
import tensorflow as tf

from fedmask_tff.wire import bitpack
from fedmask_tff.masks import masking

KERNEL_INITS = ("signed_constant", "signed_constant_e", "he_normal", "he_uniform")
INFERENCE_MASKS = ("threshold", "sampled", "expected")


@tf.keras.utils.register_keras_serializable(package="fedmask_tff")
class FrozenInitializer(tf.keras.initializers.Initializer):
  """Deterministic initializer for frozen weights, from an integer seed.

  ``signed_constant``: ``+-sqrt(2 / fan_in)`` with random signs (the choice that
  trains best under masks, Ramanujan et al. 2020); ``signed_constant_e``: ``+-e / sqrt(fan_in)``
  (FedPM's scale, about 1.92 times larger); ``he_normal``: truncated
  normal with std ``sqrt(2 / fan_in)``; ``he_uniform``: uniform in
  ``+-sqrt(6 / fan_in)``. ``fan_in`` is the product of all dimensions but the
  last (Keras' convention for Dense and Conv kernels) unless given.
  """

  def __init__(self, kind: str = "signed_constant", seed: int = 0, fan_in: Optional[int] = None):
    if kind not in KERNEL_INITS:
      raise ValueError(f"kernel_init must be one of {KERNEL_INITS}, got {kind!r}")
    self.kind = kind
    self.seed = int(seed)
    self.fan_in = fan_in

  def __call__(self, shape, dtype=None, **kwargs):
    shape = tuple(int(d) for d in shape)
    fan_in = self.fan_in or max(1, int(np.prod(shape[:-1])) if len(shape) > 1 else shape[0])
    seed = tf.constant([self.seed, 0x5EED], dtype=tf.int64)
    if self.kind in ("signed_constant", "signed_constant_e"):
      u = tf.random.stateless_uniform(shape, seed=seed)
      scale = math.sqrt(2.0 / fan_in) if self.kind == "signed_constant" else math.e / math.sqrt(fan_in)
      return tf.where(u < 0.5, -1.0, 1.0) * scale
    if self.kind == "he_normal":
      return tf.random.stateless_truncated_normal(shape, seed=seed) * math.sqrt(2.0 / fan_in)
    limit = math.sqrt(6.0 / fan_in)
    return tf.random.stateless_uniform(shape, seed=seed, minval=-limit, maxval=limit)

  def get_config(self):
    return {"kind": self.kind, "seed": self.seed, "fan_in": self.fan_in}


class MaskedWeightsMixin:
  """Creates and applies (kernel, scores, keep) triples; shared by all masked layers."""

  def _init_mask_settings(self, seed, mask_mode, threshold, score_init, kernel_init,
                          score_init_std=0.0, inference_mask="threshold"):
    self.seed = int(seed)
    self.mask_mode = masking.check_mask_mode(mask_mode)
    self.threshold = masking.check_threshold(threshold)
    self.score_init = float(score_init)
    if not math.isfinite(self.score_init):
      raise ValueError(f"score_init must be finite, got {score_init}")
    self.score_init_std = float(score_init_std)
    if not (math.isfinite(self.score_init_std) and self.score_init_std >= 0):
      raise ValueError(f"score_init_std must be a finite number >= 0, got {score_init_std}")
    if inference_mask not in INFERENCE_MASKS:
      raise ValueError(f"inference_mask must be one of {INFERENCE_MASKS}, got {inference_mask!r}")
    self.inference_mask = inference_mask
    self.sample_seed = None  # int64 [2], created with the first masked weight in "sampled" mode
    if kernel_init not in KERNEL_INITS:
      raise ValueError(f"kernel_init must be one of {KERNEL_INITS}, got {kernel_init!r}")
    self.kernel_init = kernel_init
    self._masked = []  # list of (name, kernel, scores, keep)

  def _add_masked_weight(self, name: str, shape, seed_offset: int = 0, fan_in=None):
    kernel = self.add_weight(
        name=name, shape=shape, dtype=tf.float32, trainable=False,
        initializer=FrozenInitializer(self.kernel_init, self.seed + seed_offset, fan_in))
    score_initializer = tf.keras.initializers.Constant(self.score_init)
    if self.score_init_std > 0:  # N(score_init, std^2), seeded like W (logit(p0) plus noise)
      score_initializer = tf.keras.initializers.RandomNormal(
          self.score_init, self.score_init_std, seed=self.seed + seed_offset + 7919)
    scores = self.add_weight(
        name=f"{name}_scores", shape=shape, dtype=tf.float32, trainable=True,
        initializer=score_initializer)
    if self.sample_seed is None and (self.mask_mode == "sampled" or self.inference_mask == "sampled"):
      self.sample_seed = self.add_weight(
          name="sample_seed", shape=(2,), dtype=tf.int64, trainable=False,
          initializer=tf.keras.initializers.Constant([self.seed, 0]))
    keep = self.add_weight(
        name=f"{name}_keep", shape=shape, dtype=tf.float32, trainable=False,
        initializer="ones")
    self._masked.append((name, kernel, scores, keep))
    return kernel, scores, keep

  @property
  def masked_weights(self):
    """List of ``(name, kernel, scores, keep)`` variable tuples, in creation order."""
    return list(self._masked)

  def _next_seed(self, scores):
    """The sampled mode's seed for this forward pass of ``scores``: the layer's ``sample_seed``
    folded with the weight's index; the seed's counter then moves on, so every pass draws anew
    (reproducibly: set ``sample_seed`` to restart a stream)."""
    index = next(i for i, w in enumerate(self._masked) if w[2] is scores)
    seed = tf.random.experimental.stateless_fold_in(tf.convert_to_tensor(self.sample_seed), index)
    seed = tf.cast(seed, tf.int64)
    if index == len(self._masked) - 1:
      with tf.control_dependencies([seed]):
        self.sample_seed.assign_add(tf.constant([0, 1], tf.int64))
    return seed

  def mask_for(self, scores, keep, training) -> tf.Tensor:
    """The mask applied in a forward pass: in training, the ``mask_mode``'s; at inference the
    ``inference_mask``: ``threshold`` (binary, the phone's model), a ``sampled`` mask or the
    ``expected`` one, sigmoid(m_r)."""
    sampled = self.mask_mode == "sampled" if training else self.inference_mask == "sampled"
    seed = self._next_seed(scores) if sampled else None
    if training:
      m = masking.training_mask(scores, self.mask_mode, self.threshold, seed)
    elif self.inference_mask == "sampled":
      m = tf.stop_gradient(masking.sampled_mask(scores, seed))
    elif self.inference_mask == "expected":
      m = masking.expected_mask(scores)
    else:
      m = masking.binary_mask(scores, self.threshold)
    return m * keep

  def binary_masks(self) -> list:
    """The layer's binary masks (float32 0/1, times ``keep``), one per masked weight."""
    return [masking.binary_mask(s, self.threshold) * k for _, _, s, k in self._masked]

  def _init_output(self, activation, use_bias, bias_initializer):
    """Settings shared by the feed-forward masked layers: activation and frozen bias."""
    self.activation = tf.keras.activations.get(activation)
    self.use_bias = bool(use_bias)
    self.bias_initializer = tf.keras.initializers.get(bias_initializer)

  def _add_frozen_bias(self, size: int):
    self.bias = None
    if self.use_bias:
      self.bias = self.add_weight(name="bias", shape=(size,), trainable=False,
                                  initializer=self.bias_initializer)

  def _finish_output(self, y):
    if self.bias is not None:
      y = y + self.bias
    return self.activation(y)

  def _output_config(self) -> dict[str, Any]:
    config = self._mask_config()
    config.update({"activation": tf.keras.activations.serialize(self.activation),
                   "use_bias": self.use_bias,
                   "bias_initializer": tf.keras.initializers.serialize(self.bias_initializer)})
    return config

  def _mask_config(self) -> dict[str, Any]:
    return {"seed": self.seed, "mask_mode": self.mask_mode, "threshold": self.threshold,
            "score_init": self.score_init, "kernel_init": self.kernel_init,
            "score_init_std": self.score_init_std, "inference_mask": self.inference_mask}


def _training_flag(training) -> bool:
  """Keras passes ``training`` as a Python bool (``fit``: True; ``predict``/plain calls: None).

  None means inference. (Asking ``tf.keras.backend.learning_phase()`` instead
  creates a symbolic placeholder while a functional model is being built in
  some processes, which breaks model construction.)
  """
  if training is None:
    return False
  if isinstance(training, (bool, int)):
    return bool(training)
  return bool(tf.get_static_value(training)) if tf.get_static_value(training) is not None else True


@tf.keras.utils.register_keras_serializable(package="fedmask_tff")
class MaskedDense(MaskedWeightsMixin, tf.keras.layers.Layer):
  """Dense layer ``y = act(x @ (W * m) + b)`` with frozen W (and b) and a learned mask m.

  Input ``[..., in_features]``, output ``[..., units]``. ``kernel`` has shape
  ``[in_features, units]``.

  Args:
    units: output features.
    activation: a Keras activation.
    use_bias: add a frozen, unmasked bias (``bias_initializer``, default zeros).
    seed: integer seed of W; the same seed gives the same W everywhere.
    mask_mode: ``"ste"``, ``"soft"`` or ``"sampled"`` training forward (see :mod:`masking`).
    threshold: tau of ``1[sigmoid(m_r) >= tau]``.
    score_init: initial value of every score ``m_r`` (0.05: FedMask's all-ones start; 0 with
      ``score_init_std=1``: FedPM's N(0, 1); ``logit(p0)`` with some noise: a start near p0).
    kernel_init: ``"signed_constant"`` (default), ``"signed_constant_e"`` (FedPM's scale),
      ``"he_normal"`` or ``"he_uniform"``.
    score_init_std: > 0 draws the scores from N(score_init, score_init_std^2) (seeded).
    inference_mask: the mask at inference: ``"threshold"`` (binary, default), ``"sampled"`` (a
      Bernoulli sample) or ``"expected"`` (sigmoid(m_r)).
  """

  def __init__(self, units: int, activation=None, use_bias: bool = False, seed: int = 0,
               mask_mode: str = "ste", threshold: float = masking.DEFAULT_THRESHOLD,
               score_init: float = 0.05, kernel_init: str = "signed_constant",
               bias_initializer="zeros", score_init_std: float = 0.0,
               inference_mask: str = "threshold", **kwargs):
    super().__init__(**kwargs)
    if int(units) < 1:
      raise ValueError(f"units must be >= 1, got {units}")
    self.units = int(units)
    self._init_output(activation, use_bias, bias_initializer)
    self._init_mask_settings(seed, mask_mode, threshold, score_init, kernel_init,
                             score_init_std, inference_mask)

  def build(self, input_shape):
    in_features = int(input_shape[-1])
    self.kernel, self.scores, self.keep = self._add_masked_weight(
        "kernel", (in_features, self.units))
    self._add_frozen_bias(self.units)
    super().build(input_shape)

  def call(self, inputs, training=None):
    mask = self.mask_for(self.scores, self.keep, _training_flag(training))
    y = tf.tensordot(inputs, self.kernel * mask, axes=1) if inputs.shape.rank > 2 \
        else tf.matmul(inputs, self.kernel * mask)
    return self._finish_output(y)

  def get_config(self):
    config = super().get_config()
    config.update(self._output_config())
    config.update({"units": self.units})
    return config


@tf.keras.utils.register_keras_serializable(package="fedmask_tff")
class MaskedConv2D(MaskedWeightsMixin, tf.keras.layers.Layer):
  """2-D convolution with a frozen kernel W ``[kh, kw, in_channels, filters]`` and a learned mask.

  Input ``[batch, height, width, channels]`` (channels last), output
  ``[batch, height', width', filters]``. Arguments as :class:`MaskedDense`, plus
  ``kernel_size``, ``strides`` and ``padding`` (``"same"`` or ``"valid"``).
  """

  def __init__(self, filters: int, kernel_size, strides=1, padding: str = "same",
               activation=None, use_bias: bool = False, seed: int = 0,
               mask_mode: str = "ste", threshold: float = masking.DEFAULT_THRESHOLD,
               score_init: float = 0.05, kernel_init: str = "signed_constant",
               bias_initializer="zeros", score_init_std: float = 0.0,
               inference_mask: str = "threshold", **kwargs):
    super().__init__(**kwargs)
    if int(filters) < 1:
      raise ValueError(f"filters must be >= 1, got {filters}")
    self.filters = int(filters)
    self.kernel_size = _pair(kernel_size, "kernel_size")
    self.strides = _pair(strides, "strides")
    padding = padding.lower()
    if padding not in ("same", "valid"):
      raise ValueError(f"padding must be 'same' or 'valid', got {padding!r}")
    self.padding = padding
    self._init_output(activation, use_bias, bias_initializer)
    self._init_mask_settings(seed, mask_mode, threshold, score_init, kernel_init,
                             score_init_std, inference_mask)

  def build(self, input_shape):
    in_channels = int(input_shape[-1])
    self.kernel, self.scores, self.keep = self._add_masked_weight(
        "kernel", self.kernel_size + (in_channels, self.filters))
    self._add_frozen_bias(self.filters)
    super().build(input_shape)

  def call(self, inputs, training=None):
    mask = self.mask_for(self.scores, self.keep, _training_flag(training))
    y = tf.nn.conv2d(inputs, self.kernel * mask, strides=(1,) + self.strides + (1,),
                     padding=self.padding.upper())
    return self._finish_output(y)

  def get_config(self):
    config = super().get_config()
    config.update(self._output_config())
    config.update({"filters": self.filters, "kernel_size": self.kernel_size,
                   "strides": self.strides, "padding": self.padding})
    return config


def _pair(value, name):
  if isinstance(value, int):
    value = (value, value)
  value = tuple(int(v) for v in value)
  if len(value) != 2 or min(value) < 1:
    raise ValueError(f"{name} must be a positive int or a pair of them, got {value}")
  return value


def masked_layers(model: tf.keras.Model) -> list:
  """All layers of ``model`` (depth first, in order) that carry masked weights."""
  found = []

  def visit(layer):
    if isinstance(layer, MaskedWeightsMixin):
      found.append(layer)
      return
    for sub in getattr(layer, "layers", []) or []:
      visit(sub)
    cell = getattr(layer, "cell", None)  # RNN layers (e.g. MaskedLSTM) hold their cell here
    if isinstance(cell, tf.keras.layers.Layer):
      visit(cell)

  for layer in model.layers:
    visit(layer)
  return found


def mask_variables(model: tf.keras.Model):
  """``(kernels, scores, keeps)``: three lists of variables, one entry per masked weight."""
  kernels, scores, keeps = [], [], []
  for layer in masked_layers(model):
    for _, k, s, p in layer.masked_weights:
      kernels.append(k)
      scores.append(s)
      keeps.append(p)
  return kernels, scores, keeps


def pack_masks(model: tf.keras.Model) -> list:
  """The model's binary masks (``1[sigmoid(m_r) >= tau] * keep``), 1 bit per element.

  Returns one uint8 numpy array of ``ceil(n / 8)`` bytes per masked weight of ``n`` elements
  (``mask_variables`` order; bit order of :mod:`fedmask_tff.wire.bitpack`): what a FedMask device
  uploads. ``bitpack.unpack_bits_np(packed, kernel.shape)`` reads one back.
  """
  return [bitpack.pack_bits_np(mask.numpy())
          for layer in masked_layers(model) for mask in layer.binary_masks()]
