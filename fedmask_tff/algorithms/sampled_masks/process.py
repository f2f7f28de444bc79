"""The TFF process of the sampled-mask algorithms, composed from typed pieces.

* the server state (:func:`initial_server_state`): ``OrderedDict(theta, alpha, beta, defined,
  round)``, per masked weight the probability theta the server holds (FedPM's global mask, m^T of
  FedMask), its Beta(alpha, beta) belief, ``defined`` (at least ``min_shared`` clients sent the
  element in some round) and the round count;
* client work (:func:`build_client_update`, the plain-TF round of :mod:`.client`);
* the server's decode of one upload (:func:`build_decode`: the sampled bits back at their
  positions, the client's kept elements as counts) and its update (:func:`build_server_update`:
  :func:`fedmask_tff.masks.probability.posterior`, theta where the element was shared);
* the round, composed by :func:`fedmask_tff.algorithms.triad.build_upload_round` (``client_work``,
  ``aggregate``, ``next``), and the evaluation of masks given as scores and packed keep masks.
"""

from __future__ import annotations

import collections
from typing import Callable, NamedTuple

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from fedmask_tff.algorithms import evaluation, triad
from fedmask_tff.algorithms.sampled_masks import client
from fedmask_tff.algorithms.sampled_masks.config import SampledMaskConfig, WeightPlan
from fedmask_tff.masks import layers as masked_layers_lib
from fedmask_tff.masks import probability
from fedmask_tff.wire import bitpack


def weight_plan(model: tf.keras.Model, config: SampledMaskConfig, everything_personal: bool = False):
  """``[WeightPlan]`` of ``model``'s masked weights (``layers.mask_variables`` order)."""
  from fedmask_tff.masks import pruning
  flags = pruning.prunable_flags(model, int(config.prune_last_layers))
  last = config.prune_last_layers if config.personal_layers < 0 else config.personal_layers
  personal = pruning.prunable_flags(model, min(int(last), int(config.prune_last_layers)))
  kernels, _, _ = masked_layers_lib.mask_variables(model)
  return [WeightPlan(k.name, tuple(k.shape.as_list()), int(np.prod(k.shape)), bool(p),
                     everything_personal or (bool(q) and config.personal_head))
          for k, p, q in zip(kernels, flags, personal)]


def initial_scores(plan, config: SampledMaskConfig) -> tuple:
  """N(mean, std^2) scores per weight (float32), drawn from ``config.seed``."""
  rng = np.random.default_rng([config.seed, 0x5C0E])
  return tuple((config.score_init_mean + config.score_init_std * rng.standard_normal(spec.shape))
               .astype(np.float32) for spec in plan)


def initial_server_state(plan, config: SampledMaskConfig) -> collections.OrderedDict:
  scores = initial_scores(plan, config)
  prior = [np.full(spec.shape, config.prior, np.float32) for spec in plan]
  return collections.OrderedDict(
      theta=tuple((1.0 / (1.0 + np.exp(-s))).astype(np.float32) for s in scores),
      alpha=tuple(prior), beta=tuple(p.copy() for p in prior),
      defined=tuple(np.zeros(spec.shape, np.bool_) for spec in plan), round=np.int32(0))


def initial_client_state(plan, config: SampledMaskConfig) -> collections.OrderedDict:
  """``OrderedDict(scores, keep, pruned)``, and ``offset`` (zeros) with ``personal_offset``."""
  state = collections.OrderedDict(
      scores=initial_scores(plan, config),
      keep=tuple(bitpack.pack_bits_np(np.ones(spec.size, np.uint8)) for spec in plan),
      pruned=np.int32(0))
  if config.personal_offset > 0:
    state["offset"] = tuple(np.zeros(spec.shape, np.float32) for spec in plan)
  return state


def _type_of(value):
  return tff.types.to_type(tf.nest.map_structure(
      lambda a: tff.TensorType(np.asarray(a).dtype, np.asarray(a).shape), value))


def _initialize(value):
  """``initialize() -> value@SERVER`` (a structure of numpy arrays, as constants)."""
  @tff.tensorflow.computation
  def initial():
    return tf.nest.map_structure(tf.constant, value)

  @tff.federated_computation()
  def initialize():
    return tff.federated_eval(initial, tff.SERVER)
  return initialize


def build_client_update(model_fn: Callable, plan, config, data_type, server_type, state_type):
  """TF computation ``(data, server_state, client_state) -> (upload, new_state, metrics)``."""
  @tff.tensorflow.computation(data_type, server_type, state_type)
  def client_update(dataset, server, state):
    return client.client_round(model_fn(), plan, config, dataset, server, state)
  return client_update


def build_decode(plan, upload_type):
  """``decode_and_validate(upload, examples) -> ((ones, counts), 1.0, valid)``: per weight, the
  sampled bits at their positions and the 0/1 kept elements (float32, the weight's shape).
  ``valid``: every payload has the size its keep mask implies; an invalid upload counts 0."""
  def check_and_decode(upload, examples):
    bits, keeps = upload
    ones, counts, ok = [], [], [tf.math.is_finite(examples)]
    for spec, b, k in zip(plan, bits, keeps):
      keep = client.unpack_keep(k, spec.shape) if spec.prunable else tf.ones(spec.shape)
      kept = tf.cast(tf.reduce_sum(keep), tf.int32)
      ok.append(tf.equal(tf.size(b), (kept + 7) // 8))
      where = tf.where(tf.reshape(keep, [-1]) > 0)
      flat = tf.scatter_nd(where, bitpack.unpack_bits_tf(b, kept), [spec.size])
      ones.append(tf.reshape(flat, spec.shape))
      counts.append(keep)
    valid = tf.reduce_all(tf.stack(ok))
    zero = lambda ts: tuple(tf.where(valid, t, tf.zeros_like(t)) for t in ts)  # noqa: E731
    return (zero(ones), zero(counts)), tf.where(valid, 1.0, 0.0), tf.cast(valid, tf.int32)
  return triad.build_decoders(check_and_decode, upload_type)[1]


def build_server_update(plan, config, server_type, sums_type):
  """``server_update(state, (ones, counts), clients) -> state``: the Beta posterior per element
  (the prior reset first in rounds ``reset_every`` divides), theta where the element was sent by
  at least ``min_shared`` clients, ``defined`` there too; the round count + 1."""
  @tff.tensorflow.computation(server_type, sums_type, tff.TensorType(np.float32))
  def server_update(state, sums, clients):
    del clients
    ones, counts = sums
    rnd = state["round"] + 1
    out = collections.OrderedDict(theta=[], alpha=[], beta=[], defined=[])
    for t, a, b, d, o, c in zip(state["theta"], state["alpha"], state["beta"], state["defined"],
                                ones, counts):
      if config.reset_every > 0:
        now = tf.equal(rnd % config.reset_every, 0)
        a, b = tf.where(now, config.prior, a), tf.where(now, config.prior, b)
      a2, b2 = probability.posterior(a, b, o, c, config.evidence_decay, config.prior,
                                     config.min_shared)
      shared = c >= config.min_shared
      out["theta"].append(tf.where(shared, probability.theta(a2, b2), t))
      out["alpha"].append(a2)
      out["beta"].append(b2)
      out["defined"].append(tf.logical_or(d, shared))
    result = collections.OrderedDict((k, tuple(v)) for k, v in out.items())
    result["round"] = rnd
    return result
  return server_update


class Computations(NamedTuple):
  """What an algorithm adapter calls: the round (``triad.Round``), ``initialize``, and
  ``evaluate(data@CLIENTS, scores@CLIENTS, keep@CLIENTS) -> metrics@CLIENTS`` of thresholded
  masks (``1[sigmoid(m_r) >= 0.5] * keep``)."""
  round: triad.Round
  initialize: tff.Computation
  evaluate: tff.Computation
  client_update: tff.Computation


def build_computations(model_fn: Callable, plan, config: SampledMaskConfig, element_spec,
                       eval_element_spec, stateful: bool = True) -> Computations:
  """The process's computations. ``stateful=False`` (FedPM): clients keep no state; each starts
  from the initial state's constants (every weight shared, nothing pruned)."""
  data_type = tff.SequenceType(tff.types.tensorflow_to_type(element_spec))
  server0 = initial_server_state(plan, config)
  state0 = initial_client_state(plan, config)
  server_type, state_type = _type_of(server0), _type_of(state0)
  client_update = build_client_update(model_fn, plan, config, data_type, server_type, state_type)
  if not stateful:
    @tff.tensorflow.computation(data_type, server_type)
    def stateless_update(dataset, server):
      constant = tf.nest.map_structure(tf.constant, state0)
      upload, _, metrics = client.client_round(model_fn(), plan, config, dataset, server, constant)
      return upload, metrics
    update = stateless_update
  else:
    update = client_update
  upload_type = update.type_signature.result[0]
  decode = build_decode(plan, upload_type)
  sums_type = decode.type_signature.result[0]
  server_update = build_server_update(plan, config, server_type, sums_type)
  round_ = triad.build_upload_round(update, decode, server_update, server_type, data_type,
                                    client_state=("client_states", "new_states", state_type)
                                    if stateful else None)
  return Computations(round_, _initialize(server0),
                      build_mask_evaluation(model_fn, plan, eval_element_spec), client_update)


def build_mask_evaluation(model_fn: Callable, plan, eval_element_spec):
  """``evaluate(data@CLIENTS, scores@CLIENTS, keep@CLIENTS)``: each client's thresholded mask."""
  data_type = tff.SequenceType(tff.types.tensorflow_to_type(eval_element_spec))
  scores_type = tff.types.to_type(tuple(tff.TensorType(np.float32, s.shape) for s in plan))
  keep_type = tff.types.to_type(tuple(tff.TensorType(np.uint8, [(s.size + 7) // 8]) for s in plan))

  @tff.tensorflow.computation(data_type, scores_type, keep_type)
  def evaluate_client(dataset, scores, keep):
    model = model_fn()
    _, score_vars, keep_vars = masked_layers_lib.mask_variables(model)
    assigns = ([v.assign(s) for v, s in zip(score_vars, scores)]
               + [v.assign(client.unpack_keep(k, spec.shape)) for v, k, spec in zip(keep_vars, keep, plan)])
    with tf.control_dependencies(assigns):
      return tf.function(lambda d: evaluation.dataset_metrics(model, d))(dataset)

  @tff.federated_computation(tff.FederatedType(data_type, tff.CLIENTS),
                             tff.FederatedType(scores_type, tff.CLIENTS),
                             tff.FederatedType(keep_type, tff.CLIENTS))
  def evaluate(data, scores, keep):
    return tff.federated_map(evaluate_client, (data, scores, keep))
  return evaluate
