"""The TFF wiring shared by the baselines that average dense uploads: top-k, BNN FedAvg,
LG-FedAvg and Per-FedAvg.

Each of those algorithms writes its own TF computations (the client's local work, how the
server checks and decodes one upload, the server update) and composes them into a TFF process
with the short builders here:

* :func:`build_initialize`: ``initialize() -> state@SERVER`` from numpy arrays.
* :func:`build_decoders`: the server's ``decode_upload`` / ``decode_and_validate`` of one
  upload, from one TF function that checks and decodes it.
* :func:`build_checked_mean`: ``decode_upload`` and ``server_update`` for clients that upload a
  weights structure already multiplied by their example count (the guarded mean).
* :func:`weighted_mean_step`: the aggregation of a round (inside a federated computation): check
  and decode every upload, sum the weighted uploads and the weights over the clients, update the
  server state, append ``upload_valid`` to every client's metrics.
* :func:`build_round`: a round as two federated computations, ``client_work`` (broadcast and
  local work, no aggregation) and ``aggregate`` (one aggregation), and ``next``, their
  composition (see :mod:`fedmask_tff.algorithms.base`, "Several TFF workers");
  :func:`build_upload_round`, the same for clients that upload an encoded update weighted by
  their example count (top-k, BNN FedAvg).

Plus the client-side pieces the algorithms have in common: :func:`local_sgd` (local SGD from
the broadcast weights), :func:`client_metrics` (the per-client metrics every round reports)
and, driver side, :func:`metrics_dicts`.

Why ``tff.federated_sum`` and not ``tff.aggregators.MeanFactory``: the algorithms weight the
uploads themselves (LG-FedAvg and Per-FedAvg clients upload ``weights * examples``, the payload
whose bits are counted), drop invalid uploads before the sums, and end the mean in their own
way (top-k ``divide_no_nan``, BNN a vote rule that is no mean, LG-FedAvg / Per-FedAvg keep the
old weights when no client trained). MeanFactory multiplies and divides with its own ops, so the
same float results would not follow by construction; the two hand-written sums keep them.
"""

from __future__ import annotations

import collections
from typing import Callable, NamedTuple, Optional, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from fedmask_tff.algorithms import evaluation, local_training
from fedmask_tff.models import costs
from fedmask_tff.wire import payloads


# --- Client side (plain TF, inside a client computation) ------------------------------------------


def local_sgd(model_fn: Callable[[], tf.keras.Model], weights, dataset: tf.data.Dataset,
              epochs: int, learning_rate: float, post_step=None):
  """Local SGD of a fresh ``model_fn()`` started from ``weights``.

  ``weights``: tensors in :func:`fedmask_tff.algorithms.evaluation.model_weights` order;
  ``epochs`` passes of :func:`fedmask_tff.algorithms.local_training.sgd_epochs` over the
  batched ``dataset`` (``post_step`` after every step). Returns ``(trained, loss_sum,
  examples)``: the trained weights (a tuple, same order and shapes as ``weights``), the summed
  cross-entropy and the number of examples processed (all epochs), float32 scalars.
  """
  model = model_fn()
  variables = evaluation.model_weights(model)
  with tf.control_dependencies(evaluation.assign_weights(model, weights)):
    loss_sum, examples = local_training.sgd_epochs(
        model, model.trainable_variables, dataset, epochs, learning_rate, post_step=post_step)
  with tf.control_dependencies([loss_sum, examples]):
    trained = tuple(tf.identity(v) for v in variables)
  return trained, loss_sum, examples


def client_metrics(loss_sum, examples, diverged, upload, download) -> collections.OrderedDict:
  """``OrderedDict(loss_sum, examples, uplink_bits, downlink_bits, diverged, trained_examples)``.

  ``loss_sum`` and ``examples`` (float32 scalars) are 0 for a client whose training diverged
  (``diverged``, a bool scalar; int32 0/1 in the metrics), ``trained_examples`` keeps the count
  processed (for FLOPs); the bits (int64) are counted from the ``upload`` and ``download``
  tensors (:func:`fedmask_tff.wire.payloads.tensor_bits`).
  """
  return collections.OrderedDict(
      loss_sum=tf.where(diverged, 0.0, loss_sum), examples=tf.where(diverged, 0.0, examples),
      uplink_bits=payloads.tensor_bits(upload), downlink_bits=payloads.tensor_bits(download),
      diverged=tf.cast(diverged, tf.int32), trained_examples=examples)


# --- Server side TF computations ------------------------------------------------------------------


def build_initialize(arrays: Sequence[np.ndarray]):
  """``initialize() -> state@SERVER``: the tuple of ``arrays`` as constants (their dtypes)."""
  @tff.tensorflow.computation
  def initial_weights():
    return tuple(tf.constant(w) for w in arrays)

  @tff.federated_computation()
  def initialize_fn():
    return tff.federated_eval(initial_weights, tff.SERVER)

  return initialize_fn


def build_decoders(check_and_decode: Callable, upload_type):
  """``(decode_upload, decode_and_validate)``: TF computations ``(upload, examples float32)``.

  ``check_and_decode(upload, examples)`` (TF) returns ``(weighted, weight, valid)``: the decoded
  upload times its weight (a weights tuple), the weight (float32, 0 for an invalid upload) and
  ``valid`` (int32 0/1). ``decode_upload`` returns the first two, ``decode_and_validate`` all.
  """
  @tff.tensorflow.computation(upload_type, tff.TensorType(np.float32))
  def decode_upload(upload, examples):
    weighted, weight, _ = check_and_decode(upload, examples)
    return weighted, weight

  @tff.tensorflow.computation(upload_type, tff.TensorType(np.float32))
  def decode_and_validate(upload, examples):
    return check_and_decode(upload, examples)

  return decode_upload, decode_and_validate


def build_checked_mean(w_type):
  """``(decode_upload, server_update)`` for uploads ``weights * examples`` of type ``w_type``.

  * ``decode_upload(weighted, examples) -> (weighted, examples, valid)``: valid (int32 1) when
    every uploaded value and the example count are finite (count >= 0); an invalid upload
    becomes zeros with weight 0 (``valid`` 0).
  * ``server_update(weights, weighted_sum, total_examples)``: ``weighted_sum / total_examples``
    per tensor, or ``weights`` unchanged when no client processed an example (total 0).
  """
  @tff.tensorflow.computation(w_type, tff.TensorType(np.float32))
  def decode_upload(weighted, examples):
    weighted = tuple(weighted)
    valid = tf.reduce_all(tf.stack(
        [tf.math.is_finite(examples), examples >= 0.0]
        + [tf.reduce_all(tf.math.is_finite(w)) for w in weighted]))
    return (tuple(tf.where(valid, w, tf.zeros_like(w)) for w in weighted),
            tf.where(valid, examples, 0.0), tf.cast(valid, tf.int32))

  @tff.tensorflow.computation(w_type, w_type, tff.TensorType(np.float32))
  def server_update(weights, weighted_sum, total_examples):
    return tuple(tf.cond(total_examples > 0, lambda s=s: s / total_examples,
                         lambda o=o: tf.identity(o))
                 for s, o in zip(weighted_sum, weights))

  return decode_upload, server_update


# --- Federated pieces -----------------------------------------------------------------------------


def weighted_mean_step(decode, server_update, metrics_type) -> Callable:
  """The aggregation of a round, to call inside a federated computation.

  Returns ``step(server_state@SERVER, upload@CLIENTS, examples@CLIENTS, metrics@CLIENTS) ->
  (new_state@SERVER, metrics@CLIENTS)``: ``decode(upload, examples) -> (weighted, weight,
  valid)`` at every client, the sums over the clients of ``weighted`` and of ``weight``
  (``tff.federated_sum``, see the module docstring), ``server_update(server_state,
  weighted_sum, total_weight)`` at the server, and ``upload_valid = valid`` appended to
  ``metrics`` (of type ``metrics_type``).
  """
  with_upload_valid = payloads.with_upload_valid(metrics_type)

  def step(server_state, upload, examples, metrics):
    weighted, weight, valid = tff.federated_map(decode, (upload, examples))
    sums = tff.federated_sum(weighted)
    total = tff.federated_sum(weight)
    return (tff.federated_map(server_update, (server_state, sums, total)),
            tff.federated_map(with_upload_valid, (metrics, valid)))

  return step


def _named_computation(fn: Callable, parameters: Sequence[tuple]):
  """``tff.federated_computation`` of ``fn(*values)`` with named ``parameters`` ``[(name, type)]``.

  Its type signature is the one ``def f(name_1, ..., name_n)`` decorated with those types gets
  (an ``OrderedDict`` parameter struct), and it is called the same way (positional or by name).
  """
  parameter_type = tff.StructWithPythonType(list(parameters), collections.OrderedDict)

  @tff.federated_computation(parameter_type)
  def computation(arg):
    return fn(*arg)

  return computation


class Round(NamedTuple):
  """A round's federated computations (see :func:`build_round`). ``aggregate_uploads``
  (:func:`build_upload_round` with a client state): ``aggregate`` without the client states,
  ``(server_state, upload, metrics) -> (server_state, metrics)``, for a driver that keeps the
  states ``client_work`` returned (they only pass through ``aggregate``): they then cross
  between driver and workers once a round, not three times."""
  client_work: tff.Computation
  aggregate: tff.Computation
  next: tff.Computation
  aggregate_uploads: Optional[tff.Computation] = None


def build_round(client_update, parameters: Sequence[tuple], aggregate_step: Callable,
                aggregate_names: Sequence[str]) -> Round:
  """``Round(client_work, aggregate, next)``: one round as two federated computations.

  Args:
    client_update: TF computation ``(data, server_value, *client_values) -> tuple`` that every
      client runs on its data, the broadcast server state and its own other values.
    parameters: ``[(name, federated type)]`` of ``client_work`` and ``next``: the server state
      (at SERVER), the client data (at CLIENTS), then the other client values (at CLIENTS).
    aggregate_step: Python function ``(server_state, *client_update outputs) -> next's result``
      on federated values, with exactly one aggregation.
    aggregate_names: names of ``aggregate``'s parameters (the server state, then one per
      output of ``client_update``).

  ``client_work(server_state, data, *client_values)`` broadcasts the state and maps
  ``client_update`` (no aggregation) and returns its outputs, each at CLIENTS;
  ``aggregate(server_state, *those)`` is ``aggregate_step``; ``next(server_state, data,
  *client_values)`` is ``aggregate(server_state, *client_work(server_state, data, ...))``.
  """
  def client_work(server_state, data, *client_values):
    return tuple(tff.federated_map(
        client_update, (data, tff.federated_broadcast(server_state), *client_values)))

  client_work_fn = _named_computation(client_work, parameters)
  output_types = [tff.FederatedType(t, tff.CLIENTS) for t in client_update.type_signature.result]
  aggregate_fn = _named_computation(
      aggregate_step, zip(aggregate_names, [parameters[0][1]] + output_types))

  def next_round(server_state, *client_args):
    return aggregate_fn(server_state, *client_work_fn(server_state, *client_args))

  return Round(client_work_fn, aggregate_fn, _named_computation(next_round, parameters))


def build_upload_round(client_update, decode_and_validate, server_update, w_type, data_type,
                       client_state: Optional[tuple] = None) -> Round:
  """The :class:`Round` of an algorithm whose clients upload an encoded update weighted by
  ``metrics.examples`` (top-k, BNN FedAvg); the aggregation is :func:`weighted_mean_step`.

  ``client_update(dataset, weights[, state]) -> (upload[, new_state], metrics)``; the server
  state has type ``w_type``, a client's data ``data_type`` (a sequence). ``client_state``:
  ``None`` (stateless clients) or ``(name, output_name, type)`` of a client state that passes
  through the aggregation (top-k's residuals). Parameter names: ``client_work`` / ``next``
  ``(server_state, client_data[, name])``, ``aggregate`` ``(server_state, upload[,
  output_name], metrics)``.
  """
  metrics_type = list(client_update.type_signature.result)[-1]
  mean_step = weighted_mean_step(decode_and_validate, server_update, metrics_type)
  parameters = [("server_state", tff.FederatedType(w_type, tff.SERVER)),
                ("client_data", tff.FederatedType(data_type, tff.CLIENTS))]
  if client_state is None:
    def aggregate(server_state, upload, metrics):
      return mean_step(server_state, upload, metrics.examples, metrics)
    return build_round(client_update, parameters, aggregate, ("server_state", "upload", "metrics"))

  name, output_name, state_type = client_state
  parameters.append((name, tff.FederatedType(state_type, tff.CLIENTS)))

  def aggregate_with_state(server_state, upload, new_states, metrics):
    new_state, metrics = mean_step(server_state, upload, metrics.examples, metrics)
    return new_state, new_states, metrics
  round_ = build_round(client_update, parameters, aggregate_with_state,
                       ("server_state", "upload", output_name, "metrics"))

  def aggregate_uploads(server_state, upload, metrics):
    return mean_step(server_state, upload, metrics.examples, metrics)
  upload_type, _, metrics_type = [tff.FederatedType(t, tff.CLIENTS)
                                  for t in client_update.type_signature.result]
  return round_._replace(aggregate_uploads=_named_computation(aggregate_uploads, [
      ("server_state", parameters[0][1]), ("upload", upload_type), ("metrics", metrics_type)]))


# --- Driver side ----------------------------------------------------------------------------------


def metrics_dicts(metrics: list, weight_costs) -> list[dict]:
  """Per-client metrics as Python numbers, from :func:`client_metrics` plus ``upload_valid``.

  ``train_flops`` counts the examples processed (``trained_examples``, even by a client that
  diverged) with :func:`fedmask_tff.models.costs.train_flops` of ``weight_costs``.
  """
  out = []
  for m in metrics:
    examples = float(m["examples"])
    trained = float(m["trained_examples"])  # processed, even by a client that diverged
    out.append(dict(loss_sum=float(m["loss_sum"]), examples=examples,
                    uplink_bits=int(m["uplink_bits"]), downlink_bits=int(m["downlink_bits"]),
                    train_flops=int(costs.train_flops(weight_costs, int(round(trained)))),
                    diverged=int(m["diverged"]), upload_valid=int(m["upload_valid"])))
  return out
