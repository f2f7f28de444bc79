"""Standalone: every client trains its own dense model on its own data; nothing is communicated.

The paper's lower bound on communication (0 bits) and its "no collaboration"
reference. **Budget rule (the paper's: the same total local training as
FedMask)**: clients are sampled by the same round loop and seed as FedMask, and
a sampled client trains ``local_epochs`` epochs, plus one more at its first
round (FedMask's one-shot pruning epoch), so every client runs exactly as many
local epochs as it would under FedMask.

Client state: ``OrderedDict(weights=(arrays of the dense model, in
evaluation.model_weights order), rounds=int32)``, kept by the runner's store.
The TFF process: ``next(server_state@SERVER, data@CLIENTS, states@CLIENTS) ->
(server_state, states@CLIENTS, metrics@CLIENTS)``; the server only counts rounds.
"""

from __future__ import annotations

import collections

import numpy as np
import tensorflow as tf

from fedmask_tff.models import costs
from fedmask_tff.algorithms import evaluation
from fedmask_tff.wire import payloads
from fedmask_tff.algorithms.base import BuildContext, FederatedAlgorithm
from fedmask_tff.algorithms.local_training import sgd_epochs

DEFAULT_LEARNING_RATE = 0.05  # the same local SGD as our FedAvg.


class Standalone(FederatedAlgorithm):
  name = "standalone"

  def __init__(self, context: BuildContext, learning_rate: float = DEFAULT_LEARNING_RATE,
               first_round_extra_epochs: int = 1):
    import tensorflow_federated as tff
    model_fn = context.dense_model_fn()
    self.model_fn = model_fn
    probe = model_fn()
    self.weight_costs = costs.weight_costs(probe)
    self._initial_weights = evaluation.weights_numpy(probe)
    self.model_parameters = int(sum(np.prod(v.shape) for v in probe.trainable_weights))
    epochs, extra = int(context.local_epochs), int(first_round_extra_epochs)
    w_type = evaluation.weights_type(model_fn)
    state_type = tff.types.to_type(collections.OrderedDict(weights=w_type,
                                                           rounds=tff.TensorType(np.int32)))
    data_type = tff.SequenceType(tff.types.tensorflow_to_type(context.element_spec))

    @tff.tensorflow.computation(data_type, state_type)
    def client_update(dataset, state):
      model = model_fn()
      with tf.control_dependencies(evaluation.assign_weights(model, state["weights"])):
        n_epochs = tf.where(tf.equal(state["rounds"], 0), epochs + extra, epochs)
        loss_sum, count = sgd_epochs(model, model.trainable_weights, dataset, n_epochs, learning_rate)
      with tf.control_dependencies([loss_sum, count]):
        weights = tuple(tf.identity(v) for v in evaluation.model_weights(model))
      new_state = collections.OrderedDict(weights=weights, rounds=state["rounds"] + 1)
      metrics = collections.OrderedDict(loss_sum=loss_sum, examples=count,
                                        uplink_bits=tf.constant(0, tf.int64),
                                        downlink_bits=tf.constant(0, tf.int64))
      return new_state, metrics

    @tff.tensorflow.computation(tff.TensorType(np.int32))
    def increment(r):
      return r + 1

    @tff.federated_computation()
    def initialize_fn():
      return tff.federated_value(np.int32(0), tff.SERVER)

    @tff.federated_computation(tff.FederatedType(tff.TensorType(np.int32), tff.SERVER),
                               tff.FederatedType(data_type, tff.CLIENTS),
                               tff.FederatedType(state_type, tff.CLIENTS))
    def next_fn(server_state, data, states):
      new_states, metrics = tff.federated_map(client_update, (data, states))
      return tff.federated_map(increment, server_state), new_states, metrics

    self.process = tff.templates.IterativeProcess(initialize_fn, next_fn)
    self.client_update = client_update
    _, self._evaluate_personal, _ = evaluation.build_weights_evaluation(
        model_fn, context.eval_element_spec)
    self.settings = {"learning_rate": learning_rate,
                     "budget_rule": f"same local epochs as FedMask: local_epochs per sampled round "
                                    f"+ {extra} at a client's first round (FedMask's pruning epoch)"}
    self.description = "dense model per client, trained on its own data only; 0 bits"

  def initial_client_state(self):
    return collections.OrderedDict(weights=tuple(w.copy() for w in self._initial_weights),
                                   rounds=np.int32(0))

  def next(self, server_state, train_datasets, client_states):
    server_state, new_states, metrics = self.run_round(server_state, train_datasets, client_states)
    out = [{"loss_sum": float(m["loss_sum"]), "examples": float(m["examples"]),
            "uplink_bits": int(m["uplink_bits"]), "downlink_bits": int(m["downlink_bits"]),
            "train_flops": float(costs.train_flops(self.weight_costs, float(m["examples"])))}
           for m in metrics]
    return server_state, list(new_states), out

  def evaluate(self, server_state, test_datasets, client_states, train_datasets):
    metrics = self._evaluate_personal([s["weights"] for s in client_states], test_datasets)
    return payloads.eval_dicts(metrics)


def build_standalone(context: BuildContext, learning_rate: float = DEFAULT_LEARNING_RATE) -> Standalone:
  return Standalone(context, learning_rate)
