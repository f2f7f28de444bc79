"""FedMask's server state, when it keeps one: the global scores G (``upload="score_sign"``)
or the binary global mask m^T (``global_mask``): its initial value, its step from the round's
sums, how a selected client starts from it, and the downlink bits of that start.

Each ``make_*`` builds one computation from the facts it is given (by
:func:`fedmask_tff.algorithms.fedmask.process.build_fedmask_process`). Those named the same mean
the same throughout: ``config`` the :class:`.config.FedMaskConfig`; ``specs`` the model's masked
weights (``process.MaskSpec``), in order; ``thresholds`` each masked weight's tau;
``scores_type`` / ``state_type`` / ``sums_type`` the TFF types of a tuple of float32 tensors of
the masked weights' shapes, of a client's (full-size) state and of the float32 sums
``OrderedDict(total, count)``; ``metrics_type`` that of ``client_update``'s metrics;
``client_seed`` from :func:`.client_work.make_client_seed`; ``server_votes`` from
:func:`make_server_votes`; ``wire`` how client states cross the TFF boundary
(:class:`.wire_forms.Wire`). Computations made with :func:`.wire_forms.computations` come as
``(logical, federated)`` pairs.
"""

from __future__ import annotations

import collections

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from fedmask_tff.masks import aggregation, masking
from fedmask_tff.wire import bitpack, ldp, quantization
from fedmask_tff.algorithms.fedmask import wire_forms


def make_increment():
  """``increment(r) = r + 1`` (int32): the server state when it keeps only a round counter."""
  @tff.tensorflow.computation(tff.TensorType(np.int32))
  def increment(r):
    return r + 1
  return increment


def make_initial_global_state(config, initial_scores):
  """``initial_global_state()``: round 0 and G = ``initial_scores`` (the clients' initial
  scores, numpy, one per masked weight)."""

  @tff.tensorflow.computation
  def initial_global_state():
    scores = tuple(tf.constant(x) if config.score_init_noise > 0 else tf.fill(x.shape, x.flat[0])
                   for x in initial_scores)
    return collections.OrderedDict(round=tf.constant(0, tf.int32), scores=scores)
  return initial_global_state


def make_quantized_global(config):
  """``quantized_global(g, keep, seed)``, coded with ``config.downlink_bits`` bits."""

  def quantized_global(g, keep, seed):
    """score_sign with ``downlink_bits=b``: what the client receives of ``G`` at its kept
    positions: ``lo`` and ``hi`` (two float32) and each value as a ``b``-bit level of
    ``(G - lo) / (hi - lo)`` (:mod:`fedmask_tff.wire.quantization`); elsewhere ``G`` is unused."""
    flat_keep = tf.reshape(keep > 0, [-1])
    values = tf.boolean_mask(tf.reshape(g, [-1]), flat_keep)
    lo, hi = tf.reduce_min(values), tf.reduce_max(values)
    span = tf.maximum(hi - lo, 1e-12)
    packed, _ = quantization.quantize_tf((values - lo) / span, config.downlink_bits,
                                         config.downlink_stochastic, seed)
    received = lo + quantization.dequantize_tf(packed, tf.size(values), config.downlink_bits) * span
    positions = tf.where(flat_keep)
    return tf.reshape(tf.tensor_scatter_nd_update(tf.reshape(g, [-1]), positions, received), g.shape)
  return quantized_global


def make_start_from_global(wire, config, specs, global_scores, scores_type, state_type,
                           client_seed, quantized_global):
  """``start_from_global(server_scores, state) -> state``. ``global_scores``: whether the server
  keeps global scores (``upload="score_sign"``); ``quantized_global`` from
  :func:`make_quantized_global`."""

  def start_from_global(server_scores, state):
    """A selected client starts from the server's scores (mixed with its own by
    ``global_weight``) where it keeps the element."""
    beta = float(config.global_weight)
    if global_scores and config.downlink_bits >= 2:
      server_scores = tuple(
          quantized_global(g, k, client_seed(state["keep"], state["rounds"], 300 + i))
          for i, (g, k) in enumerate(zip(server_scores, state["keep"])))
    scores = tuple(
        s if (config.personal_head and spec.prunable)
        else tf.where(k > 0, beta * g + (1.0 - beta) * s, s)
        for g, s, k, spec in zip(server_scores, state["scores"], state["keep"], specs))
    return collections.OrderedDict(scores=scores, keep=state["keep"], personal=state["personal"],
                                   rounds=state["rounds"])
  return wire_forms.computations(wire, start_from_global, (scores_type, state_type), {1: "state"}, "state")


def make_server_votes(config):
  """``server_votes(sums)``, with ``config``'s ``ldp_epsilon`` and ``min_shared``."""

  def server_votes(sums):
    """Per tensor: ``(v, shared)``: the share of 1s among the clients keeping each element
    (debiased under LDP) and whether at least ``min_shared`` clients keep it."""
    votes = []
    for total, count in zip(sums["total"], sums["count"]):
      if config.ldp_epsilon > 0:
        total = ldp.debias_sum_tf(total, count, config.ldp_epsilon)
      votes.append(aggregation.votes(total, count, config.min_shared))
    return votes
  return server_votes


def make_global_step(config, global_state_type, sums_type, server_votes):
  """``global_step(server, sums) -> server`` on G (``global_state_type``: the TFF type of the
  server state ``OrderedDict(round, scores)``)."""

  @tff.tensorflow.computation(global_state_type, sums_type)
  def global_step(server, sums):
    """``G += step * (2v - 1)`` where at least ``min_shared`` clients keep the element."""
    new = tuple(g + tf.where(shared, config.server_score_step * (2.0 * vote - 1.0), 0.0)
                for g, (vote, shared) in zip(server["scores"], server_votes(sums)))
    return collections.OrderedDict(round=server["round"] + 1, scores=new)
  return global_step


def make_initial_mask_state(specs):
  """``initial_mask_state()``: round 0 and m^T "unchanged" everywhere."""

  @tff.tensorflow.computation
  def initial_mask_state():
    return collections.OrderedDict(round=tf.constant(0, tf.int32),
                                   mask=tuple(tf.fill(s.shape, aggregation.UNCHANGED) for s in specs))
  return initial_mask_state


def mask_message(m, keep):
  """What a client receives of m^T (one tensor): its bit per kept element, packed, plus a
  packed "defined" bit per kept element while any of them has no m^T yet. Returns the
  decoded message scattered back (``aggregation.UNCHANGED`` where not kept or undefined)
  and its int64 size in bits."""
  flat_keep = tf.reshape(keep > 0, [-1])
  values = tf.boolean_mask(tf.reshape(m, [-1]), flat_keep)
  packed_bits = bitpack.pack_bits_tf(tf.cast(values > 0, tf.float32))
  packed_defined = bitpack.pack_bits_tf(tf.cast(values >= 0, tf.float32))
  any_undefined = tf.reduce_any(values < 0)
  size = tf.cast(tf.size(packed_bits) * 8 + tf.where(any_undefined, tf.size(packed_defined) * 8, 0),
                 tf.int64)
  n = tf.size(values)
  defined = tf.where(any_undefined, bitpack.unpack_bits_tf(packed_defined, n), tf.ones([n]))
  message = tf.where(defined > 0, bitpack.unpack_bits_tf(packed_bits, n), aggregation.UNCHANGED)
  positions = tf.where(flat_keep)
  received = tf.tensor_scatter_nd_update(tf.fill([tf.size(keep)], aggregation.UNCHANGED), positions,
                                         message)
  return tf.reshape(received, keep.shape), size


def make_start_from_mask(wire, config, thresholds, scores_type, state_type):
  """``start_from_mask(global_mask_value, state) -> state``."""

  def start_from_mask(global_mask_value, state):
    """Algorithm 1 line 11: a selected client moves its scores by m^T where it keeps the element
    (``score_restart``; ``scaled_logit`` restarts them from m^T ⊙ m_k), its own elsewhere."""
    scores = tuple(
        masking.apply_vote(s, mask_message(m, k)[0], config.score_restart, config.restart_scale,
                           config.restart_eps, t)
        for m, s, k, t in zip(global_mask_value, state["scores"], state["keep"], thresholds))
    return collections.OrderedDict(scores=scores, keep=state["keep"], personal=state["personal"],
                                   rounds=state["rounds"])
  return wire_forms.computations(wire, start_from_mask, (scores_type, state_type), {1: "state"}, "state")


def make_mask_step(mask_state_type, sums_type, thresholds, server_votes):
  """``mask_step(server, sums) -> server`` on m^T (``mask_state_type``: the TFF type of the
  server state ``OrderedDict(round, mask)``)."""

  @tff.tensorflow.computation(mask_state_type, sums_type)
  def mask_step(server, sums):
    """m^T = 1[v >= tau] where at least ``min_shared`` clients keep the element; else unchanged."""
    new = tuple(tf.where(shared, tf.cast(vote >= t, tf.float32), m)
                for m, (vote, shared), t in zip(server["mask"], server_votes(sums), thresholds))
    return collections.OrderedDict(round=server["round"] + 1, mask=new)
  return mask_step


def make_mask_downlink_bits(wire, scores_type, state_type, metrics_type):
  """``mask_downlink_bits(global_mask_value, state, metrics) -> int64``."""

  def mask_downlink_bits(global_mask_value, state, metrics):
    """Bits of the m^T message the client received at the start of its round (all positions
    before its pruning)."""
    sizes = [mask_message(m, tf.where(metrics["pruned"] > 0, tf.ones_like(k), k))[1]
             for m, k in zip(global_mask_value, state["keep"])]
    return tf.add_n(sizes)
  return wire_forms.computations(wire, mask_downlink_bits, (scores_type, state_type, metrics_type),
                                 {1: "state"})


def make_global_downlink_bits(wire, config, specs, state_type, metrics_type):
  """``global_downlink_bits(state, metrics) -> int64``."""

  def global_downlink_bits(state, metrics):
    """float32 G at the positions the client kept when it started (all before its pruning)."""
    counts = [tf.where(metrics["pruned"] > 0, tf.constant(spec.size, tf.int64),
                       tf.cast(tf.reduce_sum(k), tf.int64)) for spec, k in zip(specs, state["keep"])]
    if not config.downlink_bits:
      return 32 * tf.add_n(counts)
    b = int(config.downlink_bits)  # b-bit codes, whole bytes per tensor, plus lo and hi
    return tf.add_n([8 * ((n * b + 7) // 8) + 64 for n in counts])
  return wire_forms.computations(wire, global_downlink_bits, (state_type, metrics_type),
                                 {0: "state"})
