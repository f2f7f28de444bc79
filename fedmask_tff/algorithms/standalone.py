"""Standalone: every client trains its own dense model on its own data; nothing is communicated.

The paper's lower bound on communication (0 bits) and its "no collaboration"
reference. The paper gives Standalone "the same total training time as FedMask";
two readings of that budget (``budget``, ``--standalone_budget``, recorded in
``results.json["config"]`` and in the algorithm's settings):

* ``"equal_epochs"`` (default): clients are sampled by the same round loop and
  seed as FedMask, and a sampled client trains ``local_epochs`` epochs, plus one
  more at its first round (FedMask's one-shot pruning epoch), so every client
  runs exactly as many local epochs as it would under FedMask.
* ``"every_round"``: every client trains ``local_epochs`` epochs in every round
  of the run (plus the one extra epoch at its first), sampled or not: a device
  trains all the time, the wall-clock reading. Standalone's clients never
  interact, so training a client's missed rounds when it is next sampled, and
  the rounds after its last sample just before its evaluation, gives the same
  epochs as training in every round: a client's state records the rounds it has
  trained through, and a round (or the evaluation) trains
  ``local_epochs * (rounds to catch up)`` epochs. The epochs trained at the
  evaluation are reported in ``results.json["final"]`` (``final_extras``:
  ``standalone_catch_up_epochs``, ``standalone_catch_up_examples``), not in the
  round rows.

Client state: ``OrderedDict(weights=(arrays of the dense model, in
evaluation.model_weights order), rounds=int32)``, kept by the runner's store;
``rounds`` is the number of rounds the client took part in (``equal_epochs``) or
the number of the run's rounds it has trained through (``every_round``).
The TFF process: ``next(server_state@SERVER, data@CLIENTS, states@CLIENTS) ->
(server_state, states@CLIENTS, metrics@CLIENTS)``; the server only counts rounds
(int32, the rounds finished).
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
BUDGETS = ("equal_epochs", "every_round")  # see the module docstring


def _epochs_and_rounds(rounds, target, epochs: int, extra: int, every_round: bool):
  """``(epochs to train now, the state's new rounds)``, int32 scalars.

  ``rounds``: the state's rounds; ``target``: the run's rounds once this round (or, at an
  evaluation, the rounds finished) is done. ``equal_epochs``: ``epochs`` (+ ``extra`` at a
  client's first round) and ``rounds + 1``; ``every_round``: ``epochs`` per round not yet
  trained (+ ``extra`` if the client never trained) and ``target``.
  """
  first = tf.where(tf.equal(rounds, 0), extra, 0)
  if not every_round:
    return epochs + first, rounds + 1
  behind = tf.maximum(target - rounds, 0)
  return tf.where(behind > 0, epochs * behind + first, 0), tf.maximum(target, rounds)


class Standalone(FederatedAlgorithm):
  name = "standalone"

  def __init__(self, context: BuildContext, learning_rate: float = DEFAULT_LEARNING_RATE,
               first_round_extra_epochs: int = 1, budget: str = "equal_epochs"):
    import tensorflow_federated as tff
    if budget not in BUDGETS:
      raise ValueError(f"unknown standalone budget {budget!r}; valid: {', '.join(BUDGETS)}")
    model_fn = context.dense_model_fn()
    self.model_fn = model_fn
    probe = model_fn()
    self.weight_costs = costs.weight_costs(probe)
    self._initial_weights = evaluation.weights_numpy(probe)
    self.model_parameters = int(sum(np.prod(v.shape) for v in probe.trainable_weights))
    epochs, extra, every_round = int(context.local_epochs), int(first_round_extra_epochs), \
        budget == "every_round"
    self.budget, self._catch_up = budget, {}
    w_type = evaluation.weights_type(model_fn)
    state_type = tff.types.to_type(collections.OrderedDict(weights=w_type,
                                                           rounds=tff.TensorType(np.int32)))
    data_type = tff.SequenceType(tff.types.tensorflow_to_type(context.element_spec))
    round_type = tff.TensorType(np.int32)

    @tff.tensorflow.computation(data_type, state_type, round_type)
    def client_update(dataset, state, target):
      model = model_fn()
      with tf.control_dependencies(evaluation.assign_weights(model, state["weights"])):
        n_epochs, rounds = _epochs_and_rounds(state["rounds"], target, epochs, extra, every_round)
        loss_sum, count = sgd_epochs(model, model.trainable_weights, dataset, n_epochs, learning_rate)
      with tf.control_dependencies([loss_sum, count]):
        weights = tuple(tf.identity(v) for v in evaluation.model_weights(model))
      new_state = collections.OrderedDict(weights=weights, rounds=rounds)
      metrics = collections.OrderedDict(loss_sum=loss_sum, examples=count, epochs=n_epochs,
                                        uplink_bits=tf.constant(0, tf.int64),
                                        downlink_bits=tf.constant(0, tf.int64))
      return new_state, metrics

    @tff.tensorflow.computation(round_type)
    def increment(r):
      return r + 1

    @tff.federated_computation()
    def initialize_fn():
      return tff.federated_value(np.int32(0), tff.SERVER)

    server_type = tff.FederatedType(round_type, tff.SERVER)
    clients_types = (tff.FederatedType(data_type, tff.CLIENTS),
                     tff.FederatedType(state_type, tff.CLIENTS))

    # The round number reaches the clients as a broadcast: a device knows the time by itself,
    # so it is not counted as communication (downlink_bits stays 0).
    @tff.federated_computation(server_type, *clients_types)
    def next_fn(server_state, data, states):
      target = tff.federated_map(increment, server_state)
      new_states, metrics = tff.federated_map(
          client_update, (data, states, tff.federated_broadcast(target)))
      return target, new_states, metrics

    @tff.federated_computation(server_type, *clients_types)
    def catch_up_fn(server_state, data, states):
      new_states, metrics = tff.federated_map(
          client_update, (data, states, tff.federated_broadcast(server_state)))
      return new_states, metrics

    self.process = tff.templates.IterativeProcess(initialize_fn, next_fn)
    self.client_update, self._catch_up_fn = client_update, catch_up_fn
    _, self._evaluate_personal, _ = evaluation.build_weights_evaluation(
        model_fn, context.eval_element_spec)
    rule = (f"every client trains local_epochs ({epochs}) in every round of the run (missed rounds "
            f"caught up when next sampled and before evaluation)" if every_round else
            f"same local epochs as FedMask: local_epochs per sampled round")
    self.settings = {"learning_rate": learning_rate, "budget": budget,
                     "budget_rule": f"{rule} + {extra} at a client's first round "
                                    "(FedMask's pruning epoch)"}
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
    if self.budget == "every_round":
      client_states = self._caught_up(server_state, train_datasets, client_states)
    metrics = self._evaluate_personal([s["weights"] for s in client_states], test_datasets)
    return payloads.eval_dicts(metrics)

  def _caught_up(self, server_state, train_datasets, client_states):
    """``every_round``: the states after training the rounds each client has not trained
    through (up to ``server_state``, the rounds finished); the epochs and examples are
    summed per evaluated round for :meth:`final_extras`."""
    states, metrics = self._catch_up_fn(server_state, train_datasets, client_states)
    finished = int(server_state)
    if self._catch_up.get("round") != finished:
      self._catch_up = {"round": finished, "epochs": 0, "examples": 0.0, "train_flops": 0.0}
    for m in metrics:
      self._catch_up["epochs"] += int(m["epochs"])
      self._catch_up["examples"] += float(m["examples"])
      self._catch_up["train_flops"] += float(costs.train_flops(self.weight_costs,
                                                               float(m["examples"])))
    return list(states)

  def final_extras(self, rounds: list) -> dict:
    """``every_round``: the local training done just before the final evaluation (epochs,
    examples and FLOPs summed over the evaluated clients; not in the round rows)."""
    if self.budget != "every_round":
      return {"standalone_budget": self.budget}
    done = self._catch_up if self._catch_up.get("round") == len(rounds) else {}
    return {"standalone_budget": self.budget,
            "standalone_catch_up_epochs": int(done.get("epochs", 0)),
            "standalone_catch_up_examples": float(done.get("examples", 0.0)),
            "standalone_catch_up_train_flops": float(done.get("train_flops", 0.0))}

  def late_joiner_states(self, server_state, store, count: int):
    """Untrained states (as with ``equal_epochs``); under ``every_round`` marked as trained
    through the run's rounds, so that the evaluation does not train them."""
    states = [self.initial_client_state() for _ in range(count)]
    if self.budget == "every_round":
      for state in states:
        state["rounds"] = np.int32(server_state)
    return states


def build_standalone(context: BuildContext, learning_rate: float = DEFAULT_LEARNING_RATE,
                     budget: str = "equal_epochs") -> Standalone:
  return Standalone(context, learning_rate, budget=budget)
