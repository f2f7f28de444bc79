"""One-shot pruning of FedMask: keep the top ``p_r`` of elements by ``|W * m_r|``.

A client prunes once, after its first local epoch, in the last ``L`` masked
weights of the model (the classifier part). In each pruned weight tensor of
``n`` elements it keeps exactly ``k = max(1, round(p_r * n))`` elements: those
with the largest ``|W * m_r|`` (ties broken by position, lowest index first).
Everything else is fixed to 0 for good (``keep = 0``).
"""

from __future__ import annotations

import math

import tensorflow as tf


def check_prune_rate(prune_rate: float) -> float:
  prune_rate = float(prune_rate)
  if not (0.0 < prune_rate <= 1.0) or math.isnan(prune_rate):
    raise ValueError(f"prune_rate (the fraction kept) must be in (0, 1], got {prune_rate}")
  return prune_rate


def kept_count(num_elements: int, prune_rate: float) -> int:
  """How many of ``num_elements`` one-shot pruning keeps."""
  return max(1, int(round(check_prune_rate(prune_rate) * int(num_elements))))


def top_magnitude_keep(kernel: tf.Tensor, scores: tf.Tensor, prune_rate: float) -> tf.Tensor:
  """0/1 float32 tensor shaped like ``kernel``: 1 at the top ``k`` of ``|kernel * scores|``."""
  n = int(kernel.shape.num_elements())
  k = kept_count(n, prune_rate)
  magnitude = tf.reshape(tf.abs(kernel * scores), [-1])
  _, idx = tf.math.top_k(magnitude, k=k, sorted=False)
  flat = tf.scatter_nd(tf.expand_dims(idx, 1), tf.ones([k], tf.float32), [n])
  return tf.reshape(flat, kernel.shape)
