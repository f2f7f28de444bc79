"""One-shot pruning of FedMask: keep the top ``p_r`` of elements by ``|W * m_r|``.

A client prunes once, after its first local epoch, in the last ``L`` masked
weights of the model (the classifier part). In each pruned weight tensor of
``n`` elements it keeps exactly ``k = max(1, round(p_r * n))`` elements: those
with the largest ``|W * m_r|`` (ties broken by position, lowest index first).
Everything else is fixed to 0 for good (``keep = 0``).

:func:`top_magnitude_keep` is the rule on one tensor (the FedMask process calls it in its
client work); :func:`prune_model` applies it to a plain Keras model's last masked layers.
Plain Keras (2 or 3), no TFF.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from fedmask_tff.masks.layers import masked_layers


def check_prune_rate(prune_rate: float) -> float:
  prune_rate = float(prune_rate)
  if not (0.0 < prune_rate <= 1.0) or math.isnan(prune_rate):
    raise ValueError(f"prune_rate (the fraction kept) must be in (0, 1], got {prune_rate}")
  return prune_rate


def kept_count(num_elements: int, prune_rate: float) -> int:
  """How many of ``num_elements`` one-shot pruning keeps."""
  return max(1, int(round(check_prune_rate(prune_rate) * int(num_elements))))


def top_magnitude_keep(kernel: tf.Tensor, scores: tf.Tensor, prune_rate: float) -> tf.Tensor:
  """0/1 float32 tensor shaped like ``kernel``: 1 at the top ``k`` of ``|kernel * scores|``.

  ``kernel`` and ``scores`` must have the same, fully known shape (no broadcasting).
  """
  kernel, scores = tf.convert_to_tensor(kernel), tf.convert_to_tensor(scores)
  if not kernel.shape.is_fully_defined() or kernel.shape != scores.shape:
    raise ValueError(f"pruning needs a kernel and scores of the same known shape, got kernel "
                     f"{kernel.shape} and scores {scores.shape}")
  n = int(kernel.shape.num_elements())
  k = kept_count(n, prune_rate)
  magnitude = tf.reshape(tf.abs(kernel * scores), [-1])
  _, idx = tf.math.top_k(magnitude, k=k, sorted=False)
  flat = tf.scatter_nd(tf.expand_dims(idx, 1), tf.ones([k], tf.float32), [n])
  return tf.reshape(flat, kernel.shape)


def prunable_flags(model: tf.keras.Model, last_layers: int) -> list[bool]:
  """One flag per masked weight of ``model`` (``layers.mask_variables`` order): True for the
  weights of its last ``last_layers`` masked layers (an LSTM counts as one layer)."""
  layers = masked_layers(model)
  if not layers:
    raise ValueError(f"model {model.name!r} has no masked layers")
  if isinstance(last_layers, bool) or int(last_layers) != last_layers or last_layers < 0:
    raise ValueError(f"last_layers must be an integer >= 0, got {last_layers!r}")
  if last_layers > len(layers):
    raise ValueError(f"last_layers={last_layers} but the model has only {len(layers)} masked "
                     f"layers")
  first_pruned = len(layers) - int(last_layers)
  return [i >= first_pruned for i, layer in enumerate(layers) for _ in layer.masked_weights]


def prune_model(model: tf.keras.Model, prune_rate: float = 0.2, last_layers: int = 2) -> list[int]:
  """One-shot pruning of a Keras model with masked layers, in place (FedMask's rule).

  In each masked weight of the last ``last_layers`` masked layers, sets ``keep`` to 1 at the
  top ``kept_count(n, prune_rate)`` elements of ``|W * m_r|`` (the current scores) and 0
  elsewhere, for good. Call it once, after the first epoch of mask training.

  Returns:
    The number of elements kept in each pruned weight (in ``mask_variables`` order).

  Raises:
    ValueError: a bad ``prune_rate``/``last_layers``, or a weight that is pruned already.
  """
  check_prune_rate(prune_rate)
  flags = prunable_flags(model, last_layers)
  weights = [w for layer in masked_layers(model) for w in layer.masked_weights]
  kept = []
  for (name, kernel, scores, keep), prunable in zip(weights, flags):
    if not prunable:
      continue
    if not np.all(keep.numpy() == 1):
      raise ValueError(f"masked weight {name!r} ({kernel.shape}) is pruned already: one-shot "
                       f"pruning runs once, on a model whose keep masks are all ones")
    new_keep = top_magnitude_keep(kernel, scores, prune_rate)
    keep.assign(new_keep)
    kept.append(int(np.sum(new_keep.numpy())))
  return kept
