"""Computation cost counted from layer shapes (FLOPs; 1 multiply-add = 2 FLOPs).

``forward_flops_per_example(model)`` walks a built Keras model and counts the
multiply-adds of its matrix products and convolutions (dense and masked
layers alike: here every element of W counts, pruned or not). Element-wise
ops, pooling and activations are left out (they are a few percent of a CNN).
Training is counted as 3x the forward pass (forward, gradient with respect to
the activations, gradient with respect to the weights or mask scores), the
usual convention.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

TRAIN_TO_FORWARD = 3


def _layer_flops(layer) -> int:
  from fedmask_tff.layers import MaskedConv2D, MaskedDense
  out_shape = layer.output_shape if not isinstance(layer.output_shape, list) else layer.output_shape[0]
  if isinstance(layer, (tf.keras.layers.Conv2D, MaskedConv2D)):
    kh, kw, cin, cout = layer.kernel.shape
    _, oh, ow, _ = out_shape
    return 2 * int(oh) * int(ow) * int(kh) * int(kw) * int(cin) * int(cout)
  if isinstance(layer, (tf.keras.layers.Dense, MaskedDense)):
    rows = int(np.prod([d for d in out_shape[1:-1]])) if len(out_shape) > 2 else 1
    n_in, n_out = layer.kernel.shape
    return 2 * rows * int(n_in) * int(n_out)
  cell = getattr(layer, "cell", None)
  if cell is not None and hasattr(cell, "units"):  # LSTM-like: per time step, 4 gates
    in_shape = layer.input_shape if not isinstance(layer.input_shape, list) else layer.input_shape[0]
    steps, features, units = int(in_shape[1]), int(in_shape[-1]), int(cell.units)
    return 2 * steps * (features + units) * 4 * units
  return 0


def forward_flops_per_example(model: tf.keras.Model) -> int:
  """FLOPs of one example's forward pass through ``model`` (must be built)."""
  total = 0
  for layer in model.layers:
    if hasattr(layer, "layers") and layer.layers:
      total += forward_flops_per_example(layer)
    else:
      total += _layer_flops(layer)
  return total


def train_flops_per_example(model: tf.keras.Model) -> int:
  return TRAIN_TO_FORWARD * forward_flops_per_example(model)
