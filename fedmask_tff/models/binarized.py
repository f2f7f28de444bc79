"""Binarized Keras layers (Hubara et al. 2016, "Binarized Neural Networks"), plain Keras.

Each layer keeps one trainable float32 ``kernel`` of *latent* weights in
``[-1, 1]`` (shape ``[in, out]`` for :class:`BinaryDense`, ``[kh, kw, in, out]``
for :class:`BinaryConv2D`; no bias). The forward pass uses the effective weight

    w_eff = sign(latent) * scale,   scale = sqrt(2 / fan_in)

with ``sign(x) = +1 if x >= 0 else -1`` (0 counts as +1, so every weight is
exactly one bit) and ``fan_in = in`` (dense) or ``kh * kw * in`` (convolution).
``scale`` is a Python float fixed by the layer's shape (He scaling, so the
activations keep the reference network's magnitude): it is *not* a variable,
never trained and never communicated; only the signs carry information.

Backward: the straight-through estimator with hardtanh clipping,
``d sign(latent) / d latent = 1 if |latent| <= 1 else 0``, so
``dL/dlatent = scale * dL/dw_eff * 1[|latent| <= 1]``.

Latent weights are kept in ``[-1, 1]``: the kernel has a :class:`LatentClip`
constraint (applied by Keras optimizers after each step in ``model.fit``) and
:func:`clip_latent` does the same for hand-written training loops.

Initialisation (:class:`ClippedHeNormal`): the reference model's He-normal
draw (``tf.keras.initializers.HeNormal(seed)``, std ``sqrt(2 / fan_in)``),
clipped to ``[-1, 1]``; with the same seed the binary model's signs are those
of :func:`fedmask_tff.models.basic.build_reference_cnn`'s weights.

Everything here is ordinary Keras (``get_config`` round-trips, registered
under the package ``fedmask_tff``); nothing knows TFF. The layers subclass
``tf.keras.layers.Dense`` / ``Conv2D``, so :mod:`fedmask_tff.models.costs` counts
their FLOPs like the dense layers'.
"""

from __future__ import annotations

import math

import tensorflow as tf

from fedmask_tff.models.basic import scaled

LATENT_BOUND = 1.0


def binarize(latent: tf.Tensor) -> tf.Tensor:
  """``+1`` where ``latent >= 0``, else ``-1`` (float32, same shape); no gradient rule."""
  return tf.where(latent >= 0.0, 1.0, -1.0)


def ste_sign(latent: tf.Tensor) -> tf.Tensor:
  """:func:`binarize` forward; hardtanh straight-through gradient (1 where ``|latent| <= 1``, else 0)."""

  @tf.custom_gradient
  def _forward(x):
    def _grad(upstream):
      return upstream * tf.cast(tf.abs(x) <= LATENT_BOUND, upstream.dtype)
    return binarize(x), _grad

  return _forward(latent)


def sign_bits(latent: tf.Tensor) -> tf.Tensor:
  """The 0/1 bits of :func:`binarize` (1 for +1), float32, same shape: what a client uploads."""
  return tf.cast(latent >= 0.0, tf.float32)


def fan_in_of(kernel_shape) -> int:
  """Product of all dimensions of a kernel shape but the last (Keras' fan-in convention)."""
  dims = [int(d) for d in kernel_shape]
  return max(1, math.prod(dims[:-1]) if len(dims) > 1 else dims[0])


def binary_scale(kernel_shape) -> float:
  """The fixed forward scale ``sqrt(2 / fan_in)`` of a binarized kernel of this shape."""
  return math.sqrt(2.0 / fan_in_of(kernel_shape))


def clip_latent(variables) -> list:
  """Assign ops clipping each variable to ``[-1, 1]`` (``post_step`` for ``sgd_epochs``)."""
  return [v.assign(tf.clip_by_value(v, -LATENT_BOUND, LATENT_BOUND)) for v in variables]


@tf.keras.utils.register_keras_serializable(package="fedmask_tff")
class ClippedHeNormal(tf.keras.initializers.Initializer):
  """``HeNormal(seed)`` (truncated normal, std ``sqrt(2 / fan_in)``) clipped to ``[-1, 1]``."""

  def __init__(self, seed=None):
    self.seed = seed
    self._he = tf.keras.initializers.HeNormal(seed=seed)

  def __call__(self, shape, dtype=None, **kwargs):
    return tf.clip_by_value(self._he(shape, dtype=dtype or tf.float32), -LATENT_BOUND, LATENT_BOUND)

  def get_config(self):
    return {"seed": self.seed}


@tf.keras.utils.register_keras_serializable(package="fedmask_tff")
class LatentClip(tf.keras.constraints.Constraint):
  """Keeps latent weights in ``[-1, 1]`` (Keras applies it after each optimizer step)."""

  def __call__(self, w):
    return tf.clip_by_value(w, -LATENT_BOUND, LATENT_BOUND)

  def get_config(self):
    return {}


def _binary_kwargs(kwargs, kernel_initializer):
  for key in ("use_bias", "kernel_constraint", "bias_initializer", "bias_regularizer",
              "bias_constraint"):
    kwargs.pop(key, None)  # Fixed by the layer (present in configs from get_config).
  return dict(kwargs, use_bias=False, kernel_constraint=LatentClip(),
              kernel_initializer=kernel_initializer)


@tf.keras.utils.register_keras_serializable(package="fedmask_tff")
class BinaryDense(tf.keras.layers.Dense):
  """Dense layer with binarized weights, no bias: ``activation(x @ (sign(latent) * scale))``.

  Input ``[batch, in]`` (or ``[..., in]``), output ``[..., units]``; ``kernel``
  is the latent ``[in, units]`` float32 variable, ``scale = sqrt(2 / in)``.
  """

  def __init__(self, units, activation=None, kernel_initializer=None, **kwargs):
    if kernel_initializer is None:
      kernel_initializer = ClippedHeNormal()
    super().__init__(units, activation=activation, **_binary_kwargs(kwargs, kernel_initializer))

  def build(self, input_shape):
    super().build(input_shape)
    self.scale = binary_scale(self.kernel.shape)

  def binary_kernel(self) -> tf.Tensor:
    """The effective weight ``sign(latent) * scale`` (STE gradient to ``kernel``)."""
    return ste_sign(self.kernel) * self.scale

  def call(self, inputs):
    inputs = tf.convert_to_tensor(inputs, dtype=self.compute_dtype)
    w = self.binary_kernel()
    if inputs.shape.rank == 2:
      outputs = tf.matmul(inputs, w)
    else:
      outputs = tf.tensordot(inputs, w, [[inputs.shape.rank - 1], [0]])
    return self.activation(outputs) if self.activation is not None else outputs


@tf.keras.utils.register_keras_serializable(package="fedmask_tff")
class BinaryConv2D(tf.keras.layers.Conv2D):
  """2-D convolution with binarized weights, no bias.

  Input ``[batch, h, w, in]`` (channels last), output ``[batch, h', w', filters]``;
  ``kernel`` is the latent ``[kh, kw, in, filters]`` variable,
  ``scale = sqrt(2 / (kh * kw * in))``. Grouped convolutions are not supported.
  """

  def __init__(self, filters, kernel_size, activation=None, kernel_initializer=None, **kwargs):
    if kernel_initializer is None:
      kernel_initializer = ClippedHeNormal()
    if int(kwargs.get("groups", 1)) != 1:
      raise ValueError("BinaryConv2D does not support groups > 1")
    super().__init__(filters, kernel_size, activation=activation,
                     **_binary_kwargs(kwargs, kernel_initializer))

  def build(self, input_shape):
    super().build(input_shape)
    self.scale = binary_scale(self.kernel.shape)

  def binary_kernel(self) -> tf.Tensor:
    return ste_sign(self.kernel) * self.scale

  def call(self, inputs):
    outputs = self.convolution_op(inputs, self.binary_kernel())
    return self.activation(outputs) if self.activation is not None else outputs


def binary_layers(model: tf.keras.Model) -> list:
  """The model's :class:`BinaryDense` / :class:`BinaryConv2D` layers, in order."""
  return [l for l in model.layers if isinstance(l, (BinaryDense, BinaryConv2D))]


def build_binary_cnn(input_shape=(28, 28, 1), num_classes: int = 10, width: float = 1.0,
                     seed: int = 0) -> tf.keras.Model:
  """The binarized :func:`fedmask_tff.models.basic.build_reference_cnn`: same layers, names and shapes.

  conv3x3(32, same)-pool-conv3x3(64, same)-pool-fc(128)-fc(classes), ReLU, no
  biases, logits out; ``width`` scales the hidden layers. Latent init:
  ``ClippedHeNormal(seed + offset)`` with the reference model's offsets.
  """
  init = lambda offset: ClippedHeNormal(seed=seed + offset)  # noqa: E731
  return tf.keras.Sequential([
      tf.keras.Input(shape=input_shape, dtype=tf.float32),
      BinaryConv2D(scaled(32, width), 3, padding="same", activation="relu",
                   kernel_initializer=init(0), name="conv1"),
      tf.keras.layers.MaxPool2D(2),
      BinaryConv2D(scaled(64, width), 3, padding="same", activation="relu",
                   kernel_initializer=init(1000), name="conv2"),
      tf.keras.layers.MaxPool2D(2),
      tf.keras.layers.Flatten(),
      BinaryDense(scaled(128, width), activation="relu", kernel_initializer=init(2000),
                  name="fc1"),
      BinaryDense(num_classes, kernel_initializer=init(3000), name="fc2"),
  ], name="binary_cnn")


def build_binary_mlp(input_shape=(28, 28, 1), num_classes: int = 10, width: float = 1.0,
                     seed: int = 0) -> tf.keras.Model:
  """The binarized :func:`fedmask_tff.models.basic.build_reference_mlp`: flatten-fc(200)-fc(200)-fc(classes)."""
  init = lambda offset: ClippedHeNormal(seed=seed + offset)  # noqa: E731
  return tf.keras.Sequential([
      tf.keras.Input(shape=input_shape, dtype=tf.float32),
      tf.keras.layers.Flatten(),
      BinaryDense(scaled(200, width), activation="relu", kernel_initializer=init(0), name="fc1"),
      BinaryDense(scaled(200, width), activation="relu", kernel_initializer=init(1000),
                  name="fc2"),
      BinaryDense(num_classes, kernel_initializer=init(2000), name="fc3"),
  ], name="binary_mlp")


# The binarized counterparts of ``models.DENSE_MODEL_BUILDERS``, by ``--model`` name.
BINARY_MODEL_BUILDERS = {"cnn": build_binary_cnn, "mlp": build_binary_mlp}
