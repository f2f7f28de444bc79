"""The FedMask paper's models (Li et al., SenSys 2021), masked, dense and binarized, with a width.

Three architectures, each in up to three versions with identical kernel shapes
and layer names:

* **masked** (``PAPER_MODEL_BUILDERS``, what FedMask trains): every Dense/Conv2D/
  LSTM kernel is a frozen random W (drawn from ``seed``) times a learned binary
  mask (:mod:`fedmask_tff.masks.layers`, :mod:`fedmask_tff.masks.lstm`); signature
  ``builder(input_shape, num_classes, width=1.0, seed=0, mask_mode="ste",
  score_init=0.05, kernel_init="signed_constant")`` like
  :data:`fedmask_tff.models.basic.MODEL_BUILDERS`;
* **dense** (``PAPER_DENSE_BUILDERS``, what FedAvg-style baselines train):
  ordinary trainable Keras layers, no biases on Dense/Conv2D, He-normal
  initialisation from ``seed``; ``builder(input_shape, num_classes, width=1.0, seed=0)``;
* **binarized** (``PAPER_BINARY_BUILDERS``): :class:`~fedmask_tff.models.binarized.BinaryConv2D` /
  :class:`~fedmask_tff.models.binarized.BinaryDense` in place of Conv2D/Dense. Only for
  ``vgg16`` and ``har_mlp``: there is no binarized LSTM layer, so
  ``shakespeare_lstm`` has no BNN counterpart.

Every version outputs ``[batch, num_classes]`` logits. ``width`` scales every
hidden layer's channels/units (``max(1, round(c * width))``; the output layer
keeps ``num_classes``); ``width=0.125`` gives models small enough for CI. Weight
layer ``i`` (0-based, in order) draws from ``seed + 1000 * i``, as in
:mod:`fedmask_tff.models.basic`, so the same arguments give the same W in every
process.

Architectures
-------------

``vgg16`` (CIFAR-10 ``[32, 32, 3]``; also ``[28, 28, 1]``): the VGG-16 feature
stack (Simonyan & Zisserman 2015, configuration D) -- thirteen 3x3 convolutions
``64,64,M,128,128,M,256,256,256,M,512,512,512,M,512,512,512,M`` ("same"
padding, ReLU, 2x2 max-pool at each M) -- followed by the compact classifier
of the common CIFAR VGG-16 (``fc 512 - fc 512 - fc classes``, as in
chengyangfu/pytorch-vgg-cifar10 and the pruning literature's "VGG-16 for
CIFAR", there with dropout) instead of ImageNet's 4096-4096-1000. No batch
norm, no dropout and no biases: the masked version masks a randomly
initialised, frozen VGG (as the paper does), and the dense/binarized ones keep
the same layers (``batch_norm=True`` adds BatchNorm after each conv in the
dense/binarized versions only, for baselines that need it at depth 16; off by
default). Pooling uses ``padding="same"``, so 28x28 inputs go
28-14-7-4-2-1 (32x32: 32-16-8-4-2-1) and the flattened feature has
``512 * width`` entries either way; a pool is skipped when the feature map is
already 1x1 (inputs smaller than 17x17). 16 weight layers; the paper's
one-shot pruning thins the last 8 (``PRUNE_LAST_LAYERS``): conv9..conv13 and
the three FC layers.

``har_mlp`` (UCI-HAR ``[128, 9]`` raw inertial windows): flatten (1152) -
fc 1024 (ReLU) - fc 512 (ReLU) - fc classes: the paper's 3-layer fully
connected network. Its text gives no hidden sizes; 1024-512 is inferred from its
Table 5: on the 561 features of the published UCI-HAR layout, 561-1024-512-6
has 1,103,366 float32 parameters = 4.41 MB, exactly the table's HAR "Baseline".
Pruning: the last 2 layers.

``shakespeare_lstm`` (int32 ``[seq_len]`` character ids, vocabulary 90, id 0
= PAD, see :mod:`fedmask_tff.data.shakespeare`): embedding 8 - LSTM 256
(all steps) - LSTM 256 (last step) - fc 256 (ReLU) - fc 128 (ReLU) - fc
vocab (logits over the 90 characters for the next character). The embedding
size (8) is not scaled by ``width``; the LSTMs and the two hidden FC layers
are. In the masked model the embedding is frozen and random (not masked, a
fixed function of ``seed``: not trained, not communicated) and the LSTMs are
:class:`~fedmask_tff.masks.lstm.MaskedLSTM` (frozen zero bias with forget-gate bias
1; ``masked_gates`` selects the masked gates, default all four, note that
FedMask's client loop only trains the scores); in the dense model the
embedding is trainable and the LSTMs are Keras ``LSTM`` (Glorot-uniform /
orthogonal init, trainable bias with ``unit_forget_bias``). PAD has its own
embedding vector (no Keras masking): contexts are left-padded, so the LSTM
reads the PADs first and the real characters last. Pruning: the last 2
layers (fc2, fc3).

Parameter counts: masked (= mask bits) elements, i.e. the Dense/Conv2D/LSTM
kernels, the same in all versions (:func:`model_size_report`; flattened
feature ``512 * width`` for both 32x32 and 28x28 VGG inputs, the figures are
for 32x32x3 / 10 classes, ``[128, 9]`` / 6 classes, ``[80]`` / 90 classes):

=================  ==========  ===========
model              width 1     width 0.125
=================  ==========  ===========
vgg16              15,239,872  238,872
har_mlp            1,707,008   156,032
shakespeare_lstm   904,448     16,288
=================  ==========  ===========

``shakespeare_lstm`` has 720 embedding weights and ``2 * 4 * units`` LSTM
biases besides (2,768 at width 1, 976 at width 0.125), frozen in the masked
model, trained in the dense one.

(the exact figures are asserted in ``tests/unit/test_paper_models.py``).
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import tensorflow as tf

from fedmask_tff.models.binarized import BinaryConv2D, BinaryDense, ClippedHeNormal
from fedmask_tff.masks.layers import MaskedConv2D, MaskedDense, mask_variables
from fedmask_tff.masks.lstm import MaskedLSTM
from fedmask_tff.models.basic import scaled

# The number of last masked layers one-shot pruning thins, per model (the paper's setup).
PRUNE_LAST_LAYERS = {"vgg16": 8, "vgg16_paper": 8, "har_mlp": 2, "shakespeare_lstm": 2}

# VGG-16 (configuration D) feature stack: conv channels, "M" = 2x2 max-pool.
VGG16_FEATURES = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
                  512, 512, 512, "M", 512, 512, 512, "M")
VGG16_CLASSIFIER = (512, 512)  # hidden FC units; then fc(num_classes)

# 1024-512: with the 561 features of the published UCI-HAR layout, 561-1024-512-6 has 1,103,366
# parameters = 4.41 MB in float32, exactly the "Baseline" size of HAR in the paper's Table 5.
HAR_HIDDEN = (1024, 512)

SHAKESPEARE_VOCAB_SIZE = 90  # fedmask_tff.data.shakespeare.VOCAB_SIZE (ids 0..89, 0 = PAD)
SHAKESPEARE_EMBEDDING_DIM = 8
SHAKESPEARE_LSTM_UNITS = (256, 256)
SHAKESPEARE_HIDDEN = (256, 128)  # hidden FC units; then fc(vocab)

SEED_STRIDE = 1000


@tf.keras.utils.register_keras_serializable(package="fedmask_tff")
class StatelessNormalInitializer(tf.keras.initializers.Initializer):
  """``stddev * N(0, 1)`` from an integer seed (stateless: same values in every process).

  Used for the Shakespeare embedding (frozen in the masked model, the starting
  point in the dense one).
  """

  def __init__(self, seed: int = 0, stddev: float = 1.0):
    self.seed = int(seed)
    self.stddev = float(stddev)

  def __call__(self, shape, dtype=None, **kwargs):
    seed = tf.constant([self.seed, 0xE3B], dtype=tf.int64)
    return self.stddev * tf.random.stateless_normal(tuple(int(d) for d in shape), seed=seed,
                                                    dtype=dtype or tf.float32)

  def get_config(self):
    return {"seed": self.seed, "stddev": self.stddev}


def vgg_plan(input_shape, width: float):
  """``[("conv", channels) | ("pool", None)]``: the feature stack for this input size.

  Pools use "same" padding (ceil(n / 2)); a pool is dropped when the map is already 1x1.
  """
  if len(input_shape) != 3:
    raise ValueError(f"vgg16 expects input_shape [height, width, channels], got {input_shape}")
  h, w = int(input_shape[0]), int(input_shape[1])
  plan = []
  for item in VGG16_FEATURES:
    if item == "M":
      if h == 1 and w == 1:
        continue
      h, w = math.ceil(h / 2), math.ceil(w / 2)
      plan.append(("pool", None))
    else:
      plan.append(("conv", scaled(item, width)))
  return plan


def _pool():
  return tf.keras.layers.MaxPool2D(2, padding="same")


def build_vgg16(input_shape=(32, 32, 3), num_classes: int = 10, width: float = 1.0,
                seed: int = 0, mask_mode: str = "ste", score_init: float = 0.05,
                kernel_init: str = "signed_constant") -> tf.keras.Model:
  """Masked VGG-16 (13 masked conv3x3 + 3 masked FC, no BN, no bias); returns logits.

  Layers ``conv1..conv13``, ``fc1..fc3``; layer ``i`` draws W from ``seed + 1000 * i``.
  """
  common = dict(mask_mode=mask_mode, score_init=score_init, kernel_init=kernel_init)
  layers = [tf.keras.Input(shape=input_shape, dtype=tf.float32)]
  i = 0
  for kind, channels in vgg_plan(input_shape, width):
    if kind == "pool":
      layers.append(_pool())
      continue
    layers.append(MaskedConv2D(channels, 3, activation="relu", seed=seed + SEED_STRIDE * i,
                               name=f"conv{i + 1}", **common))
    i += 1
  layers.append(tf.keras.layers.Flatten())
  for j, units in enumerate(VGG16_CLASSIFIER):
    layers.append(MaskedDense(scaled(units, width), activation="relu",
                              seed=seed + SEED_STRIDE * (i + j), name=f"fc{j + 1}", **common))
  layers.append(MaskedDense(num_classes, seed=seed + SEED_STRIDE * (i + 2), name="fc3", **common))
  return tf.keras.Sequential(layers, name="masked_vgg16")


def _vgg16_trainable(conv_cls, dense_cls, init_fn, name, input_shape, num_classes, width,
                     batch_norm, **conv_kwargs):
  layers = [tf.keras.Input(shape=input_shape, dtype=tf.float32)]
  i = 0
  for kind, channels in vgg_plan(input_shape, width):
    if kind == "pool":
      layers.append(_pool())
      continue
    act = None if batch_norm else "relu"
    layers.append(conv_cls(channels, 3, padding="same", activation=act,
                           kernel_initializer=init_fn(SEED_STRIDE * i), name=f"conv{i + 1}",
                           **conv_kwargs))
    if batch_norm:
      layers.append(tf.keras.layers.BatchNormalization(name=f"bn{i + 1}"))
      layers.append(tf.keras.layers.ReLU(name=f"relu{i + 1}"))
    i += 1
  layers.append(tf.keras.layers.Flatten())
  for j, units in enumerate(VGG16_CLASSIFIER):
    layers.append(dense_cls(scaled(units, width), activation="relu",
                            kernel_initializer=init_fn(SEED_STRIDE * (i + j)), name=f"fc{j + 1}",
                            **conv_kwargs))
  layers.append(dense_cls(num_classes, kernel_initializer=init_fn(SEED_STRIDE * (i + 2)),
                          name="fc3", **conv_kwargs))
  return tf.keras.Sequential(layers, name=name)


def build_reference_vgg16(input_shape=(32, 32, 3), num_classes: int = 10, width: float = 1.0,
                          seed: int = 0, batch_norm: bool = False) -> tf.keras.Model:
  """The dense, trainable counterpart of :func:`build_vgg16` (same shapes and names, no bias).

  ``batch_norm=True`` inserts BatchNorm + ReLU after every convolution (extra
  trainable and non-trainable variables; off by default, to keep the masked
  model's layers).
  """
  init = lambda offset: tf.keras.initializers.HeNormal(seed=seed + offset)  # noqa: E731
  return _vgg16_trainable(tf.keras.layers.Conv2D, tf.keras.layers.Dense, init, "reference_vgg16",
                          input_shape, num_classes, width, batch_norm, use_bias=False)


def build_binary_vgg16(input_shape=(32, 32, 3), num_classes: int = 10, width: float = 1.0,
                       seed: int = 0, batch_norm: bool = False) -> tf.keras.Model:
  """The binarized counterpart of :func:`build_reference_vgg16` (signs of the same He draw)."""
  init = lambda offset: ClippedHeNormal(seed=seed + offset)  # noqa: E731
  return _vgg16_trainable(BinaryConv2D, BinaryDense, init, "binary_vgg16",
                          input_shape, num_classes, width, batch_norm)


def build_har_mlp(input_shape=(128, 9), num_classes: int = 6, width: float = 1.0,
                  seed: int = 0, mask_mode: str = "ste", score_init: float = 0.05,
                  kernel_init: str = "signed_constant") -> tf.keras.Model:
  """Masked 3-layer FC net for UCI-HAR: flatten - fc 1024 - fc 512 - fc classes (logits)."""
  common = dict(mask_mode=mask_mode, score_init=score_init, kernel_init=kernel_init)
  layers = [tf.keras.Input(shape=input_shape, dtype=tf.float32), tf.keras.layers.Flatten()]
  for i, units in enumerate(HAR_HIDDEN):
    layers.append(MaskedDense(scaled(units, width), activation="relu",
                              seed=seed + SEED_STRIDE * i, name=f"fc{i + 1}", **common))
  layers.append(MaskedDense(num_classes, seed=seed + SEED_STRIDE * len(HAR_HIDDEN),
                            name=f"fc{len(HAR_HIDDEN) + 1}", **common))
  return tf.keras.Sequential(layers, name="masked_har_mlp")


def _har_trainable(dense_cls, init_fn, name, input_shape, num_classes, width, **kwargs):
  layers = [tf.keras.Input(shape=input_shape, dtype=tf.float32), tf.keras.layers.Flatten()]
  for i, units in enumerate(HAR_HIDDEN):
    layers.append(dense_cls(scaled(units, width), activation="relu",
                            kernel_initializer=init_fn(SEED_STRIDE * i), name=f"fc{i + 1}",
                            **kwargs))
  layers.append(dense_cls(num_classes, kernel_initializer=init_fn(SEED_STRIDE * len(HAR_HIDDEN)),
                          name=f"fc{len(HAR_HIDDEN) + 1}", **kwargs))
  return tf.keras.Sequential(layers, name=name)


def build_reference_har_mlp(input_shape=(128, 9), num_classes: int = 6, width: float = 1.0,
                            seed: int = 0) -> tf.keras.Model:
  """The dense, trainable counterpart of :func:`build_har_mlp` (same shapes, no bias)."""
  init = lambda offset: tf.keras.initializers.HeNormal(seed=seed + offset)  # noqa: E731
  return _har_trainable(tf.keras.layers.Dense, init, "reference_har_mlp", input_shape,
                        num_classes, width, use_bias=False)


def build_binary_har_mlp(input_shape=(128, 9), num_classes: int = 6, width: float = 1.0,
                         seed: int = 0) -> tf.keras.Model:
  """The binarized counterpart of :func:`build_reference_har_mlp`."""
  init = lambda offset: ClippedHeNormal(seed=seed + offset)  # noqa: E731
  return _har_trainable(BinaryDense, init, "binary_har_mlp", input_shape, num_classes, width)


def _check_sequence_input(input_shape):
  if len(input_shape) != 1:
    raise ValueError(f"shakespeare_lstm expects input_shape [seq_len], got {input_shape}")


def build_shakespeare_lstm(input_shape=(80,), num_classes: int = SHAKESPEARE_VOCAB_SIZE,
                           width: float = 1.0, seed: int = 0, mask_mode: str = "ste",
                           score_init: float = 0.05, kernel_init: str = "signed_constant",
                           vocab_size: int = SHAKESPEARE_VOCAB_SIZE,
                           masked_gates: str = "ifco") -> tf.keras.Model:
  """Masked next-character model: frozen embedding 8 - MaskedLSTM x2 - masked fc x3 (logits).

  Input int32 ``[batch, seq_len]`` ids in ``[0, vocab_size)``; output
  ``[batch, num_classes]``. Layer ``i`` (embedding 0, lstm1 1, lstm2 2, fc1..fc3
  3..5) draws from ``seed + 1000 * i``.
  """
  _check_sequence_input(input_shape)
  common = dict(mask_mode=mask_mode, score_init=score_init, kernel_init=kernel_init)
  u1, u2 = (scaled(u, width) for u in SHAKESPEARE_LSTM_UNITS)
  h1, h2 = (scaled(u, width) for u in SHAKESPEARE_HIDDEN)
  return tf.keras.Sequential([
      tf.keras.Input(shape=input_shape, dtype=tf.int32),
      tf.keras.layers.Embedding(vocab_size, SHAKESPEARE_EMBEDDING_DIM, trainable=False,
                                embeddings_initializer=StatelessNormalInitializer(seed),
                                name="embedding"),
      MaskedLSTM(u1, return_sequences=True, masked_gates=masked_gates, unit_forget_bias=True,
                 seed=seed + SEED_STRIDE, name="lstm1", **common),
      MaskedLSTM(u2, masked_gates=masked_gates, unit_forget_bias=True,
                 seed=seed + 2 * SEED_STRIDE, name="lstm2", **common),
      MaskedDense(h1, activation="relu", seed=seed + 3 * SEED_STRIDE, name="fc1", **common),
      MaskedDense(h2, activation="relu", seed=seed + 4 * SEED_STRIDE, name="fc2", **common),
      MaskedDense(num_classes, seed=seed + 5 * SEED_STRIDE, name="fc3", **common),
  ], name="masked_shakespeare_lstm")


def build_reference_shakespeare_lstm(input_shape=(80,), num_classes: int = SHAKESPEARE_VOCAB_SIZE,
                                     width: float = 1.0, seed: int = 0,
                                     vocab_size: int = SHAKESPEARE_VOCAB_SIZE) -> tf.keras.Model:
  """The dense, trainable counterpart of :func:`build_shakespeare_lstm` (same kernel shapes).

  Trainable embedding (same initial values as the masked model's frozen one),
  Keras LSTMs (with their usual trainable bias, ``unit_forget_bias``), FC
  layers without bias.
  """
  _check_sequence_input(input_shape)
  u1, u2 = (scaled(u, width) for u in SHAKESPEARE_LSTM_UNITS)
  h1, h2 = (scaled(u, width) for u in SHAKESPEARE_HIDDEN)
  he = lambda offset: tf.keras.initializers.HeNormal(seed=seed + offset)  # noqa: E731

  def lstm(units, offset, name, return_sequences=False):
    return tf.keras.layers.LSTM(
        units, return_sequences=return_sequences, unit_forget_bias=True,
        kernel_initializer=tf.keras.initializers.GlorotUniform(seed=seed + offset),
        recurrent_initializer=tf.keras.initializers.Orthogonal(seed=seed + offset + 1),
        name=name)

  return tf.keras.Sequential([
      tf.keras.Input(shape=input_shape, dtype=tf.int32),
      tf.keras.layers.Embedding(vocab_size, SHAKESPEARE_EMBEDDING_DIM,
                                embeddings_initializer=StatelessNormalInitializer(seed),
                                name="embedding"),
      lstm(u1, SEED_STRIDE, "lstm1", return_sequences=True),
      lstm(u2, 2 * SEED_STRIDE, "lstm2"),
      tf.keras.layers.Dense(h1, activation="relu", use_bias=False,
                            kernel_initializer=he(3 * SEED_STRIDE), name="fc1"),
      tf.keras.layers.Dense(h2, activation="relu", use_bias=False,
                            kernel_initializer=he(4 * SEED_STRIDE), name="fc2"),
      tf.keras.layers.Dense(num_classes, use_bias=False, kernel_initializer=he(5 * SEED_STRIDE),
                            name="fc3"),
  ], name="reference_shakespeare_lstm")


PAPER_MODEL_BUILDERS = {
    "vgg16": build_vgg16,
    "har_mlp": build_har_mlp,
    "shakespeare_lstm": build_shakespeare_lstm,
}
PAPER_DENSE_BUILDERS = {
    "vgg16": build_reference_vgg16,
    "har_mlp": build_reference_har_mlp,
    "shakespeare_lstm": build_reference_shakespeare_lstm,
}
# No "shakespeare_lstm": there is no binarized LSTM layer.
PAPER_BINARY_BUILDERS = {
    "vgg16": build_binary_vgg16,
    "har_mlp": build_binary_har_mlp,
}

# The paper's model for each dataset name of fedmask_tff.data.registry ("cnn" is models.build_cnn).
DEFAULT_MODEL_FOR_DATASET = {
    "cifar10": "vgg16",
    "har": "har_mlp",
    "har_features": "har_mlp",
    "shakespeare": "shakespeare_lstm",
    "shakespeare_leaf": "shakespeare_lstm",
    "shakespeare_h5": "shakespeare_lstm",
    "femnist_leaf": "cnn",
    "emnist": "cnn",
    "fashion_mnist": "cnn",
}


# --- Model size (the paper's Table 5) ------------------------------------------------------------


def _one_bit_tensors(model: tf.keras.Model) -> list:
  """The weight tensors a 1-bit-per-element representation covers, as element counts.

  Masked models: every masked weight (a mask bit each). Other models: the
  multiply-add kernels (Dense/Conv2D kernels, LSTM kernel and recurrent kernel),
  i.e. what the masked counterpart masks (or a BNN sends as signs).
  """
  kernels, _, _ = mask_variables(model)
  if kernels:
    return [int(np.prod(k.shape)) for k in kernels]
  out = []

  def visit(layer):
    for sub in getattr(layer, "layers", None) or []:
      visit(sub)
    if isinstance(layer, (tf.keras.layers.Dense, tf.keras.layers.Conv2D)):
      out.append(int(np.prod(layer.kernel.shape)))
    cell = getattr(layer, "cell", None)
    if cell is not None and hasattr(cell, "recurrent_kernel"):
      out.append(int(np.prod(cell.kernel.shape)))
      out.append(int(np.prod(cell.recurrent_kernel.shape)))

  for layer in model.layers:
    visit(layer)
  return out


def model_size_report(model: tf.keras.Model) -> dict:
  """Sizes for the paper's Table 5: the float32 model against its 1-bit masks.

  Returns a dict:

  * ``parameters``: elements of the network's weights as a dense model has
    them (masked models: the frozen W, frozen biases and embedding, real LSTM
    gates; *not* the mask scores and keeps, which are training state);
  * ``float32_bytes``: ``4 * parameters`` (the dense model on the wire / on disk);
  * ``mask_parameters``: elements covered by a 1-bit mask (masked models: the
    masked weights; other models: their Dense/Conv2D/LSTM kernels, i.e. what
    the masked counterpart masks);
  * ``mask_bytes``: the bit-packed masks, ``sum(ceil(n_i / 8))`` over the
    tensors (what a FedMask client uploads; also the bytes of BNN signs);
  * ``other_parameters``, ``other_float32_bytes``: the weights outside the
    masks (biases, embedding, ...);
  * ``compression``: ``float32_bytes / mask_bytes``.
  """
  scores = {id(v) for v in mask_variables(model)[1]} | {id(v) for v in mask_variables(model)[2]}
  parameters = sum(int(np.prod(v.shape)) for v in model.weights if id(v) not in scores
                   and "moving_" not in v.name)
  one_bit = _one_bit_tensors(model)
  mask_parameters = sum(one_bit)
  mask_bytes = sum((n + 7) // 8 for n in one_bit)
  other = parameters - mask_parameters
  return {
      "parameters": parameters,
      "float32_bytes": 4 * parameters,
      "mask_parameters": mask_parameters,
      "mask_bytes": mask_bytes,
      "other_parameters": other,
      "other_float32_bytes": 4 * other,
      "compression": (4 * parameters / mask_bytes) if mask_bytes else math.inf,
  }


def prune_last_layers_for(model_name: str, default: Optional[int] = None) -> int:
  """``PRUNE_LAST_LAYERS[model_name]``, or ``default`` (error if neither)."""
  if model_name in PRUNE_LAST_LAYERS:
    return PRUNE_LAST_LAYERS[model_name]
  if default is None:
    raise KeyError(f"no paper pruning setting for model {model_name!r}; "
                   f"known: {sorted(PRUNE_LAST_LAYERS)}")
  return int(default)
