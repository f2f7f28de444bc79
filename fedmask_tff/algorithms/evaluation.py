"""Evaluation shared by every algorithm: a model's metrics on each client's own test data.

Plain TF helpers (no TFF): :func:`model_weights` / :func:`assign_weights` move
a Keras model's variables in and out as a tuple of tensors, and
:func:`dataset_metrics` runs a model over a batched dataset and returns
``OrderedDict(correct, examples, loss_sum)`` (float32 scalars; ``loss_sum`` is
the sum of per-example cross-entropies, so ``loss_sum / examples`` is the mean).

TFF wrappers: :func:`build_weights_evaluation` returns two federated
computations over a weights tuple, one for a global model placed at SERVER
(broadcast to every client) and one for per-client models placed at CLIENTS.
"""

from __future__ import annotations

import collections
from typing import Callable

import numpy as np
import tensorflow as tf


def loss_fn(y, logits):
  """Mean sparse categorical cross-entropy from logits."""
  return tf.reduce_mean(tf.keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True))


def model_weights(model: tf.keras.Model) -> tuple:
  """All of ``model``'s variables (trainable first, then the others) in a fixed order."""
  return tuple(model.trainable_weights) + tuple(model.non_trainable_weights)


def weights_numpy(model: tf.keras.Model) -> tuple:
  return tuple(np.asarray(v.numpy()) for v in model_weights(model))


def assign_weights(model: tf.keras.Model, weights) -> list:
  """Assign ops putting ``weights`` (same order as :func:`model_weights`) into ``model``."""
  variables = model_weights(model)
  if len(variables) != len(weights):
    raise ValueError(f"{len(weights)} weights given, the model has {len(variables)} variables")
  return [v.assign(w) for v, w in zip(variables, weights)]


def weights_type(model_fn: Callable[[], tf.keras.Model]):
  """The TFF type of :func:`model_weights` of ``model_fn()`` (a tuple of tensor types)."""
  import tensorflow_federated as tff
  model = model_fn()
  return tff.types.to_type(tuple(tff.TensorType(v.dtype.as_numpy_dtype, v.shape.as_list())
                                 for v in model_weights(model)))


def dataset_metrics(model: tf.keras.Model, dataset: tf.data.Dataset):
  """``OrderedDict(correct, examples, loss_sum)`` of ``model`` (logits) over a batched dataset."""
  def step(acc, batch):
    logits = model(batch["x"], training=False)
    y = tf.cast(batch["y"], tf.int64)
    n = tf.cast(tf.shape(y)[0], tf.float32)
    correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, -1), y), tf.float32))
    return acc[0] + correct, acc[1] + n, acc[2] + loss_fn(batch["y"], logits) * n
  correct, n, loss_sum = dataset.reduce((tf.constant(0.0), tf.constant(0.0), tf.constant(0.0)), step)
  return collections.OrderedDict(correct=correct, examples=n, loss_sum=loss_sum)


def build_weights_evaluation(model_fn: Callable[[], tf.keras.Model], eval_element_spec):
  """``(evaluate_global, evaluate_personal, weights_type)`` for models given as weight tuples.

  * ``evaluate_global(weights@SERVER, data@CLIENTS) -> metrics@CLIENTS``: one
    model for all (FedAvg-style), broadcast to every client.
  * ``evaluate_personal(weights@CLIENTS, data@CLIENTS) -> metrics@CLIENTS``:
    each client's own model.

  Metrics are :func:`dataset_metrics`'s. ``eval_element_spec`` is the element
  spec of the *batched* test datasets.
  """
  import tensorflow_federated as tff
  w_type = weights_type(model_fn)
  data_type = tff.SequenceType(tff.types.tensorflow_to_type(eval_element_spec))

  @tff.tensorflow.computation(data_type, w_type)
  def evaluate_client(dataset, weights):
    model = model_fn()
    with tf.control_dependencies(assign_weights(model, weights)):
      return tf.function(lambda d: dataset_metrics(model, d))(dataset)

  @tff.federated_computation(tff.FederatedType(w_type, tff.SERVER),
                             tff.FederatedType(data_type, tff.CLIENTS))
  def evaluate_global(weights, data):
    return tff.federated_map(evaluate_client, (data, tff.federated_broadcast(weights)))

  @tff.federated_computation(tff.FederatedType(w_type, tff.CLIENTS),
                             tff.FederatedType(data_type, tff.CLIENTS))
  def evaluate_personal(weights, data):
    return tff.federated_map(evaluate_client, (data, weights))

  return evaluate_global, evaluate_personal, w_type
