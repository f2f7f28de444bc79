"""A small numpy IR of a feed-forward model, structural compaction, and plain Keras rebuilds.

:func:`from_keras` turns a (masked, dense or binarized) sequential Keras model
into a list of :class:`Op` with the *effective* float weights (``W * m`` for
masked layers, ``sign(latent) * scale`` for binarized ones). :func:`to_keras`
rebuilds a plain ``Conv2D``/``Dense`` model from it: plain builtin layers that
convert to builtin TFLite ops. :func:`compact` removes the output
channels/neurons that are provably dead or unused, exactly (same outputs).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np
import tensorflow as tf

from fedmask_tff.masks.layers import MaskedConv2D, MaskedDense

_PASS_THROUGH = (tf.keras.layers.MaxPool2D, tf.keras.layers.AveragePooling2D,
                 tf.keras.layers.Dropout)


@dataclasses.dataclass
class Op:
  kind: str  # "conv" | "dense" | "flatten" | "layer" (a weightless Keras layer, kept as config)
  name: str
  w: Optional[np.ndarray] = None
  b: Optional[np.ndarray] = None
  activation: str = "linear"
  strides: tuple = (1, 1)
  padding: str = "same"
  layer_class: Optional[type] = None
  layer_config: Optional[dict] = None
  in_shape: Optional[tuple] = None  # per-example input shape (flatten needs it)


def _activation_name(layer) -> str:
  act = tf.keras.activations.serialize(layer.activation)
  return act if isinstance(act, str) else act.get("config", {}).get("name", str(act))


def _effective_kernel(layer, mask) -> np.ndarray:
  from fedmask_tff.models import binarized
  if isinstance(layer, (MaskedConv2D, MaskedDense)):
    m = layer.binary_masks()[0].numpy() if mask is None else np.asarray(mask, np.float32)
    return (layer.kernel.numpy() * m).astype(np.float32)
  if isinstance(layer, (binarized.BinaryDense, binarized.BinaryConv2D)):
    return layer.binary_kernel().numpy().astype(np.float32)
  return layer.kernel.numpy().astype(np.float32)


def from_keras(model: tf.keras.Model, masks=None) -> tuple[list[Op], tuple]:
  """``(ops, input_shape)`` of a sequential model; ``masks`` overrides masked layers' masks."""
  ops, mi = [], 0
  for layer in model.layers:
    in_shape = tuple(int(d) for d in layer.input_shape[1:])
    if isinstance(layer, (MaskedConv2D, MaskedDense)):
      mask = None if masks is None else masks[mi]
      mi += 1
    else:
      mask = None
    bias = getattr(layer, "bias", None)
    b = None if bias is None else bias.numpy().astype(np.float32)
    if isinstance(layer, (MaskedConv2D, tf.keras.layers.Conv2D)):
      if getattr(layer, "dilation_rate", (1, 1)) != (1, 1) or getattr(layer, "groups", 1) != 1:
        raise ValueError(f"layer {layer.name}: dilated/grouped convolutions are not supported")
      ops.append(Op("conv", layer.name, _effective_kernel(layer, mask), b, _activation_name(layer),
                    tuple(layer.strides), layer.padding.lower(), in_shape=in_shape))
    elif isinstance(layer, (MaskedDense, tf.keras.layers.Dense)):
      if len(in_shape) != 1:
        raise ValueError(f"layer {layer.name}: Dense on rank-{len(in_shape) + 1} input unsupported")
      ops.append(Op("dense", layer.name, _effective_kernel(layer, mask), b,
                    _activation_name(layer), in_shape=in_shape))
    elif isinstance(layer, tf.keras.layers.Flatten):
      ops.append(Op("flatten", layer.name, in_shape=in_shape))
    elif isinstance(layer, (*_PASS_THROUGH, tf.keras.layers.Activation, tf.keras.layers.ReLU)):
      ops.append(Op("layer", layer.name, layer_class=type(layer), layer_config=layer.get_config(),
                    in_shape=in_shape))
    else:
      raise ValueError(f"layer {layer.name} ({type(layer).__name__}) is not supported by the exporter")
  if masks is not None and mi != len(masks):
    raise ValueError(f"{len(masks)} masks given, the model has {mi} masked layers")
  input_shape = tuple(int(d) for d in model.input_shape[1:])
  return ops, input_shape


def to_keras(ops: list[Op], input_shape, name: str = "exported") -> tf.keras.Model:
  """A plain Keras model (Conv2D/Dense/pooling/Flatten) computing the IR."""
  inputs = tf.keras.Input(shape=input_shape, dtype=tf.float32, name="image")
  x, weights = inputs, []
  for op in ops:
    if op.kind == "conv":
      kh, kw, _, cout = op.w.shape
      layer = tf.keras.layers.Conv2D(cout, (kh, kw), strides=op.strides, padding=op.padding,
                                     activation=op.activation, use_bias=op.b is not None,
                                     name=op.name)
    elif op.kind == "dense":
      layer = tf.keras.layers.Dense(op.w.shape[-1], activation=op.activation,
                                    use_bias=op.b is not None, name=op.name)
    elif op.kind == "flatten":
      layer = tf.keras.layers.Flatten(name=op.name)
    else:
      layer = op.layer_class.from_config(op.layer_config)
    x = layer(x)
    if op.kind in ("conv", "dense"):
      layer.set_weights([op.w] + ([op.b] if op.b is not None else []))
  return tf.keras.Model(inputs, tf.keras.layers.Activation("linear", name="logits")(x), name=name)


def _zero_preserving(op: Op) -> bool:
  """True if a unit with zero weights and zero bias outputs exactly 0 after the activation."""
  if op.activation in ("linear", "relu", "relu6", "tanh", "elu", "selu", "gelu", "swish",
                       "silu", "leaky_relu", "softsign"):
    return True
  fn = tf.keras.activations.get(op.activation)
  return float(fn(tf.constant([0.0]))[0]) == 0.0


def _weighted(ops):
  return [i for i, op in enumerate(ops) if op.kind in ("conv", "dense")]


def _rows_for_channels(consumer: Op, between: list[Op], channels: int) -> np.ndarray:
  """Index array mapping the consumer's input rows to the producer's channel (last axis)."""
  if consumer.kind == "conv":
    return np.arange(channels)
  if any(op.kind == "flatten" for op in between):
    flat_in = [op for op in between if op.kind == "flatten"][-1].in_shape
    spatial = int(np.prod(flat_in[:-1]))
    return np.tile(np.arange(channels), spatial)
  return np.arange(channels)


def compact(ops: list[Op]) -> tuple[list[Op], dict]:
  """Removes hidden output units that are dead (all-zero weights and bias) or unused by the next
  weighted layer (its input rows all zero), and the matching input rows of the next layer.

  Exact: the rebuilt model computes the same function. Returns ``(new_ops, stats)``
  with, per weighted layer, the units kept / before. Only the channels of the
  last axis flow through pooling, flatten and element-wise layers, so that is
  all this needs; the network's input and output units are never removed.
  """
  ops = [dataclasses.replace(op, w=None if op.w is None else op.w.copy(),
                             b=None if op.b is None else op.b.copy()) for op in ops]
  widx = _weighted(ops)
  before = {ops[i].name: int(ops[i].w.shape[-1]) for i in widx}
  for op in ops:
    if op.kind == "layer" and not issubclass(op.layer_class, _PASS_THROUGH):
      return ops, {"removed_units": 0, "layers": {n: [c, c] for n, c in before.items()},
                   "note": f"layer {op.name} blocks compaction"}
  changed = True
  while changed:
    changed = False
    for a, c in zip(widx[:-1], widx[1:]):
      prod, cons = ops[a], ops[c]
      channels = prod.w.shape[-1]
      rows = _rows_for_channels(cons, ops[a + 1:c], channels)
      cw = cons.w if cons.kind == "dense" else np.moveaxis(cons.w, 2, 0).reshape(cons.w.shape[2], -1)
      if cons.kind == "conv":
        used = np.any(cw != 0, axis=1)
      else:
        used = np.zeros(channels, bool)
        np.logical_or.at(used, rows, np.any(cw != 0, axis=1))
      col_nonzero = np.any(prod.w.reshape(-1, channels) != 0, axis=0)
      if prod.b is not None:
        col_nonzero |= prod.b != 0
      alive = used & (col_nonzero | (not _zero_preserving(prod)))
      if not alive.any():
        alive[0] = True  # keep one unit so every tensor keeps a valid shape
      if alive.all():
        continue
      changed = True
      prod.w = prod.w[..., alive]
      if prod.b is not None:
        prod.b = prod.b[alive]
      keep_rows = alive[rows] if cons.kind == "dense" else alive
      if cons.kind == "dense":
        cons.w = cons.w[keep_rows]
      else:
        cons.w = cons.w[:, :, keep_rows, :]
      _fix_in_shapes(ops, a, c, int(alive.sum()))
  after = {ops[i].name: int(ops[i].w.shape[-1]) for i in widx}
  removed = sum(before[n] - after[n] for n in before)
  return ops, {"removed_units": removed,
               "layers": {n: [after[n], before[n]] for n in before}, "note": ""}


def _fix_in_shapes(ops, a, c, channels):
  for op in ops[a + 1:c]:
    if op.in_shape is not None:
      op.in_shape = op.in_shape[:-1] + (channels,)
  cons = ops[c]
  cons.in_shape = (int(cons.w.shape[0]),) if cons.kind == "dense" else \
      cons.in_shape[:-1] + (channels,)


def weakest_groups_zeroed(ops: list[Op], masks: list, fraction: float) -> list:
  """Masks with, in each hidden weighted layer, the ``fraction`` of output units whose
  ``W * m`` column has the smallest L2 norm set to all-zero (a structured mask for the
  speed demonstration; it is *not* the client's trained model)."""
  widx = _weighted(ops)
  out = [np.array(m, np.float32, copy=True) for m in masks]
  for j, i in enumerate(widx[:-1]):
    w = ops[i].w
    norms = np.sqrt((w.reshape(-1, w.shape[-1]) ** 2).sum(axis=0))
    k = int(np.floor(fraction * w.shape[-1]))
    if k <= 0:
      continue
    weakest = np.argsort(norms, kind="stable")[:k]
    out[j][..., weakest] = 0.0
  return out


def weight_count(ops: list[Op]) -> int:
  return int(sum(op.w.size + (op.b.size if op.b is not None else 0)
                 for op in ops if op.kind in ("conv", "dense")))
