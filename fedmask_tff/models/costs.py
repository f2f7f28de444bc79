"""Computation cost counted from layer shapes (FLOPs; 1 multiply-add = 2 FLOPs).

``forward_flops_per_example(model)`` walks a built Keras model and counts the
multiply-adds of its matrix products and convolutions (dense and masked
layers alike: here every element of W counts, pruned or not). Element-wise
ops, pooling and activations are left out (they are a few percent of a CNN).
Training is counted as 3x the forward pass (forward, gradient with respect to
the activations, gradient with respect to the weights or mask scores), the
usual convention. Those two give the *dense* figure (benchmarks use it for
throughput against the machine's peak).

What runs report as ``train_flops`` comes from the per-weight counter below
(:func:`weight_costs`, :func:`train_flops`): the same counter for every
algorithm, counting only the multiply-adds a sparse or pruned mask needs and
only the weight gradients of elements that can still change.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np
import tensorflow as tf

TRAIN_TO_FORWARD = 3


def _layer_flops(layer) -> int:
  from fedmask_tff.masks.layers import MaskedConv2D, MaskedDense
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


# --- Per-weight accounting: what a sparse or pruned mask really needs ----------------------------


@dataclasses.dataclass(frozen=True)
class WeightCost:
  """One weight tensor of a model, as the FLOP counter sees it.

  Attributes:
    name: the weight's name (``layer/kernel``).
    positions: how many times per example each element is used in a
      multiply-add: ``oh * ow`` for a convolution kernel, the number of rows
      for a dense kernel (1 for a plain ``[batch, features]`` input), the
      number of time steps for an LSTM kernel or recurrent kernel.
    elements: the tensor's element count.
    first: whether it consumes the model's input directly (then no gradient
      with respect to that input is needed).
  """
  name: str
  positions: int
  elements: int
  first: bool


def weight_costs(model: tf.keras.Model) -> list[WeightCost]:
  """The multiply-add weights of a built model (Dense, Conv2D, LSTM; masked or not), in order.

  For masked layers the order is that of ``layer.masked_weights`` (the order of
  :func:`fedmask_tff.algorithms.fedmask.process.mask_specs`); biases are left out (element-wise).
  """
  from fedmask_tff.masks.layers import MaskedConv2D, MaskedDense

  out: list[WeightCost] = []

  def visit(layer):
    if hasattr(layer, "layers") and layer.layers:
      for sub in layer.layers:
        visit(sub)
      return
    if isinstance(layer, tf.keras.layers.Embedding):
      out.append(WeightCost(f"{layer.name}/embeddings", 0, int(np.prod(layer.embeddings.shape)), True))
      return
    out_shape = layer.output_shape if not isinstance(layer.output_shape, list) else layer.output_shape[0]
    if isinstance(layer, (tf.keras.layers.Conv2D, MaskedConv2D)):
      _, oh, ow, _ = out_shape
      out.append(WeightCost(f"{layer.name}/kernel", int(oh) * int(ow),
                            int(np.prod(layer.kernel.shape)), not out))
      return
    if isinstance(layer, (tf.keras.layers.Dense, MaskedDense)):
      rows = int(np.prod([d for d in out_shape[1:-1]])) if len(out_shape) > 2 else 1
      out.append(WeightCost(f"{layer.name}/kernel", rows, int(np.prod(layer.kernel.shape)), not out))
      return
    cell = getattr(layer, "cell", None)
    if cell is not None and hasattr(cell, "units"):
      in_shape = layer.input_shape if not isinstance(layer.input_shape, list) else layer.input_shape[0]
      steps, features, units = int(in_shape[1]), int(in_shape[-1]), int(cell.units)
      first = not out
      out.append(WeightCost(f"{layer.name}/kernel", steps, features * 4 * units, first))
      out.append(WeightCost(f"{layer.name}/recurrent_kernel", steps, units * 4 * units, False))

  visit(model)
  # Embedding lookups are not multiply-adds; the layer after an embedding needs its input gradient.
  return [w for w in out if w.positions > 0] if not (out and out[0].positions == 0) else \
      [dataclasses.replace(w, first=False) for w in out if w.positions > 0]


def forward_flops(weights: Sequence[WeightCost], nonzeros: Optional[Sequence] = None):
  """FLOPs of one example's forward pass: ``2 * sum(positions * nonzeros)``.

  ``nonzeros[i]`` is how many elements of weight ``i`` are non-zero in the
  effective weight (W * m for a masked layer); default: all of them. Works on
  Python numbers and on TF tensors (then pass float64 tensors).
  """
  nnz = [w.elements for w in weights] if nonzeros is None else list(nonzeros)
  return 2 * sum(w.positions * n for w, n in zip(weights, nnz))


def train_flops(weights: Sequence[WeightCost], examples, nonzeros: Optional[Sequence] = None,
                trainable: Optional[Sequence] = None):
  """FLOPs of training passes (forward and backward) over ``examples`` examples.

  Per example and weight ``i`` (FLOPs = 2 x multiply-adds):

  * forward: ``positions * nonzeros[i]`` multiply-adds (a zero in W * m needs none);
  * gradient with respect to the layer input: the same, except for the weight
    that reads the model input (nothing to propagate to);
  * gradient with respect to the weight (or the mask scores):
    ``positions * trainable[i]``: only the elements that can still change
    (FedMask: the kept ones; a frozen weight: 0).

  ``nonzeros`` defaults to every element, ``trainable`` to every element.
  A method that runs several passes per example (Per-FedAvg) passes the
  number of example-passes as ``examples``.
  """
  nnz = [w.elements for w in weights] if nonzeros is None else list(nonzeros)
  trn = [w.elements for w in weights] if trainable is None else list(trainable)
  per_example = 2 * sum(w.positions * (n * (1 if w.first else 2) + t)
                        for w, n, t in zip(weights, nnz, trn))
  return per_example * examples
