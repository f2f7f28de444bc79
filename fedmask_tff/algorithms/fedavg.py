"""FedAvg: TFF's own ``tff.learning.algorithms.build_weighted_fed_avg``, used as it is.

Our reference implementation of FedAvg, wrapped (not rewritten) so that the
runner can drive it like every other algorithm: the dense model of the run's
architecture, client SGD (``tff.learning.optimizers.build_sgdm``) for
``local_epochs`` passes over each client's data, example-weighted averaging of
the model deltas, and a server SGD step of ``server_learning_rate`` (1.0:
plain averaging).

Costs, from the payloads of TFF's process:

* downlink: the global ``ModelWeights`` (trainable and non-trainable) each
  client receives: ``8 * nbytes`` of those arrays (float32: 32 bits each);
* uplink: the client's model delta (the trainable weights' shapes and dtypes)
  plus its aggregation weight (one float32): ``8 * nbytes``;
* train_flops: :func:`fedmask_tff.models.costs.train_flops` of the dense model over
  the examples each client processed (counted from its dataset, all epochs).

TFF reports the training loss aggregated over the round's clients, not per
client: each client's ``loss_sum`` is that round mean times its examples, so
the round's mean is exact but per-client losses are not available.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from fedmask_tff.models import costs
from fedmask_tff.algorithms import evaluation
from fedmask_tff.wire import payloads
from fedmask_tff.algorithms.base import BuildContext, FederatedAlgorithm

DEFAULT_LEARNING_RATE = 0.05  # SGD, batch 32: McMahan et al. (2017) use 0.05-0.2 for their MNIST CNN.


def _count_examples(dataset) -> int:
  return int(dataset.reduce(np.int64(0), lambda c, b: c + tf.cast(tf.shape(b["y"])[0], tf.int64)))


def _nbits(arrays) -> int:
  return int(sum(8 * np.asarray(a).nbytes for a in tf.nest.flatten(arrays)))


class FedAvg(FederatedAlgorithm):
  name = "fedavg"

  def __init__(self, context: BuildContext, learning_rate: float = DEFAULT_LEARNING_RATE,
               server_learning_rate: float = 1.0):
    import tensorflow_federated as tff
    self.model_fn = context.dense_model_fn()
    self.local_epochs = int(context.local_epochs)
    self.dataset_repeats = self.local_epochs
    probe = self.model_fn()
    self.weight_costs = costs.weight_costs(probe)
    self.model_parameters = int(sum(np.prod(v.shape) for v in probe.trainable_weights))
    element_spec = context.element_spec

    def tff_model_fn():
      return tff.learning.models.from_keras_model(
          self.model_fn(), loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
          input_spec=element_spec, metrics=[tf.keras.metrics.SparseCategoricalAccuracy()])

    self.process = tff.learning.algorithms.build_weighted_fed_avg(
        tff_model_fn,
        client_optimizer_fn=tff.learning.optimizers.build_sgdm(learning_rate=learning_rate),
        server_optimizer_fn=tff.learning.optimizers.build_sgdm(learning_rate=server_learning_rate))
    self._evaluate_global, _, _ = evaluation.build_weights_evaluation(
        self.model_fn, context.eval_element_spec)
    self.settings = {"learning_rate": learning_rate, "server_learning_rate": server_learning_rate,
                     "implementation": "tff.learning.algorithms.build_weighted_fed_avg"}
    self.description = "dense model; TFF's weighted FedAvg; evaluated: the global model"

  def global_weights(self, server_state):
    weights = self.process.get_model_weights(server_state)
    return tuple(weights.trainable) + tuple(weights.non_trainable)

  def global_model(self, server_state):
    return self.model_fn, self.global_weights(server_state)

  def next(self, server_state, train_datasets, client_states):
    if self.dataset_computation is not None:  # Sources; the computation repeats the data.
      datasets = list(train_datasets)
      counts = [int(src["examples"]) * self.local_epochs for src in datasets]
    else:
      datasets = [d.repeat(self.local_epochs) for d in train_datasets]
      counts = [_count_examples(d) for d in datasets]
    weights = self.process.get_model_weights(server_state)
    downlink = _nbits(weights.trainable) + _nbits(weights.non_trainable)
    uplink = _nbits(weights.trainable) + 32  # delta + its float32 aggregation weight
    output = self.run_round(server_state, datasets)
    train = output.metrics["client_work"]["train"]
    mean_loss = float(train["loss"])
    out = []
    for n in counts:
      out.append({"loss_sum": mean_loss * n, "examples": float(n), "uplink_bits": uplink,
                  "downlink_bits": downlink,
                  "train_flops": float(costs.train_flops(self.weight_costs, n))})
    return output.state, None, out

  def evaluate(self, server_state, test_datasets, client_states, train_datasets):
    metrics = self._evaluate_global(self.global_weights(server_state), test_datasets)
    return payloads.eval_dicts(metrics)


def build_fedavg(context: BuildContext, learning_rate: float = DEFAULT_LEARNING_RATE,
                 server_learning_rate: float = 1.0) -> FedAvg:
  return FedAvg(context, learning_rate, server_learning_rate)
