"""Top-k sparsified FedAvg (``build_topk``), with optional error feedback.

One round, for the sampled clients (all TFF computations; steps 1-3 are the
process's ``client_work``, step 4 its ``aggregate``, two calls when the round is
split over TFF workers):

1. **Download**: the server broadcasts the dense float32 global weights
   (``downlink_bits`` = 32 per element, counted from the received tensors).
2. **Client work** (``client_update``): load the global weights into the
   dense model (``context.dense_model_fn()``), run ``local_epochs`` epochs of
   mini-batch SGD (:func:`fedmask_tff.algorithms.local_training.sgd_epochs`),
   and form the update ``delta = local - global`` flattened over *all*
   weights into one vector of ``n`` elements (the order of
   :func:`fedmask_tff.algorithms.evaluation.model_weights`). With error feedback the
   client's residual ``r`` is added first: ``u = delta + r``.
3. **Upload**: the ``k = max(1, round(fraction * n))`` entries of ``u`` of
   largest magnitude over the whole vector (``tf.math.top_k`` of ``|u|``;
   ties go to the lower index): ``OrderedDict(values=float32[k],
   indices=int32[k])``. ``uplink_bits`` is counted from those two tensors
   (``32 * k + 32 * k``). With error feedback the new residual is what was
   not sent, ``u - densify(values, indices)``, kept in the client state.
4. **Server** (``decode_upload`` + sums): densify each upload (zeros
   elsewhere), take the example-weighted mean over the clients,
   ``sum_c examples_c * dense_c / sum_c examples_c`` (0 if no client trained
   on any example), and add it times ``server_learning_rate`` to the
   global weights.

Misbehaving clients: a client whose training diverged (non-finite loss or
update) sends ``k`` zero values (same shapes and bits) with weight 0, keeps its
previous residual and reports ``diverged = 1`` (``examples`` and ``loss_sum``
0; ``trained_examples`` keeps the count processed, for FLOPs). The server
(``decode_and_validate``) drops an upload whose values or example count are
not finite, or whose indices are not distinct and in ``[0, n)`` (weight 0,
``upload_valid = 0``). A round in which every client is dropped leaves the
global weights unchanged.

Server state: the global weights, a tuple of float32 tensors in
:func:`fedmask_tff.algorithms.evaluation.model_weights` order. Client state: the residual
(same tuple of shapes) with error feedback, else none. Evaluation: the global
model on each client's test data.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Callable, Optional

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from fedmask_tff.models import costs
from fedmask_tff.algorithms import evaluation
from fedmask_tff.wire.payloads import eval_dicts, flatten, tensor_bits, unflatten  # noqa: F401  (re-exported)
from fedmask_tff.algorithms import triad
from fedmask_tff.algorithms.base import BuildContext, FederatedAlgorithm

# SGD step size of local training. 0.05 is a standard value for a small ReLU CNN
# without batch norm on (Fashion-)MNIST with batch 32 (FedAvg, McMahan et al. 2017,
# tuned step sizes of about 0.02-0.2 for its MNIST CNN with batch 10-50); it is the
# dense FedAvg step, and top-k sparsifies the resulting update, not the steps.
# Checked with top-k 10% (CNN width 0.5, batch 32, Fashion-MNIST, global-model
# test accuracy): 10 iid clients x 400 images, 1 epoch, round 5: lr 0.02 / 0.05 /
# 0.1 -> 0.65 / 0.71 / 0.76; pathological partition (100 clients, 2 classes
# each, 10 per round, 2 epochs), rounds 6-8: lr 0.05 -> 0.56 / 0.50 / 0.45,
# lr 0.1 -> 0.61 / 0.59 / 0.45 (noisier). 0.05 kept as the conservative value.
DEFAULT_LEARNING_RATE = 0.05
DEFAULT_FRACTION = 0.1


def topk_count(fraction: float, num_elements: int) -> int:
  """``k = max(1, round(fraction * num_elements))`` (Python's round)."""
  return max(1, int(round(float(fraction) * int(num_elements))))


def check_fraction(fraction: float) -> float:
  fraction = float(fraction)
  if not (0.0 < fraction <= 1.0):
    raise ValueError(f"top-k fraction must be in (0, 1], got {fraction}")
  return fraction


def select_topk(update: tf.Tensor, k: int):
  """``(values float32[k], indices int32[k])``: the ``k`` entries of a 1-D ``update`` largest in magnitude."""
  _, indices = tf.math.top_k(tf.abs(update), k=k, sorted=True)
  indices = tf.cast(indices, tf.int32)
  return tf.gather(update, indices), indices


def densify(values: tf.Tensor, indices: tf.Tensor, num_elements: int) -> tf.Tensor:
  """float32 ``[num_elements]``: ``values`` at ``indices``, zeros elsewhere."""
  return tf.scatter_nd(tf.expand_dims(indices, 1), values, [num_elements])


class TopKProcess(tff.templates.IterativeProcess):
  """The top-k FedAvg process plus, for the driver and tests: ``k``, ``num_elements``,
  ``shapes``, ``weights_type``, ``error_feedback``, ``client_update`` and
  ``decode_upload`` (the TF computations of steps 2-4) and ``evaluate_global``.

  ``next(weights@SERVER, data@CLIENTS[, residuals@CLIENTS])`` returns
  ``(weights@SERVER[, residuals@CLIENTS], metrics@CLIENTS)`` where
  ``metrics`` is ``OrderedDict(loss_sum, examples, uplink_bits, downlink_bits, diverged,
  trained_examples, upload_valid)``. It is the composition of ``client_work`` (same
  arguments; returns ``client_update``'s ``(upload[, residuals], metrics)`` at CLIENTS, no
  aggregation) and ``aggregate(weights@SERVER, *those)`` (decoding, sums, server update).
  """


@dataclasses.dataclass(frozen=True)
class _Settings:
  """What the TF computations of one process need: ``k`` of the ``num_elements`` update
  entries are sent; ``shapes`` of the weights (model_weights order); local SGD ``epochs`` and
  step ``lr``; ``slr`` the server learning rate."""
  k: int
  num_elements: int
  shapes: list
  epochs: int
  lr: float
  slr: float


def _check_settings(fraction, local_epochs, learning_rate, server_learning_rate) -> float:
  """Raises ValueError for an invalid setting; returns the fraction as a float."""
  fraction = check_fraction(fraction)
  if int(local_epochs) < 1:
    raise ValueError(f"local_epochs must be >= 1, got {local_epochs}")
  if not (learning_rate > 0 and math.isfinite(learning_rate)):
    raise ValueError(f"learning_rate must be a finite number > 0, got {learning_rate}")
  if not math.isfinite(server_learning_rate):
    raise ValueError(f"server_learning_rate must be finite, got {server_learning_rate}")
  return fraction


def _local_update(model_fn, s: _Settings, dataset, weights, residual):
  """Steps 2-3 for one client: ``(upload, new_residual or None, metrics)``.

  ``upload`` is ``OrderedDict(values=float32[k], indices=int32[k])`` of ``delta (+ residual)``
  (``n`` = ``s.num_elements`` entries, flattened); ``new_residual`` (with error feedback) is
  what was not sent, in the shapes of ``weights``; ``metrics``: :func:`triad.client_metrics`.
  """
  local, loss_sum, examples = triad.local_sgd(model_fn, weights, dataset, s.epochs, s.lr)
  update = flatten(local) - flatten(weights)
  if residual is not None:
    update = update + flatten(residual)
  # A client whose training diverged (non-finite loss, weights or update) sends k zero
  # values (same shapes, so the bits are still counted from the tensors) with weight 0,
  # and keeps its previous residual.
  diverged = tf.logical_not(tf.logical_and(tf.math.is_finite(loss_sum),
                                           tf.reduce_all(tf.math.is_finite(update))))
  values, indices = select_topk(update, s.k)
  values = tf.where(diverged, tf.zeros_like(values), values)
  indices = tf.where(diverged, tf.range(s.k, dtype=tf.int32), indices)
  upload = collections.OrderedDict(values=values, indices=indices)
  metrics = triad.client_metrics(loss_sum, examples, diverged, upload, weights)
  new_residual = None
  if residual is not None:
    kept = tf.where(diverged, flatten(residual),
                    update - densify(values, indices, s.num_elements))
    new_residual = unflatten(kept, s.shapes)
  return upload, new_residual, metrics


def _client_update_computation(model_fn, s: _Settings, data_type, w_type, error_feedback: bool):
  """``client_update(dataset, weights[, residual]) -> (upload[, residual], metrics)`` (TF)."""
  if error_feedback:
    @tff.tensorflow.computation(data_type, w_type, w_type)
    def client_update(dataset, weights, residual):
      return _local_update(model_fn, s, dataset, weights, residual)
  else:
    @tff.tensorflow.computation(data_type, w_type)
    def client_update(dataset, weights):
      upload, _, metrics = _local_update(model_fn, s, dataset, weights, None)
      return upload, metrics
  return client_update


def _check_and_decode(s: _Settings, upload, examples):
  """``(weighted update, weight, valid)``: an upload is valid when its ``k`` values and the
  example count are finite (count >= 0) and its indices are distinct and in ``[0, n)``; an
  invalid one adds nothing (zeros, weight 0). ``weighted`` is the densified update times the
  example count (summed, then divided by the total), in ``s.shapes``; ``valid`` int32 0/1."""
  values, indices = upload["values"], upload["indices"]
  ordered = tf.sort(indices)
  valid = tf.reduce_all(tf.stack([
      tf.reduce_all(tf.logical_and(indices >= 0, indices < s.num_elements)),
      tf.reduce_all(ordered[1:] > ordered[:-1]),
      tf.reduce_all(tf.math.is_finite(values)),
      tf.math.is_finite(examples), examples >= 0.0]))
  weight = tf.where(valid, examples, 0.0)
  dense = densify(tf.where(valid, values, tf.zeros_like(values)),
                  tf.where(valid, indices, tf.range(s.k, dtype=tf.int32)), s.num_elements)
  return unflatten(dense * weight, s.shapes), weight, tf.cast(valid, tf.int32)


def _server_update_computation(w_type, slr: float):
  """``server_update(weights, weighted_sum, total_examples)``: ``weights + slr * mean update``
  (``divide_no_nan``: unchanged when no client trained)."""
  @tff.tensorflow.computation(w_type, w_type, tff.TensorType(np.float32))
  def server_update(weights, weighted_sum, total_examples):
    return tuple(w + slr * tf.math.divide_no_nan(s, total_examples)
                 for w, s in zip(weights, weighted_sum))
  return server_update


def build_topk_process(model_fn: Callable[[], tf.keras.Model], element_spec, *,
                       fraction: float = DEFAULT_FRACTION, error_feedback: bool = False,
                       server_learning_rate: float = 1.0,
                       learning_rate: float = DEFAULT_LEARNING_RATE, local_epochs: int = 1,
                       eval_element_spec=None) -> TopKProcess:
  """Builds top-k FedAvg as a TFF iterative process (see the module docstring).

  Args:
    model_fn: no-argument callable returning a fresh dense Keras model (logits);
      its initial weights (it must build the same ones on every call) are the
      initial global model.
    element_spec: element spec of a *batched* training dataset
      (``OrderedDict(x=..., y=int32)``).
    fraction: share of the ``n`` update elements sent, in (0, 1].
    error_feedback: keep the unsent part of each update as client state.
    server_learning_rate: factor on the averaged update.
    learning_rate, local_epochs: local SGD settings.
    eval_element_spec: element spec of the test datasets (default: the same).
  """
  fraction = _check_settings(fraction, local_epochs, learning_rate, server_learning_rate)
  probe = model_fn()
  initial = evaluation.weights_numpy(probe)
  del probe
  shapes = [tuple(w.shape) for w in initial]
  num_elements = int(sum(int(np.prod(s)) for s in shapes))
  s = _Settings(k=topk_count(fraction, num_elements), num_elements=num_elements, shapes=shapes,
                epochs=int(local_epochs), lr=float(learning_rate),
                slr=float(server_learning_rate))

  w_type = evaluation.weights_type(model_fn)
  data_type = tff.SequenceType(tff.types.tensorflow_to_type(element_spec))
  upload_type = tff.types.to_type(collections.OrderedDict(
      values=tff.TensorType(np.float32, [s.k]), indices=tff.TensorType(np.int32, [s.k])))
  client_update = _client_update_computation(model_fn, s, data_type, w_type, error_feedback)
  decode_upload, decode_and_validate = triad.build_decoders(
      lambda upload, examples: _check_and_decode(s, upload, examples), upload_type)
  server_update = _server_update_computation(w_type, s.slr)
  # A round is two federated computations (see fedmask_tff.algorithms.base, "Several TFF
  # workers"): `client_work` (broadcast and local training, no aggregation) and `aggregate`
  # (decoding, the sums, the server update); `next` is their composition.
  # With error feedback the new residuals pass through the aggregation.
  round_ = triad.build_upload_round(
      client_update, decode_and_validate, server_update, w_type, data_type,
      client_state=("residuals", "new_residuals", w_type) if error_feedback else None)

  process = TopKProcess(triad.build_initialize(initial), round_.next)
  process.k = s.k
  process.num_elements = num_elements
  process.shapes = shapes
  process.weights_type = w_type
  process.error_feedback = bool(error_feedback)
  process.client_update = client_update
  process.decode_upload = decode_upload
  process.decode_and_validate = decode_and_validate
  process.server_update = server_update
  process.client_work = round_.client_work
  process.aggregate = round_.aggregate
  evaluate_global, _, _ = evaluation.build_weights_evaluation(
      model_fn, eval_element_spec or element_spec)
  process.evaluate_global = evaluate_global
  return process


class TopKFedAvg(FederatedAlgorithm):
  """:class:`FederatedAlgorithm` around :func:`build_topk_process` (see the module docstring)."""
  round_in_two_steps = True

  def __init__(self, process: TopKProcess, model_fn, settings: dict):
    self.process = process
    self.name = "topk"
    self.model_parameters = process.num_elements
    ef = " with error feedback" if process.error_feedback else ""
    self.description = (f"FedAvg of dense weights; clients upload the top {process.k} of "
                        f"{process.num_elements} update elements by magnitude (float32 value + "
                        f"int32 index){ef}; the dense float32 global model is downloaded and "
                        f"evaluated on each client's test data")
    self.settings = dict(settings)
    self._weight_costs = costs.weight_costs(model_fn())
    self._shapes = process.shapes
    self._model_fn = model_fn

  def global_model(self, server_state):
    return self._model_fn, tuple(server_state)

  def initial_client_state(self) -> Optional[tuple]:
    if not self.process.error_feedback:
      return None
    return tuple(np.zeros(s, np.float32) for s in self._shapes)

  def next(self, server_state, train_datasets: list, client_states: Optional[list]):
    if self.process.error_feedback:
      if client_states is None or len(client_states) != len(train_datasets):
        raise ValueError("top-k with error feedback needs one residual state per client")
      server_state, new_states, metrics = self.run_round(
          server_state, list(train_datasets), list(client_states))
      new_states = [tuple(np.asarray(r, np.float32) for r in s) for s in new_states]
    else:
      server_state, metrics = self.run_round(server_state, list(train_datasets))
      new_states = None
    return server_state, new_states, triad.metrics_dicts(metrics, self._weight_costs)

  def evaluate(self, server_state, test_datasets: list, client_states: Optional[list],
               train_datasets: list) -> list[dict]:
    return eval_dicts(self.process.evaluate_global(server_state, list(test_datasets)))


def build_topk(context: BuildContext, fraction: float = DEFAULT_FRACTION,
               error_feedback: bool = False, server_learning_rate: float = 1.0,
               learning_rate: Optional[float] = None) -> FederatedAlgorithm:
  """Top-k FedAvg on ``context.dense_model_fn()`` (see the module docstring).

  Args:
    context: the run's :class:`BuildContext` (model, element specs, ``local_epochs``).
    fraction: share of the update's elements each client sends, in (0, 1];
      ``k = max(1, round(fraction * n))`` for ``n`` model parameters.
    error_feedback: keep each client's unsent remainder and add it to its next update.
    server_learning_rate: factor on the example-weighted mean update.
    learning_rate: local SGD step size; ``None`` gives :data:`DEFAULT_LEARNING_RATE`
      (``context.learning_rate`` is FedMask's score step size and is not used).

  Per round and client: uplink ``64 * k`` bits, downlink ``32 * n`` bits.
  """
  lr = DEFAULT_LEARNING_RATE if learning_rate is None else float(learning_rate)
  model_fn = context.dense_model_fn()
  process = build_topk_process(
      model_fn, context.element_spec, fraction=fraction, error_feedback=error_feedback,
      server_learning_rate=server_learning_rate, learning_rate=lr,
      local_epochs=context.local_epochs, eval_element_spec=context.eval_element_spec)
  settings = dict(fraction=float(fraction), k=process.k, error_feedback=bool(error_feedback),
                  server_learning_rate=float(server_learning_rate), learning_rate=lr,
                  local_epochs=int(context.local_epochs))
  return TopKFedAvg(process, model_fn, settings)
