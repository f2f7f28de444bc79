"""What every algorithm gives the runner: :class:`FederatedAlgorithm`.

Each algorithm module has a ``build_<name>(context, options) -> FederatedAlgorithm``
that composes a TFF iterative process (its ``process`` attribute) with the few
driver-side facts the runner needs. The runner owns the round loop, the client
sampling, the client-state store, outputs and the summary; an algorithm owns its
TFF computations.

Conventions, for every algorithm:

* ``next(server_state, train_datasets, client_states)`` runs one round for the
  sampled clients (``train_datasets``: one batched ``tf.data.Dataset`` per
  client, already shuffled for the round) and returns
  ``(server_state, new_client_states, client_metrics)``. ``new_client_states``
  is a list aligned with the clients, or ``None`` for a stateless algorithm.
  ``client_metrics`` is a list of dicts with at least

  - ``loss_sum`` (sum over the examples trained on of the cross-entropy) and
    ``examples`` (examples processed by training, all epochs);
  - ``uplink_bits``, ``downlink_bits``: bits this client sent and received this
    round, **counted from the payload tensors** (8 bits per uint8 byte, 32 per
    float32 / int32 element), never from a formula;
  - ``train_flops``: FLOPs of this client's local training this round, from
    :func:`fedmask_tff.models.costs.train_flops` with the examples actually processed.

* ``evaluate(server_state, test_datasets, client_states, train_datasets)``
  returns, per client, ``dict(correct, examples, loss_sum)`` of the client's
  *personalized* model on its own test data: the global model for FedAvg-style
  methods, the client's own model for personalized ones, after the adaptation
  step for Per-FedAvg (which uses ``train_datasets``).

* Several TFF workers (``--workers``): TFF's mergeable execution context splits
  a computation with one aggregation over workers, but it recomputes on the
  clients, after the aggregation, every per-client value computed before it.
  So a process whose ``next`` returns per-client outputs of local training
  also has two computations, ``client_work(server_state, data[, states])``
  (no aggregation; returns a tuple of CLIENTS-placed values) and
  ``aggregate(server_state, *client_work_outputs)`` (one aggregation;
  returns what ``next`` returns), with ``next`` their composition; the
  adapter calls :meth:`FederatedAlgorithm.run_round` and sets
  ``round_in_two_steps = True``. When ``split_round`` is set (the runner
  does it for ``--workers``), the round runs as those two calls.

* ``initial_client_state()`` is the numpy state of a client never seen, or
  ``None`` when the algorithm keeps no client state; ``make_store(directory)``
  returns the store the runner keeps states in.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, Callable, Optional

import tensorflow as tf


@dataclasses.dataclass
class BuildContext:
  """What the runner knows that every algorithm needs to build itself.

  Attributes:
    input_shape: shape of one example's ``x`` (no batch dimension).
    num_classes: number of labels (the model outputs logits of this size).
    model: architecture name (``"cnn"``, ``"mlp"``).
    model_width: width multiplier.
    seed: the run's seed (model initialisation).
    element_spec: element spec of a batched training dataset,
      ``OrderedDict(x=TensorSpec([None, ...]), y=TensorSpec([None], int32))``.
    eval_element_spec: the same for test datasets.
    local_epochs, learning_rate, batch_size: the run's local-training settings.
    mask_mode, score_init: masked-model settings (FedMask).
    split_round: run rounds as ``client_work`` then ``aggregate`` (several TFF workers).
    dataset_computation: ``None``, or a function ``repeats -> TFF computation`` turning a
      client's data source into its batched dataset inside the round's computation
      (``--client_datasets=workers``, :mod:`fedmask_tff.data.client_files`).
    client_states_dir: ``None``, or a directory where FedMask's client states travel as files
      that the worker reads and writes (``--client_states=files``,
      :mod:`fedmask_tff.wire.state_files`); the worker must see it at the same path.
  """
  input_shape: tuple
  num_classes: int
  model: str
  model_width: float
  seed: int
  element_spec: Any
  eval_element_spec: Any
  local_epochs: int
  learning_rate: float
  batch_size: int
  mask_mode: str = "ste"
  score_init: float = 0.05
  split_round: bool = False
  dataset_computation: Optional[Callable[[int], Any]] = None
  client_states_dir: Optional[str] = None

  def dense_model_fn(self) -> Callable[[], tf.keras.Model]:
    """The dense, trainable counterpart of the run's model (what FedAvg-style methods train)."""
    from fedmask_tff import models
    builder = models.dense_builder(self.model)
    return lambda: builder(input_shape=self.input_shape, num_classes=self.num_classes,
                           width=self.model_width, seed=self.seed)


class FederatedAlgorithm(abc.ABC):
  """A built algorithm: its TFF process plus the driver-side pieces (see the module docstring).

  Attributes:
    name: the ``--algorithm`` name.
    process: the ``tff.templates.IterativeProcess`` (or TFF's learning process).
    model_parameters: float32 parameters of the model the algorithm trains or
      masks; ``32 * model_parameters`` is what dense FedAvg sends each way.
    description: one line on what is trained, communicated and evaluated.
    settings: the algorithm's own settings, written to ``results.json["config"]``.
  """
  name: str = ""
  process: Any = None
  model_parameters: int = 0
  description: str = ""
  settings: dict = {}

  # True when ``process`` has ``client_work`` and ``aggregate`` (see the module docstring).
  round_in_two_steps: bool = False
  # From ``BuildContext.split_round`` (``--workers``): run rounds as ``client_work`` then
  # ``aggregate``.
  split_round: bool = False

  def initialize(self):
    return self.process.initialize()

  # From ``BuildContext.dataset_computation`` (``--client_datasets=workers``): a TFF computation
  # ``source -> batched dataset``; rounds then take sources instead of datasets and build each
  # dataset inside the computation.
  dataset_computation: Any = None
  # How often the dataset computation repeats a client's data (FedAvg: its local epochs).
  dataset_repeats: int = 1

  def run_round(self, server_state, *clients_args):
    """``process.next(server_state, *clients_args)``, or, when :attr:`split_round` is set,
    ``process.aggregate(server_state, *process.client_work(server_state, *clients_args))``:
    the same values, in two TFF calls that each split over workers without recomputation.
    With :attr:`dataset_computation` set, the first of ``clients_args`` holds sources and the
    computation that receives the data is composed with the dataset computation."""
    if self.split_round and self.round_in_two_steps:
      outputs = self._with_datasets("client_work")(server_state, *clients_args)
      return self.process.aggregate(server_state, *outputs)
    return self._with_datasets("next")(server_state, *clients_args)

  def _with_datasets(self, name: str):
    comp = getattr(self.process, name)
    if self.dataset_computation is None:
      return comp
    cache = self.__dict__.setdefault("_composed", {})
    if name not in cache:
      import tensorflow_federated as tff
      cache[name] = tff.simulation.compose_dataset_computation_with_computation(
          self.dataset_computation, comp)
    return cache[name]

  def initial_client_state(self) -> Optional[Any]:
    return None

  def client_state_bytes(self) -> int:
    """Bytes of one client's state as the process's computations take it; 0 when stateless."""
    state = self.initial_client_state()
    if state is None:
      return 0
    import numpy as np
    return int(sum(np.asarray(x).nbytes for x in tf.nest.flatten(state)))

  def client_state_message_bytes(self) -> int:
    """Bytes of one client's state in a TFF message (the runner checks that a round's states
    fit in one): :meth:`client_state_bytes` unless states travel otherwise (FedMask's files)."""
    return self.client_state_bytes()

  def make_store(self, directory: str):
    """The client-state store (``None`` for stateless algorithms)."""
    if self.initial_client_state() is None:
      return None
    from fedmask_tff.wire.client_state import ArrayStateStore
    return ArrayStateStore(directory, self.initial_client_state)

  @abc.abstractmethod
  def next(self, server_state, train_datasets: list, client_states: Optional[list]):
    """One round; see the module docstring."""

  @abc.abstractmethod
  def evaluate(self, server_state, test_datasets: list, client_states: Optional[list],
               train_datasets: list) -> list[dict]:
    """Personalized metrics per client; see the module docstring."""

  def late_joiner_states(self, server_state, store, count: int):
    """Client states for ``count`` clients that join after training (``--unseen_clients``).

    Default: the initial state (``None`` for stateless algorithms). FedMask
    starts them from the server's view of the masks instead.
    """
    if self.initial_client_state() is None:
      return None
    return [self.initial_client_state() for _ in range(count)]

  def global_model(self, server_state):
    """``(model_fn, weights)`` of the final global model (weights in
    :func:`fedmask_tff.algorithms.evaluation.model_weights` order), or ``None`` when the
    algorithm has none (personalized-only methods). The runner saves it as
    ``global_model.weights.h5`` (Keras) for export and deployment."""
    return None

  # True when every client does some work once before round 1 (see :meth:`prepare_clients`).
  prepares_clients: bool = False

  def prepare_clients(self, train_datasets: list, client_states: list):
    """Work each client does once before round 1 (FedMask with ``prune_at_init``: its pruning
    epoch). Returns ``(new_states, per-client metrics)``; metrics have ``uplink_bits``,
    ``train_flops``, ``examples`` and ``pruned``."""
    raise NotImplementedError(f"{self.name} does no work before round 1")

  def evaluate_extra(self, server_state, test_datasets, client_states, train_datasets) -> dict:
    """Optional further evaluations ``{name: [per-client metrics]}`` (FedMask: after aggregation)."""
    return {}

  # --- What the algorithm adds to the run's records (the runner knows no algorithm by name) ---
  def results_settings(self) -> dict:
    """Settings written at the top level of ``results.json["config"]`` (besides
    ``algorithm_settings``)."""
    return {}

  def round_extras(self, client_metrics: list) -> dict:
    """Entries the algorithm adds to a round's row, from its clients' metrics."""
    return {}

  def final_extras(self, rounds: list) -> dict:
    """Entries the algorithm adds to ``results.json["final"]``, from the round rows."""
    return {}
