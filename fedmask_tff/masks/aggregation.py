"""FedMask's personalization-preserving aggregation rule.

Per mask element ``e``, with ``keep[c, e]`` = 1 when client ``c``'s pruning kept ``e``:

* ``count[e] = sum_c keep[c, e]`` and ``total[e] = sum_c masks[c, e] * keep[c, e]``;
* where ``count[e] >= 2`` (at least two clients share the element) every client
  that keeps ``e`` receives the mean ``total[e] / count[e]``;
* where a client keeps ``e`` but fewer than two clients do, its value is unchanged;
* where a client pruned ``e``, its value is 0 (pruned for good).

The rule needs only the two sums, so it splits into a server part
(:func:`mask_sums`, summable, e.g. by secure aggregation) and a client part
(:func:`received`, then :func:`apply_rule`), which each client runs with its own
pruning mask. :func:`aggregate_masks` composes both over stacked masks.

One home: :func:`votes` and :func:`received` are the TensorFlow code the FedMask process runs
(its server votes, its downlink, its late joiners); they take numpy arrays or tensors, and the
numpy helpers here call them, so the tests check the code production runs.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

MIN_SHARED_CLIENTS = 2
UNCHANGED = -1.0  # what a client receives where no average applies: "keep your own value"


def _check_binary(name, array):
  array = np.asarray(array)
  if array.dtype == bool:
    return array.astype(np.float64)
  if not np.issubdtype(array.dtype, np.number):
    raise ValueError(f"{name} must be numeric 0/1, got dtype {array.dtype}")
  if not np.all(np.isfinite(array)):
    raise ValueError(f"{name} contains NaN or infinite values")
  if not np.all((array == 0) | (array == 1)):
    raise ValueError(f"{name} must contain only 0 and 1")
  return array.astype(np.float64)


def mask_sums(masks, keep):
  """Server part: ``(total, count)``, each of shape ``masks.shape[1:]``.

  ``masks`` and ``keep``: 0/1 arrays of shape ``[clients, ...]``.
  """
  masks = _check_binary("masks", masks)
  keep = _check_binary("keep", keep)
  if masks.shape != keep.shape:
    raise ValueError(f"masks {masks.shape} and keep {keep.shape} must have the same shape")
  if masks.ndim < 1:
    raise ValueError("masks need a leading clients dimension")
  return (masks * keep).sum(axis=0), keep.sum(axis=0)


def votes(total, count, min_shared: int = MIN_SHARED_CLIENTS):
  """Per element, ``(v, shared)``: the vote ``v = clip(total / count, 0, 1)`` (0 where no
  client keeps the element) and ``shared = count >= min_shared``. Arrays or tensors of one
  shape in (``total`` may be a debiased estimate); tensors out, in ``total``'s float dtype."""
  total = tf.convert_to_tensor(total)
  if not total.dtype.is_floating:
    total = tf.cast(total, tf.float64)
  count = tf.cast(count, total.dtype)
  return (tf.clip_by_value(tf.math.divide_no_nan(total, count), 0.0, 1.0),
          count >= min_shared)


def received(keep, total, count, min_shared: int = MIN_SHARED_CLIENTS):
  """Client part, step 1: what a client with pruning mask ``keep`` receives per element:
  the vote ``v`` where it keeps an element that at least ``min_shared`` clients keep,
  :data:`UNCHANGED` (-1) elsewhere. ``keep`` may carry a leading clients axis."""
  v, shared = votes(total, count, min_shared)
  keep = tf.cast(keep, v.dtype)
  return tf.where(tf.logical_and(keep > 0, shared), v, tf.constant(UNCHANGED, v.dtype))


def apply_rule(own, keep, total, count, min_shared: int = MIN_SHARED_CLIENTS):
  """Client part: this client's new mask values from the two sums.

  ``own``: the client's current values (any shape S, or ``[clients, *S]``
  broadcasting against ``total``/``count`` of shape S); ``keep``: its 0/1
  pruning mask, shaped like ``own``. Returns float64 values in [0, 1].
  """
  own = np.asarray(own, dtype=np.float64)
  keep = np.asarray(keep, dtype=np.float64)
  value = np.asarray(received(keep, np.asarray(total, np.float64), count, min_shared))
  return np.where(value >= 0, value, own) * keep


def aggregated_positions(keep, count, min_shared: int = MIN_SHARED_CLIENTS):
  """0/1: where a client (``keep``) receives an average instead of keeping its own value."""
  count = np.asarray(count, np.float64)
  return (np.asarray(received(keep, np.zeros_like(count), count, min_shared)) >= 0).astype(np.float64)


def aggregate_masks(masks, keep, min_shared: int = MIN_SHARED_CLIENTS) -> np.ndarray:
  """The whole rule on stacked masks.

  Args:
    masks: 0/1 array ``[clients, ...]``: each client's binary mask.
    keep: 0/1 array of the same shape: each client's pruning mask.
    min_shared: how many clients must keep an element for it to be averaged.

  Returns:
    float64 array ``[clients, ...]``: each client's new mask values.
  """
  total, count = mask_sums(masks, keep)
  return apply_rule(masks, keep, total, count, min_shared)
