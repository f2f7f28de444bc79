"""Structured sparsity for FedMask: a group-lasso penalty on the (soft) masks.

The FedMask paper adds a structured-sparsity term to each client's loss so
that whole filters / channels (convolutions) and whole rows / columns
(fully connected layers) of the mask go to zero; a model whose masks zero out
entire groups can be compacted (those filters, channels or neurons removed),
which makes the personalised model smaller and faster.

The penalty is the group lasso (Yuan & Lin 2006) over the *soft* mask values

    M = sigmoid(m_r) * keep

(differentiable in the scores ``m_r``; the binary mask is
``1[sigmoid(m_r) >= tau]``):

    group_lasso(M) = sum_g sqrt(|g|) * ||M_g||_2

with the standard weighting ``sqrt(|g|)`` (``|g|`` the number of elements of
group ``g``, so groups of different sizes are penalised alike per element: a
group of ``p`` equal values ``c`` costs ``c * p``). Groups, for a mask of shape

* ``[kh, kw, c_in, c_out]`` (convolution, ``kind="conv"``): ``"out"``, the
  output filters ``M[:, :, :, j]`` (``|g| = kh * kw * c_in``; default) and
  optionally ``"in"``, the input channels ``M[:, :, i, :]``
  (``|g| = kh * kw * c_out``);
* ``[n_in, n_out]`` (dense, ``kind="dense"``, also LSTM kernels
  ``[input_dim, 4u]`` / ``[u, 4u]``): ``"in"``, the rows ``M[i, :]`` (one per
  input neuron, ``|g| = n_out``) and ``"out"``, the columns ``M[:, j]`` (one
  per output neuron, ``|g| = n_in``); both by default.

When several groupings are used their terms are added. The L2 norm is taken
as 0 with gradient 0 for an all-zero group (e.g. fully pruned by ``keep``),
so the gradient is always finite.

:func:`structured_penalty` sums the term over a masked model's masks (raw sum
by default; ``normalize=True`` divides by the number of mask elements so that
one lambda suits models of any size: the value is then at most the number of
groupings, 2 for dense masks). Add ``lam * structured_penalty(model)`` to the
loss inside the gradient tape of FedMask's local training.

:func:`zero_groups` counts the groups of a *binary* mask that are entirely
zero (the structure the penalty creates, i.e. what compaction can remove).
"""

from __future__ import annotations

from typing import Optional, Sequence

import tensorflow as tf

from fedmask_tff.masks import masking
from fedmask_tff.masks.layers import masked_layers

KINDS = ("conv", "dense", "auto")
GROUPINGS = ("out", "in")
DEFAULT_GROUPS = {"conv": ("out",), "dense": ("in", "out")}


def _resolve(mask_values: tf.Tensor, kind: str, groups: Optional[Sequence[str]]):
  rank = mask_values.shape.rank
  if kind not in KINDS:
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
  if kind == "auto":
    if rank not in (2, 4):
      raise ValueError(f"kind='auto' needs a rank-2 (dense) or rank-4 (conv) mask, got rank {rank}")
    kind = "conv" if rank == 4 else "dense"
  expected = 4 if kind == "conv" else 2
  if rank != expected:
    raise ValueError(f"a {kind} mask must have rank {expected}, got shape {mask_values.shape}")
  groups = DEFAULT_GROUPS[kind] if groups is None else tuple(groups)
  bad = [g for g in groups if g not in GROUPINGS]
  if bad or not groups or len(set(groups)) != len(groups):
    raise ValueError(f"groups must be distinct names from {GROUPINGS}, got {groups!r}")
  return kind, groups


def _safe_norm(sum_squares: tf.Tensor) -> tf.Tensor:
  """``sqrt`` with value 0 and gradient 0 where the argument is 0 (instead of NaN)."""
  positive = sum_squares > 0
  safe = tf.where(positive, sum_squares, tf.ones_like(sum_squares))
  return tf.where(positive, tf.sqrt(safe), tf.zeros_like(sum_squares))


def _group_axes(rank: int, grouping: str):
  """Axes summed within a group: all but the last ("out") or all but the second last ("in")."""
  keep_axis = rank - 1 if grouping == "out" else rank - 2
  return [a for a in range(rank) if a != keep_axis], keep_axis


def group_lasso(mask_values, kind: str = "auto", groups: Optional[Sequence[str]] = None) -> tf.Tensor:
  """``sum_g sqrt(|g|) * ||mask_values[g]||_2`` over the groups of ``kind`` (a scalar).

  Args:
    mask_values: the soft mask ``sigmoid(scores) * keep`` (any float dtype), shape
      ``[kh, kw, c_in, c_out]`` for ``kind="conv"`` or ``[n_in, n_out]`` for
      ``kind="dense"``; ``"auto"`` picks by rank (4: conv, 2: dense).
    kind: ``"conv"``, ``"dense"`` or ``"auto"``.
    groups: which groupings to add, from ``("out", "in")``: ``"out"`` = output
      filters / columns, ``"in"`` = input channels / rows. Default: ``("out",)``
      for conv, ``("in", "out")`` for dense.
  """
  values = tf.convert_to_tensor(mask_values)
  if not values.dtype.is_floating:
    values = tf.cast(values, tf.float32)
  _, groups = _resolve(values, kind, groups)
  rank = values.shape.rank
  total_elements = values.shape.num_elements()
  squared = tf.square(values)
  terms = []
  for grouping in groups:
    axes, keep_axis = _group_axes(rank, grouping)
    group_size = total_elements // int(values.shape[keep_axis])
    norms = _safe_norm(tf.reduce_sum(squared, axis=axes))
    terms.append(tf.sqrt(tf.cast(group_size, values.dtype)) * tf.reduce_sum(norms))
  return tf.add_n(terms)


def soft_mask_values(scores, keep) -> tf.Tensor:
  """``sigmoid(scores) * keep``: the differentiable mask the penalty acts on."""
  return masking.soft_mask(scores) * keep


def structured_penalty(model: tf.keras.Model, conv_groups: Sequence[str] = ("out",),
                       dense_groups: Sequence[str] = ("in", "out"),
                       normalize: bool = False) -> tf.Tensor:
  """Sum of :func:`group_lasso` over every masked weight of ``model`` (float32 scalar).

  Each masked weight (``layer.masked_weights``: MaskedConv2D kernels as conv,
  MaskedDense and MaskedLSTM kernels / recurrent kernels as dense) contributes
  ``group_lasso(sigmoid(scores) * keep)``. ``normalize=True`` divides the sum
  by the total number of mask elements. A model without masked layers raises
  ``ValueError``.
  """
  terms, elements = [], 0
  for layer in masked_layers(model):
    for _, kernel, scores, keep in layer.masked_weights:
      kind = "conv" if kernel.shape.rank == 4 else "dense"
      groups = conv_groups if kind == "conv" else dense_groups
      terms.append(group_lasso(soft_mask_values(scores, keep), kind, groups))
      elements += int(kernel.shape.num_elements())
  if not terms:
    raise ValueError(f"model {model.name!r} has no masked weights to penalise")
  total = tf.add_n(terms)
  return total / float(elements) if normalize else total


def zero_groups(mask, kind: str = "auto", groups: Optional[Sequence[str]] = None) -> dict:
  """``{grouping: (all-zero groups, groups)}`` for a (binary) mask, as Python ints."""
  values = tf.convert_to_tensor(mask)
  _, groups = _resolve(values, kind, groups)
  out = {}
  for grouping in groups:
    axes, keep_axis = _group_axes(values.shape.rank, grouping)
    nonzero = tf.reduce_any(tf.not_equal(values, 0), axis=axes)
    n = int(values.shape[keep_axis])
    out[grouping] = (n - int(tf.reduce_sum(tf.cast(nonzero, tf.int32))), n)
  return out


def model_zero_groups(model: tf.keras.Model, conv_groups: Sequence[str] = ("out",),
                      dense_groups: Sequence[str] = ("in", "out")) -> dict:
  """``{weight name: zero_groups(binary mask)}`` for every masked weight, plus ``"total"``.

  Keys are the kernel variables' names without ``:0`` (e.g. ``"lstm1/cell/kernel"``,
  unique even for several LSTMs, whose cells are all called ``cell``).

  ``"total"`` is ``(all-zero groups, groups)`` summed over weights and groupings.
  """
  out, zeros, count = {}, 0, 0
  for layer in masked_layers(model):
    masks = layer.binary_masks()
    for (_, kernel, _, _), mask in zip(layer.masked_weights, masks):
      kind = "conv" if kernel.shape.rank == 4 else "dense"
      stats = zero_groups(mask, kind, conv_groups if kind == "conv" else dense_groups)
      key = kernel.name.split(":")[0]
      if key in out:
        key = f"{key}#{len(out)}"
      out[key] = stats
      zeros += sum(z for z, _ in stats.values())
      count += sum(n for _, n in stats.values())
  out["total"] = (zeros, count)
  return out
