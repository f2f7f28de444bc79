"""FedMask's personalization-preserving aggregation rule.

Per mask element ``e``, with ``keep[c, e]`` = 1 when client ``c``'s pruning kept ``e``:

* ``count[e] = sum_c keep[c, e]`` and ``total[e] = sum_c masks[c, e] * keep[c, e]``;
* where ``count[e] >= 2`` (at least two clients share the element) every client
  that keeps ``e`` receives the mean ``total[e] / count[e]``;
* where a client keeps ``e`` but fewer than two clients do, its value is unchanged;
* where a client pruned ``e``, its value is 0 (pruned for good).

The rule needs only the two sums, so it splits into a server part
(:func:`mask_sums`, summable, e.g. by secure aggregation) and a client part
(:func:`apply_rule`), which each client runs with its own pruning mask.
:func:`aggregate_masks` composes both over stacked masks.
"""

from __future__ import annotations

import numpy as np

MIN_SHARED_CLIENTS = 2


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


def apply_rule(own, keep, total, count, min_shared: int = MIN_SHARED_CLIENTS):
  """Client part: this client's new mask values from the two sums.

  ``own``: the client's current values (any shape S, or ``[clients, *S]``
  broadcasting against ``total``/``count`` of shape S); ``keep``: its 0/1
  pruning mask, shaped like ``own``. Returns float64 values in [0, 1].
  """
  own = np.asarray(own, dtype=np.float64)
  keep = np.asarray(keep, dtype=np.float64)
  total = np.asarray(total, dtype=np.float64)
  count = np.asarray(count, dtype=np.float64)
  shared = count >= min_shared
  mean = np.divide(total, count, out=np.zeros_like(total), where=count > 0)
  return np.where((keep > 0) & shared, mean, own) * keep


def aggregated_positions(keep, count, min_shared: int = MIN_SHARED_CLIENTS):
  """0/1: where a client (``keep``) receives an average instead of keeping its own value."""
  return ((np.asarray(keep) > 0) & (np.asarray(count) >= min_shared)).astype(np.float64)


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
