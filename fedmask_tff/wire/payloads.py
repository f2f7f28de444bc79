"""Payload helpers shared by every algorithm's TFF computations (plain TF, no TFF at import).

* :func:`tensor_bits`: bits of a structure of tensors, counted from their sizes and dtypes
  (8 per uint8 byte, 32 per float32 / int32 element): how every upload and download is measured.
* :func:`flatten` / :func:`unflatten`: a tuple of tensors <-> one 1-D tensor.
* :func:`with_upload_valid`: a TFF computation appending the server's ``upload_valid`` flag
  to a client's metrics.
* :func:`to_python`, :func:`eval_dicts`: metrics from TFF results to plain Python numbers.
"""

from __future__ import annotations

import collections

import numpy as np
import tensorflow as tf


def tensor_bits(structure) -> tf.Tensor:
  """int64 bits of a structure of tensors, from their sizes and dtypes (8 * dtype bytes each)."""
  sizes = [tf.size(t, out_type=tf.int64) * (tf.as_dtype(t.dtype).size * 8)
           for t in tf.nest.flatten(structure)]
  return tf.add_n(sizes) if sizes else tf.constant(0, tf.int64)


def flatten(tensors) -> tf.Tensor:
  """The tensors of a tuple, reshaped to 1-D and concatenated."""
  return tf.concat([tf.reshape(t, [-1]) for t in tensors], axis=0)


def unflatten(flat: tf.Tensor, shapes) -> tuple:
  """Inverse of :func:`flatten` for tensors of ``shapes``."""
  sizes = [int(np.prod(s)) for s in shapes]
  parts = tf.split(flat, sizes) if len(sizes) > 1 else [flat]
  return tuple(tf.reshape(p, s) for p, s in zip(parts, shapes))


def with_upload_valid(metrics_type):
  """A TFF computation ``(metrics, valid int32) -> metrics + OrderedDict(upload_valid=valid)``."""
  import tensorflow_federated as tff
  names = [name for name, _ in tff.structure.iter_elements(metrics_type)]

  @tff.tensorflow.computation(metrics_type, tff.TensorType(np.int32))
  def append(metrics, valid):
    out = collections.OrderedDict((name, metrics[name]) for name in names)
    out["upload_valid"] = valid
    return out

  return append


def to_python(metrics) -> dict:
  """A metrics dict with numpy/tensor values as Python ints (integer dtypes) and floats."""
  return {k: (int(v) if np.asarray(v).dtype.kind in "iu" else float(v)) for k, v in metrics.items()}


def eval_dicts(metrics: list) -> list[dict]:
  """``[dict(correct, examples, loss_sum)]`` as floats, from an evaluation's per-client results."""
  return [dict(correct=float(m["correct"]), examples=float(m["examples"]),
               loss_sum=float(m["loss_sum"])) for m in metrics]
