"""Per-FedAvg (Fallah, Mokhtari, Ozdaglar, NeurIPS 2020) as a TFF process.

Per-FedAvg learns a global model ``w`` that is a good *starting point* for one
step of local SGD (MAML's objective ``F_i(w) = f_i(w - alpha * grad f_i(w))``).

**Client work** (``client_update``), for ``local_epochs`` passes over the
client's batched training data, taken as one stream of batches in consecutive
groups of 2 (``"fo"``) or 3 (``"hf"``): ``D, D'`` (``D''``); a group may span two
epochs, so a client with one batch an epoch (CIFAR-10's paper partition: 20
training examples, batch 32) still takes ``local_epochs // 2`` FO steps. The
round's trailing group with fewer batches is skipped (its examples are not
processed and not counted). One step:

* ``w_tmp = w - alpha * grad f(w; D)``
* first order (``"fo"``): ``w <- w - beta * grad f(w_tmp; D')``
* Hessian-free (``"hf"``): with ``g = grad f(w_tmp; D')``,
  ``w <- w - beta * (g - alpha * H(w; D'') g)`` where the Hessian-vector
  product is the paper's central finite difference
  ``H g ~ (grad f(w + delta g; D'') - grad f(w - delta g; D'')) / (2 delta)``
  (no second-order tape), so a step costs four gradient evaluations.

**Server**: the example-weighted mean of the returned client models (weights:
the examples of ``D`` and ``D'`` each client processed); a round in which no
client processed an example keeps the old model. The global model travels
dense, float32, both ways: bits are counted from the tensors (32 per element).
The process's ``client_work`` (broadcast and client work) and ``aggregate``
(this step) are the round's two halves, two calls when it is split over TFF
workers.

**Misbehaving clients**: a client whose training diverged (non-finite loss or
weights) uploads zeros with weight 0 and reports ``diverged = 1``
(``examples``, ``loss_sum`` 0; ``example_passes`` still counts its work); the
server's ``decode_upload`` drops an upload with a non-finite value or example
count (weight 0, ``upload_valid = 0`` in the client's metrics).

**Evaluation** (``adapt_and_evaluate``): every client first adapts the global
model with ``adapt_steps`` SGD step(s) of size ``alpha`` on its own training
data (one batch per step, the first batches of the dataset it is given,
repeated if it has fewer), then is tested on its own test data.

**Costs**: ``example_passes`` counts one forward+backward pass per example per
gradient evaluation: ``|D| + |D'|`` per step (fo), plus ``2 |D''|`` (hf).
``train_flops = costs.train_flops(weight_costs(model), example_passes)``.

Defaults (for a small CNN / MLP on Fashion-MNIST, batch 32):

* ``DEFAULT_ALPHA = 0.01``: the inner (personalisation) step. Public
  re-implementations use 0.005-0.01 (PFLlib: 0.005 with batch 10; FLGo: 0.01);
  the paper's experiments use 0.001-0.01. 0.03 diverged here (inner-step loss
  > 30 on the reference CNN, whose inputs are in [0, 1] and which has no biases).
* ``DEFAULT_BETA = 0.01``: the outer (meta) step. PFLlib and TorchFed use
  0.001, but with batch 32 and one epoch per round that learns slowly here.
* ``DEFAULT_HF_DELTA = 1e-3``: the paper's and FLGo's finite-difference step.

Measured (reference CNN at width 0.5, Fashion-MNIST, 20 clients, Dirichlet
0.1 labels, 5 clients a round, 1 local epoch, batch 32, alpha 0.01, one
seed): accuracy after the one-step adaptation, all 20 clients' test data
(global model without adaptation in brackets): beta 0.001, 10 rounds: 0.735
(0.128); beta 0.01, 10 rounds: 0.818 (0.393); beta 0.05, 10 rounds: 0.799
(0.623); 20 rounds: beta 0.01: 0.853 (0.403), beta 0.03: 0.870 (0.609),
HF with beta 0.01: 0.850 (0.523); alpha 0.03 with beta 0.01: 0.679 (0.100).
The defaults on the full-width reference CNN, same set-up, 20 rounds:
FO 0.871 (0.395), HF 0.878 (0.578).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Callable, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from fedmask_tff.models import costs
from fedmask_tff.wire import payloads
from fedmask_tff.algorithms import triad
from fedmask_tff.algorithms.base import BuildContext, FederatedAlgorithm
from fedmask_tff.algorithms.evaluation import assign_weights, dataset_metrics, loss_fn, model_weights

DEFAULT_ALPHA = 0.01
DEFAULT_BETA = 0.01
# The runner's --learning_rate for Per-FedAvg is its outer step beta.
DEFAULT_LEARNING_RATE = DEFAULT_BETA
DEFAULT_HF_DELTA = 1e-3
DEFAULT_ADAPT_STEPS = 1
VARIANTS = ("fo", "hf")
BATCHES_PER_STEP = {"fo": 2, "hf": 3}
_PAD_LABEL = -1


# --- Plain TF pieces (eager or graph) -------------------------------------------------------------


def gradients_at(model: tf.keras.Model, variables: Sequence[tf.Variable], weights, batch,
                 after=()):
  """``(loss, grads)`` of the mean cross-entropy of ``model`` at ``weights`` on ``batch``.

  Assigns ``weights`` (same order and shapes as ``variables``) to ``variables``
  first, after the ops in ``after`` (so that an earlier evaluation's variable
  reads finish before the overwrite in graph mode). ``loss`` is a float32
  scalar (mean over the batch); ``grads`` a list aligned with ``variables``
  (zeros for a variable the loss does not use).
  """
  with tf.control_dependencies(list(after)):
    assigns = [v.assign(w) for v, w in zip(variables, weights)]
  with tf.control_dependencies(assigns):
    with tf.GradientTape() as tape:
      loss = loss_fn(batch["y"], model(batch["x"], training=True))
  grads = tape.gradient(loss, list(variables))
  grads = [tf.zeros_like(v) if g is None else g for v, g in zip(variables, grads)]
  return loss, grads


def hessian_vector_product_fd(model, variables, weights, batch, vector, delta: float, after=()):
  """``H(weights; batch) @ vector`` by the central difference of gradients (Per-FedAvg HF).

  ``(grad f(w + delta v) - grad f(w - delta v)) / (2 delta)``: exact for a
  quadratic loss, ``O(delta^2 |v|^2)`` error otherwise. Two gradient evaluations.
  """
  plus = [w + delta * v for w, v in zip(weights, vector)]
  minus = [w - delta * v for w, v in zip(weights, vector)]
  _, g_plus = gradients_at(model, variables, plus, batch, after=after)
  _, g_minus = gradients_at(model, variables, minus, batch, after=g_plus)
  return [(gp - gm) / (2.0 * delta) for gp, gm in zip(g_plus, g_minus)]


def per_fedavg_step(model, variables, weights, batches, alpha: float, beta: float,
                    variant: str = "fo", delta: float = DEFAULT_HF_DELTA):
  """One Per-FedAvg local step from ``weights`` (tensors) on ``batches`` = ``(D, D')`` or ``(D, D', D'')``.

  Returns ``(new_weights, loss_sum, examples, example_passes)``: ``loss_sum``
  is ``|D| f(w; D) + |D'| f(w_tmp; D')`` (summed cross-entropies), ``examples``
  ``|D| + |D'|`` and ``example_passes`` the forward+backward example passes
  (``|D| + |D'|``, plus ``2 |D''|`` for ``"hf"``), all float32 scalars.
  """
  if variant not in VARIANTS:
    raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
  weights = list(weights)
  size = lambda b: tf.cast(tf.shape(b["y"])[0], tf.float32)  # noqa: E731
  loss1, g1 = gradients_at(model, variables, weights, batches[0])
  w_tmp = [w - alpha * g for w, g in zip(weights, g1)]
  loss2, g2 = gradients_at(model, variables, w_tmp, batches[1], after=g1)
  n1, n2 = size(batches[0]), size(batches[1])
  passes = n1 + n2
  if variant == "fo":
    direction = g2
  else:
    hvp = hessian_vector_product_fd(model, variables, weights, batches[2], g2, delta, after=g2)
    direction = [g - alpha * h for g, h in zip(g2, hvp)]
    passes = passes + 2.0 * size(batches[2])
  new_weights = [w - beta * d for w, d in zip(weights, direction)]
  return new_weights, loss1 * n1 + loss2 * n2, n1 + n2, passes


def group_batches(dataset: tf.data.Dataset, k: int) -> tf.data.Dataset:
  """Consecutive groups of ``k`` batches of a batched ``OrderedDict(x, y)`` dataset.

  Each element is ``OrderedDict(x=[k, B, ...], y=[k, B])``, shorter batches
  padded with label ``-1`` (see :func:`split_group`); an incomplete last group
  is dropped. One pass over ``dataset`` (its shuffling order is kept).
  """
  padding = collections.OrderedDict(
      (key, tf.constant(_PAD_LABEL if key == "y" else 0, spec.dtype))
      for key, spec in dataset.element_spec.items())
  return dataset.padded_batch(k, padding_values=padding, drop_remainder=True)


def split_group(group, k: int) -> list:
  """The ``k`` batches of one :func:`group_batches` element, padding removed."""
  out = []
  for i in range(k):
    n = tf.reduce_sum(tf.cast(tf.not_equal(group["y"][i], _PAD_LABEL), tf.int32))
    out.append(collections.OrderedDict((key, value[i][:n]) for key, value in group.items()))
  return out


def sgd_adapt(model, variables, dataset, steps: int, learning_rate: float):
  """``steps`` plain SGD steps on ``variables``, one batch each from ``dataset`` (repeated).

  Returns the number of examples used (float32). An empty dataset adapts nothing.
  """
  def step(acc, batch):
    with tf.GradientTape() as tape:
      loss = loss_fn(batch["y"], model(batch["x"], training=True))
    grads = tape.gradient(loss, list(variables))
    updates = [v.assign_sub(learning_rate * g) for v, g in zip(variables, grads) if g is not None]
    with tf.control_dependencies(updates):
      return acc + tf.cast(tf.shape(batch["y"])[0], tf.float32)
  return dataset.repeat().take(steps).reduce(tf.constant(0.0), step)


# --- The TFF process ------------------------------------------------------------------------------


class PerFedAvgProcess(tff.templates.IterativeProcess):
  """``initialize() -> weights@SERVER``; ``next(weights@SERVER, data@CLIENTS) -> (weights, metrics@CLIENTS)``.

  ``next`` is the composition of ``client_work`` (same arguments; returns
  ``client_update``'s ``(weighted, examples, metrics)`` at CLIENTS, no aggregation) and
  ``aggregate(weights@SERVER, weighted, examples, metrics)`` (checks, sums, server update).

  Extra attributes: ``adapt_and_evaluate`` (federated:
  ``(weights@SERVER, test@CLIENTS, train@CLIENTS) -> metrics@CLIENTS``),
  ``evaluate_global`` (no adaptation), and the TF computations
  ``client_update``, ``adapt_and_evaluate_client`` for tests.
  """


@dataclasses.dataclass(frozen=True)
class _Settings:
  """Per-FedAvg's settings as the TF computations use them (``local_epochs`` and
  ``adapt_steps`` as given; the step sizes as floats)."""
  variant: str
  alpha: float
  beta: float
  hf_delta: float
  local_epochs: int
  adapt_steps: int

  @property
  def k(self) -> int:
    """Batches per local step (:data:`BATCHES_PER_STEP`)."""
    return BATCHES_PER_STEP[self.variant]


def _meta_training(model, variables, s: _Settings):
  """A ``tf.function`` ``(dataset, start) -> (new_weights, loss_sum, examples, passes)``:
  :func:`per_fedavg_step` over consecutive groups of ``s.k`` batches (:func:`group_batches`) of
  ``s.local_epochs`` passes over ``dataset`` (one stream: a group may span two epochs), from
  the trainable weights ``start``; the sums are float32."""
  k = s.k

  @tf.function
  def train(dataset, start):
    groups = group_batches(dataset.repeat(s.local_epochs), k)

    def step(acc, group):
      w, loss_sum, examples, passes = acc
      new_w, l, n, p = per_fedavg_step(model, variables, w, split_group(group, k), s.alpha,
                                       s.beta, s.variant, s.hf_delta)
      return tuple(new_w), loss_sum + l, examples + n, passes + p

    acc = (tuple(start), tf.constant(0.0), tf.constant(0.0), tf.constant(0.0))
    return groups.reduce(acc, step)

  return train


def _client_round(model_fn, s: _Settings, n_train: int, dataset, weights):
  """One client's round: ``(weighted, examples, metrics)``.

  ``weights``: the broadcast model (model_weights order; the first ``n_train`` trainable).
  ``weighted`` is the new model times ``examples`` (float32: examples of ``D`` and ``D'``
  processed), the upload; ``metrics``: ``OrderedDict(loss_sum, examples, example_passes,
  uplink_bits, downlink_bits, diverged)``.
  """
  weights = tuple(weights)
  model = model_fn()
  fixed = [v.assign(w) for v, w in zip(model.non_trainable_weights, weights[n_train:])]
  train = _meta_training(model, model.trainable_weights, s)
  with tf.control_dependencies(fixed):
    new_w, loss_sum, examples, passes = train(dataset, weights[:n_train])
  new_weights = tuple(new_w) + tuple(weights[n_train:])
  # A client whose training diverged (non-finite loss or weights) uploads zeros with
  # weight 0 (``example_passes`` still counts the work it did).
  diverged = tf.logical_not(tf.reduce_all(tf.stack(
      [tf.math.is_finite(loss_sum)]
      + [tf.reduce_all(tf.math.is_finite(w)) for w in new_weights])))
  examples = tf.where(diverged, 0.0, examples)
  metrics = collections.OrderedDict(
      loss_sum=tf.where(diverged, 0.0, loss_sum), examples=examples, example_passes=passes,
      uplink_bits=payloads.tensor_bits(new_weights), downlink_bits=payloads.tensor_bits(weights),
      diverged=tf.cast(diverged, tf.int32))
  weighted = tuple(tf.where(diverged, tf.zeros_like(w), w * examples) for w in new_weights)
  return weighted, examples, metrics


def _evaluation_computations(model_fn, s: _Settings, eval_data_type, data_type, w_type):
  """``(adapt_and_evaluate_client, evaluate_client)``, TF computations returning
  ``OrderedDict(correct, examples, loss_sum)`` on the test data, after ``s.adapt_steps`` SGD
  steps of size ``s.alpha`` on the training data (the first) or without adaptation."""
  @tff.tensorflow.computation(eval_data_type, data_type, w_type)
  def adapt_and_evaluate_client(test_data, train_data, weights):
    model = model_fn()
    with tf.control_dependencies(assign_weights(model, weights)):
      adapted = tf.function(lambda d: sgd_adapt(model, model.trainable_weights, d, s.adapt_steps,
                                                s.alpha))(train_data)
    with tf.control_dependencies([adapted]):
      return tf.function(lambda d: dataset_metrics(model, d))(test_data)

  @tff.tensorflow.computation(eval_data_type, w_type)
  def evaluate_client(test_data, weights):
    model = model_fn()
    with tf.control_dependencies(assign_weights(model, weights)):
      return tf.function(lambda d: dataset_metrics(model, d))(test_data)

  return adapt_and_evaluate_client, evaluate_client


def _federated_evaluations(adapt_and_evaluate_client, evaluate_client, server_type,
                           eval_data_type, data_type):
  """``(adapt_and_evaluate, evaluate_global)``: the two client evaluations with the broadcast
  global model, ``(weights@SERVER, test@CLIENTS[, train@CLIENTS]) -> metrics@CLIENTS``."""
  @tff.federated_computation(server_type, tff.FederatedType(eval_data_type, tff.CLIENTS),
                             tff.FederatedType(data_type, tff.CLIENTS))
  def adapt_and_evaluate(weights, test_data, train_data):
    return tff.federated_map(adapt_and_evaluate_client,
                             (test_data, train_data, tff.federated_broadcast(weights)))

  @tff.federated_computation(server_type, tff.FederatedType(eval_data_type, tff.CLIENTS))
  def evaluate_global(weights, test_data):
    return tff.federated_map(evaluate_client, (test_data, tff.federated_broadcast(weights)))

  return adapt_and_evaluate, evaluate_global


def build_per_fedavg_process(model_fn: Callable[[], tf.keras.Model], element_spec,
                             eval_element_spec=None, *, variant: str = "fo",
                             alpha: float = DEFAULT_ALPHA, beta: float = DEFAULT_BETA,
                             hf_delta: float = DEFAULT_HF_DELTA, local_epochs: int = 1,
                             adapt_steps: int = DEFAULT_ADAPT_STEPS) -> PerFedAvgProcess:
  """Builds Per-FedAvg's TFF process (see the module docstring).

  Args:
    model_fn: no-argument callable returning a fresh Keras model (logits) with
      the same initial weights on every call (seeded initialisers).
    element_spec: spec of a *batched* training dataset, ``OrderedDict(x, y)``.
    eval_element_spec: spec of the batched test datasets (default: the same).
    variant: ``"fo"`` or ``"hf"``.
    alpha, beta: inner and outer step sizes; hf_delta: finite-difference step.
    local_epochs: passes over the training data per round.
    adapt_steps: SGD steps of size ``alpha`` before evaluation (0: none).
  """
  _validate(variant, alpha, beta, hf_delta, local_epochs, adapt_steps)
  s = _Settings(variant=variant, alpha=float(alpha), beta=float(beta), hf_delta=float(hf_delta),
                local_epochs=local_epochs, adapt_steps=adapt_steps)
  probe = model_fn()
  init = tuple(np.asarray(v.numpy()) for v in model_weights(probe))
  n_train = len(probe.trainable_weights)
  del probe
  w_type = tff.types.to_type(tuple(tff.TensorType(w.dtype, w.shape) for w in init))
  data_type = tff.SequenceType(tff.types.tensorflow_to_type(element_spec))
  eval_data_type = tff.SequenceType(tff.types.tensorflow_to_type(eval_element_spec or element_spec))
  server_type = tff.FederatedType(w_type, tff.SERVER)

  @tff.tensorflow.computation(data_type, w_type)
  def client_update(dataset, weights):
    return _client_round(model_fn, s, n_train, dataset, weights)

  decode_upload, server_update = triad.build_checked_mean(w_type)
  # A round is two federated computations (see fedmask_tff.algorithms.base, "Several TFF
  # workers"): `client_work` (broadcast and local training, no aggregation) and `aggregate`
  # (checks, the sums, the server update: triad.weighted_mean_step); `next` is their
  # composition.
  mean_step = triad.weighted_mean_step(decode_upload, server_update,
                                       client_update.type_signature.result[2])
  parameters = [("weights", server_type), ("data", tff.FederatedType(data_type, tff.CLIENTS))]
  round_ = triad.build_round(client_update, parameters, mean_step,
                             ("weights", "weighted", "examples", "metrics"))
  adapt_and_evaluate_client, evaluate_client = _evaluation_computations(
      model_fn, s, eval_data_type, data_type, w_type)

  process = PerFedAvgProcess(triad.build_initialize(init), round_.next)
  process.client_update = client_update
  process.decode_upload = decode_upload
  process.client_work = round_.client_work
  process.aggregate = round_.aggregate
  process.adapt_and_evaluate_client = adapt_and_evaluate_client
  process.adapt_and_evaluate, process.evaluate_global = _federated_evaluations(
      adapt_and_evaluate_client, evaluate_client, server_type, eval_data_type, data_type)
  process.weights_type = w_type
  return process


def _validate(variant, alpha, beta, hf_delta, local_epochs, adapt_steps):
  if variant not in VARIANTS:
    raise ValueError(f"Per-FedAvg variant must be one of {VARIANTS}, got {variant!r}")
  for name, value in (("alpha", alpha), ("beta", beta), ("hf_delta", hf_delta)):
    if not (np.isfinite(value) and value > 0):
      raise ValueError(f"Per-FedAvg {name} must be a finite number > 0, got {value}")
  if int(local_epochs) < 1:
    raise ValueError(f"local_epochs must be >= 1, got {local_epochs}")
  if int(adapt_steps) != adapt_steps or adapt_steps < 0:
    raise ValueError(f"adapt_steps must be an integer >= 0, got {adapt_steps}")


# --- The runner's interface -----------------------------------------------------------------------


class PerFedAvg(FederatedAlgorithm):
  """Per-FedAvg behind :class:`FederatedAlgorithm` (stateless clients)."""
  round_in_two_steps = True

  def __init__(self, context: BuildContext, variant: str, alpha: float, beta: float,
               hf_delta: float, adapt_steps: int):
    model_fn = context.dense_model_fn()
    self._model_fn = model_fn
    self.name = "per_fedavg" if variant == "fo" else "per_fedavg_hf"
    self.process = build_per_fedavg_process(
        model_fn, context.element_spec, context.eval_element_spec, variant=variant, alpha=alpha,
        beta=beta, hf_delta=hf_delta, local_epochs=context.local_epochs, adapt_steps=adapt_steps)
    model = model_fn()
    self._costs = costs.weight_costs(model)
    self.model_parameters = int(sum(int(np.prod(v.shape)) for v in model_weights(model)))
    self.description = (
        f"Per-FedAvg ({variant.upper()}): MAML-style local steps (alpha={alpha}, beta={beta}), "
        f"example-weighted FedAvg of the dense float32 model; evaluated after {adapt_steps} "
        f"local SGD step(s) of size alpha on each client's training data")
    self.settings = dict(variant=variant, alpha=float(alpha), beta=float(beta),
                         hf_delta=float(hf_delta), hvp="finite_difference",
                         adapt_steps=int(adapt_steps), local_epochs=int(context.local_epochs),
                         batches_per_step=BATCHES_PER_STEP[variant])

  def global_model(self, server_state):
    return self._model_fn, tuple(server_state)

  def next(self, server_state, train_datasets, client_states=None):
    new_state, outputs = self.run_round(server_state, list(train_datasets))
    metrics = []
    for m in outputs:
      m = payloads.to_python(m)
      m["train_flops"] = costs.train_flops(self._costs, m["example_passes"])
      metrics.append(m)
    return tuple(np.asarray(w) for w in new_state), None, metrics

  def evaluate(self, server_state, test_datasets, client_states, train_datasets):
    if len(test_datasets) != len(train_datasets):
      raise ValueError(f"{len(test_datasets)} test datasets but {len(train_datasets)} train datasets")
    out = self.process.adapt_and_evaluate(server_state, list(test_datasets), list(train_datasets))
    return [payloads.to_python(m) for m in out]

  def evaluate_extra(self, server_state, test_datasets, client_states, train_datasets):
    """``{"global": metrics}``: the global model without adaptation, for comparison."""
    return {"global": [payloads.to_python(m) for m in
                       self.process.evaluate_global(server_state, list(test_datasets))]}


def build_per_fedavg(context: BuildContext, variant: str = "fo", alpha: float = DEFAULT_ALPHA,
                     beta: float = DEFAULT_BETA, hf_delta: float = DEFAULT_HF_DELTA,
                     adapt_steps: int = DEFAULT_ADAPT_STEPS) -> FederatedAlgorithm:
  """Per-FedAvg on the run's dense model (see the module docstring).

  ``variant``: ``"fo"`` (first order) or ``"hf"`` (Hessian-free, finite
  difference with step ``hf_delta``). ``alpha``: inner / adaptation step,
  ``beta``: outer step. Local work: ``context.local_epochs`` epochs.
  """
  return PerFedAvg(context, variant, alpha, beta, hf_delta, adapt_steps)
