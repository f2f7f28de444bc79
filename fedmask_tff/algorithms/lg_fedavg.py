"""LG-FedAvg (Liang et al. 2020, "Think locally, act globally") as a TFF process.

The model's weight layers (layers that own weights, in order; counted from
the output) are split in two:

* the **global** layers: the top ``global_layers`` weight layers (the
  classifier side). The server keeps them (its state), broadcasts them, and
  replaces them by the example-weighted mean of what the clients return; a
  round in which no client processed an example keeps them unchanged.
* the **local** layers: all the others (the representation). Each client keeps
  its own copy in its client state across rounds; they never travel.

One round, per sampled client: load its local layers and the received global
layers into the model, train *all* of them with mini-batch SGD for
``local_epochs`` epochs (:func:`fedmask_tff.algorithms.local_training.sgd_epochs`),
keep the local layers, upload the global ones. Communication: the global
layers only, dense float32 each way, counted from the tensors (32 bits per
element). In TFF the round is two computations, the process's ``client_work``
(broadcast and training) and ``aggregate`` (the server's mean), two calls when
it is split over TFF workers. Evaluation: a client's own local layers with the
current global layers on its own test data.

Misbehaving clients: a client whose training diverged (non-finite loss or
weights) keeps its previous local layers, uploads zeros with weight 0 and
reports ``diverged = 1`` (``examples``, ``loss_sum`` 0; FLOPs still count the
examples it processed); the server's ``decode_upload`` drops an upload with a
non-finite value or example count (weight 0, ``upload_valid = 0``).

Client state: the tuple of local-layer weights (numpy float32, layer order,
each layer's ``weights`` order); :meth:`LGFedAvg.initial_client_state` is
the freshly initialised local layers of ``model_fn()`` (the same for every
client: the model's initialisers are seeded).

Default learning rate: ``DEFAULT_LEARNING_RATE = 0.05``, the SGD step of the
LG-FedAvg paper's CNN experiments (MNIST / CIFAR-10). Measured (reference CNN
at width 0.5, Fashion-MNIST, 20 clients, Dirichlet 0.1 labels, 5 clients a
round, 20 rounds, 1 local epoch, batch 32, one seed; personal accuracy over
the 20 clients' test data): lr 0.01: 0.818, 0.05: 0.869, 0.1: 0.899 (0.1 was
better in this short run; the paper's value is kept as the default).
The default on the full-width reference CNN, same set-up: 0.909.
``global_layers`` defaults to 2: the paper keeps the last two (fully
connected) layers global for its CNNs (for the 4-layer reference CNN: fc1
and fc2 global, the two convolutions local).
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from fedmask_tff.models import costs
from fedmask_tff.wire import payloads
from fedmask_tff.algorithms import triad
from fedmask_tff.algorithms.base import BuildContext, FederatedAlgorithm
from fedmask_tff.algorithms.local_training import sgd_epochs
from fedmask_tff.algorithms.evaluation import dataset_metrics

DEFAULT_LEARNING_RATE = 0.05
DEFAULT_GLOBAL_LAYERS = 2


def weight_layers(model: tf.keras.Model) -> list:
  """The leaf layers of ``model`` that own weights, input to output (nested models flattened)."""
  out = []

  def visit(layer):
    if hasattr(layer, "layers") and layer.layers:
      for sub in layer.layers:
        visit(sub)
    elif layer.weights:
      out.append(layer)

  for layer in model.layers:
    visit(layer)
  return out


def split_layers(model: tf.keras.Model, global_layers: int) -> tuple[list, list]:
  """``(local_variables, global_variables)``: the top ``global_layers`` weight layers are global.

  Raises ValueError unless ``1 <= global_layers <= number of weight layers``.
  """
  layers = weight_layers(model)
  if not isinstance(global_layers, (int, np.integer)) or isinstance(global_layers, bool) or not (
      1 <= global_layers <= len(layers)):
    raise ValueError(f"global_layers must be an integer in [1, {len(layers)}] (the model "
                     f"{model.name!r} has {len(layers)} weight layers: "
                     f"{[l.name for l in layers]}), got {global_layers!r}")
  cut = len(layers) - int(global_layers)
  local_vars = [v for layer in layers[:cut] for v in layer.weights]
  global_vars = [v for layer in layers[cut:] for v in layer.weights]
  return local_vars, global_vars


def _type_of(variables):
  return tff.types.to_type(tuple(tff.TensorType(v.dtype.as_numpy_dtype, v.shape.as_list())
                                 for v in variables))


class LGFedAvgProcess(tff.templates.IterativeProcess):
  """``initialize() -> global layers@SERVER``;
  ``next(global@SERVER, data@CLIENTS, local@CLIENTS) -> (global@SERVER, local@CLIENTS, metrics@CLIENTS)``,
  the composition of ``client_work`` (same arguments; returns ``client_update``'s
  ``(local, weighted, examples, metrics)`` at CLIENTS, no aggregation) and
  ``aggregate(global@SERVER, *those)`` (checks, sums, server update).

  Extra attributes: ``evaluate`` (federated:
  ``(global@SERVER, local@CLIENTS, test@CLIENTS) -> metrics@CLIENTS``),
  ``initial_local_weights`` / ``initial_global_weights`` (numpy tuples),
  ``local_type``, ``global_type``, and the TF computations ``client_update``,
  ``evaluate_client`` for tests.
  """


def _load(model_fn, global_layers: int, global_w, local_w):
  """A fresh ``model_fn()`` and ops loading ``local_w`` / ``global_w`` (tuples of tensors,
  :func:`split_layers` order) into it: ``(model, local_vars, global_vars, assigns)``."""
  model = model_fn()
  lv, gv = split_layers(model, global_layers)
  assigns = [v.assign(w) for v, w in zip(lv, local_w)] + [v.assign(w) for v, w in zip(gv, global_w)]
  return model, lv, gv, assigns


def _client_round(model_fn, global_layers: int, epochs: int, lr: float, dataset, global_w,
                  local_w):
  """One client's round: ``(new_local, weighted, weight, metrics)``.

  Trains all layers from ``local_w`` and ``global_w`` for ``epochs`` epochs of SGD; ``weighted``
  is the trained global layers times ``weight`` (the examples trained on, float32), the upload;
  ``metrics``: :func:`triad.client_metrics`.
  """
  global_w, local_w = tuple(global_w), tuple(local_w)
  model, lv, gv, assigns = _load(model_fn, global_layers, global_w, local_w)
  with tf.control_dependencies(assigns):
    loss_sum, examples = sgd_epochs(model, model.trainable_weights, dataset, epochs, lr)
  with tf.control_dependencies([loss_sum, examples]):
    new_local = tuple(tf.identity(v) for v in lv)
    new_global = tuple(tf.identity(v) for v in gv)
  # A client whose training diverged (non-finite loss or weights) keeps its previous local
  # layers and uploads zeros (same shapes) with weight 0.
  diverged = tf.logical_not(tf.reduce_all(tf.stack(
      [tf.math.is_finite(loss_sum)]
      + [tf.reduce_all(tf.math.is_finite(w)) for w in new_local + new_global])))
  new_local = tuple(tf.where(diverged, old, new) for old, new in zip(local_w, new_local))
  metrics = triad.client_metrics(loss_sum, examples, diverged, new_global, global_w)
  weight = metrics["examples"]
  weighted = tuple(tf.where(diverged, tf.zeros_like(w), w * weight) for w in new_global)
  return new_local, weighted, weight, metrics


def _client_computations(model_fn, global_layers: int, epochs: int, lr: float, data_type,
                         eval_data_type, global_type, local_type):
  """``(client_update, evaluate_client)``, TF computations.

  ``client_update(dataset, global_w, local_w) -> (new_local, weighted, examples, metrics)``
  (:func:`_client_round`); ``evaluate_client(dataset, global_w, local_w) ->
  OrderedDict(correct, examples, loss_sum)`` of the client's model on its test data.
  """
  @tff.tensorflow.computation(data_type, global_type, local_type)
  def client_update(dataset, global_w, local_w):
    return _client_round(model_fn, global_layers, epochs, lr, dataset, global_w, local_w)

  @tff.tensorflow.computation(eval_data_type, global_type, local_type)
  def evaluate_client(dataset, global_w, local_w):
    model, _, _, assigns = _load(model_fn, global_layers, tuple(global_w), tuple(local_w))
    with tf.control_dependencies(assigns):
      return tf.function(lambda d: dataset_metrics(model, d))(dataset)

  return client_update, evaluate_client


def _build_round(client_update, decode_upload, server_update, global_type, local_type,
                 data_type) -> triad.Round:
  """The round's computations (:func:`triad.build_round`): the aggregation is
  :func:`triad.weighted_mean_step` of the uploads; the new local layers pass through it."""
  mean_step = triad.weighted_mean_step(decode_upload, server_update,
                                       client_update.type_signature.result[3])

  def aggregate(global_w, new_local, weighted, examples, metrics):
    new_global, metrics = mean_step(global_w, weighted, examples, metrics)
    return new_global, new_local, metrics

  parameters = [("global_w", tff.FederatedType(global_type, tff.SERVER)),
                ("data", tff.FederatedType(data_type, tff.CLIENTS)),
                ("local_w", tff.FederatedType(local_type, tff.CLIENTS))]
  return triad.build_round(client_update, parameters, aggregate,
                           ("global_w", "new_local", "weighted", "examples", "metrics"))


def _evaluate_computation(evaluate_client, global_type, local_type, eval_data_type):
  """``evaluate(global@SERVER, local@CLIENTS, test@CLIENTS) -> metrics@CLIENTS``."""
  @tff.federated_computation(tff.FederatedType(global_type, tff.SERVER),
                             tff.FederatedType(local_type, tff.CLIENTS),
                             tff.FederatedType(eval_data_type, tff.CLIENTS))
  def evaluate_fn(global_w, local_w, data):
    return tff.federated_map(evaluate_client, (data, tff.federated_broadcast(global_w), local_w))
  return evaluate_fn


def build_lg_fedavg_process(model_fn: Callable[[], tf.keras.Model], element_spec,
                            eval_element_spec=None, *, global_layers: int = DEFAULT_GLOBAL_LAYERS,
                            local_epochs: int = 1,
                            learning_rate: float = DEFAULT_LEARNING_RATE) -> LGFedAvgProcess:
  """Builds LG-FedAvg's TFF process (see the module docstring).

  Args:
    model_fn: no-argument callable returning a fresh Keras model (logits) with
      the same initial weights on every call.
    element_spec: spec of a *batched* training dataset, ``OrderedDict(x, y)``.
    eval_element_spec: spec of the batched test datasets (default: the same).
    global_layers: how many weight layers, counted from the output, are global.
    local_epochs: SGD epochs per round; learning_rate: SGD step size.
  """
  if int(local_epochs) < 1:
    raise ValueError(f"local_epochs must be >= 1, got {local_epochs}")
  if not (np.isfinite(learning_rate) and learning_rate > 0):
    raise ValueError(f"learning_rate must be a finite number > 0, got {learning_rate}")
  probe = model_fn()
  local_vars, global_vars = split_layers(probe, global_layers)
  init_local = tuple(np.asarray(v.numpy()) for v in local_vars)
  init_global = tuple(np.asarray(v.numpy()) for v in global_vars)
  local_type, global_type = _type_of(local_vars), _type_of(global_vars)
  del probe
  data_type = tff.SequenceType(tff.types.tensorflow_to_type(element_spec))
  eval_data_type = tff.SequenceType(tff.types.tensorflow_to_type(eval_element_spec or element_spec))

  client_update, evaluate_client = _client_computations(
      model_fn, global_layers, int(local_epochs), float(learning_rate), data_type,
      eval_data_type, global_type, local_type)
  decode_upload, server_update = triad.build_checked_mean(global_type)
  # A round is two federated computations (see fedmask_tff.algorithms.base, "Several TFF
  # workers"): `client_work` (broadcast and local training, no aggregation) and `aggregate`
  # (checks, the sums, the server update); `next` is their composition.
  round_ = _build_round(client_update, decode_upload, server_update, global_type, local_type,
                        data_type)

  process = LGFedAvgProcess(triad.build_initialize(init_global), round_.next)
  process.evaluate = _evaluate_computation(evaluate_client, global_type, local_type,
                                           eval_data_type)
  process.client_work = round_.client_work
  process.aggregate = round_.aggregate
  process.client_update = client_update
  process.decode_upload = decode_upload
  process.evaluate_client = evaluate_client
  process.local_type, process.global_type = local_type, global_type
  process.initial_local_weights, process.initial_global_weights = init_local, init_global
  return process


def _as_state(weights) -> tuple:
  return tuple(np.asarray(w, np.float32) for w in weights)


class LGFedAvg(FederatedAlgorithm):
  """LG-FedAvg behind :class:`FederatedAlgorithm` (client state: the local layers)."""
  round_in_two_steps = True

  def __init__(self, context: BuildContext, global_layers: int, learning_rate: float):
    model_fn = context.dense_model_fn()
    self.name = "lg_fedavg"
    self.process = build_lg_fedavg_process(
        model_fn, context.element_spec, context.eval_element_spec, global_layers=global_layers,
        local_epochs=context.local_epochs, learning_rate=learning_rate)
    model = model_fn()
    local_vars, global_vars = split_layers(model, global_layers)
    self._costs = costs.weight_costs(model)
    self.model_parameters = int(sum(int(np.prod(v.shape)) for v in model.weights))
    self.global_parameters = int(sum(int(np.prod(v.shape)) for v in global_vars))
    self.local_parameters = int(sum(int(np.prod(v.shape)) for v in local_vars))
    layers = weight_layers(model)
    cut = len(layers) - global_layers
    self.description = (
        f"LG-FedAvg: local layers {[l.name for l in layers[:cut]]} kept by each client, global "
        f"layers {[l.name for l in layers[cut:]]} averaged (example-weighted) and the only thing "
        f"communicated ({self.global_parameters} float32 each way); evaluated with the client's "
        f"local layers and the current global layers")
    self.settings = dict(global_layers=int(global_layers), learning_rate=float(learning_rate),
                         local_epochs=int(context.local_epochs),
                         global_parameters=self.global_parameters,
                         local_parameters=self.local_parameters)

  def initial_client_state(self):
    return _as_state(self.process.initial_local_weights)

  def next(self, server_state, train_datasets, client_states):
    if client_states is None or len(client_states) != len(train_datasets):
      raise ValueError("LG-FedAvg needs one client state (local layers) per training dataset")
    new_global, new_local, outputs = self.run_round(
        server_state, list(train_datasets), [tuple(s) for s in client_states])
    metrics = []
    for m in outputs:
      m = payloads.to_python(m)
      # FLOPs of the examples processed, even by a client whose training diverged.
      m["train_flops"] = costs.train_flops(self._costs, m.pop("trained_examples"))
      metrics.append(m)
    return _as_state(new_global), [_as_state(s) for s in new_local], metrics

  def evaluate(self, server_state, test_datasets, client_states, train_datasets=None):
    if client_states is None or len(client_states) != len(test_datasets):
      raise ValueError("LG-FedAvg evaluation needs one client state per test dataset")
    out = self.process.evaluate(server_state, [tuple(s) for s in client_states], list(test_datasets))
    return [payloads.to_python(m) for m in out]


def build_lg_fedavg(context: BuildContext, global_layers: int = DEFAULT_GLOBAL_LAYERS,
                    learning_rate: Optional[float] = None) -> FederatedAlgorithm:
  """LG-FedAvg on the run's dense model (see the module docstring).

  ``global_layers``: weight layers counted from the output that are averaged
  (1..number of weight layers, else ValueError). ``learning_rate``: SGD step;
  ``None`` means :data:`DEFAULT_LEARNING_RATE` (the run's ``learning_rate``
  defaults to FedMask's score step, far too large for weights).
  """
  lr = DEFAULT_LEARNING_RATE if learning_rate is None else learning_rate
  return LGFedAvg(context, global_layers, lr)
