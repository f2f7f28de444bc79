"""FedMask's aggregation: validating and decoding each upload, summing ``mask * keep`` and
``keep`` per element one client at a time (or through the secure sum), and the download: each
client's float32 (or quantized) mean over the clients sharing an element, and its restart.

Each ``make_*`` builds one computation from the facts it is given (by
:func:`fedmask_tff.algorithms.fedmask.process.build_fedmask_process`). Those named the same mean
the same throughout: ``specs`` the model's masked weights (``process.MaskSpec``), in order;
``config`` the :class:`.config.FedMaskConfig`; ``thresholds`` each masked weight's tau;
``upload_type`` / ``scores_type`` / ``state_type`` / ``sums_type`` / ``int_sums_type`` the TFF
types of an upload, of a tuple of float32 tensors of the masked weights' shapes, of a client's
(full-size) state and of the sums ``OrderedDict(total, count)`` in float32 / int32; ``wire`` how
client states cross the TFF boundary (:class:`.wire_forms.Wire`). Computations made with
:func:`.wire_forms.computations` come as ``(logical, federated)`` pairs.
"""

from __future__ import annotations

import collections

import tensorflow as tf
import tensorflow_federated as tff

from fedmask_tff.masks import aggregation, masking
from fedmask_tff.wire import bitpack, ldp, quantization
from fedmask_tff.algorithms.fedmask import wire_forms


def decode_upload_body(specs):
  """The TF function ``decode_upload(upload, cached_keep) -> (sums, valid)`` for ``specs``."""

  def decode_upload(upload, cached_keep):
    """Validates one client's upload and turns it into its share of the two sums.

    An upload is valid when every packed mask has exactly ``ceil(n/8)`` bytes,
    every sent pruning mask has 0 (not sent) or ``ceil(n/8)`` bytes, the
    padding bits after the ``n`` elements are 0, and no mask bit is set where
    the client's pruning mask is 0. An invalid upload adds nothing to either
    sum (the client is dropped from the round's aggregate); ``valid`` says which.
    """
    sizes_ok = [tf.equal(tf.size(upload["mask"][i]), bitpack.packed_size_bytes(spec.size))
                for i, spec in enumerate(specs)]
    j = 0
    for spec in specs:
      if spec.prunable:
        n = tf.size(upload["keep"][j])
        sizes_ok.append(tf.logical_or(tf.equal(n, 0), tf.equal(n, bitpack.packed_size_bytes(spec.size))))
        j += 1
    sizes_ok = tf.reduce_all(sizes_ok)

    def decode():
      totals, counts, ok = [], [], []
      j = 0
      for i, spec in enumerate(specs):
        nbytes = bitpack.packed_size_bytes(spec.size)
        all_bits = bitpack.unpack_bits_tf(upload["mask"][i], nbytes * 8)
        ok.append(tf.equal(tf.reduce_sum(all_bits[spec.size:]), 0.0))
        bits = tf.reshape(all_bits[:spec.size], spec.shape)
        keep = cached_keep[i]
        if spec.prunable:
          sent = upload["keep"][j]
          j += 1
          sent_bits = tf.cond(tf.size(sent) > 0,
                              lambda s=sent, nb=nbytes: bitpack.unpack_bits_tf(s, nb * 8),
                              lambda nb=nbytes: tf.zeros([nb * 8]))
          ok.append(tf.equal(tf.reduce_sum(sent_bits[spec.size:]), 0.0))
          keep = tf.cond(tf.size(sent) > 0,
                         lambda b=sent_bits, sp=spec: tf.reshape(b[:sp.size], sp.shape),
                         lambda k=keep: k)
        ok.append(tf.equal(tf.reduce_sum(bits * (1.0 - keep)), 0.0))
        totals.append(bits * keep)
        counts.append(keep)
      valid = tf.reduce_all(ok)
      scale = tf.cast(valid, tf.float32)
      return (tuple(t * scale for t in totals), tuple(c * scale for c in counts), valid)

    def reject():
      zeros = tuple(tf.zeros(spec.shape) for spec in specs)
      return zeros, zeros, tf.constant(False)

    totals, counts, valid = tf.cond(sizes_ok, decode, reject)
    return collections.OrderedDict(total=totals, count=counts), tf.cast(valid, tf.int32)
  return decode_upload


def make_decode_upload(wire, specs, upload_type, scores_type):
  """``decode_upload(upload, keep) -> (sums, valid)`` (:func:`decode_upload_body`)."""
  return wire_forms.computations(wire, decode_upload_body(specs), (upload_type, scores_type),
                                 {1: "keep"})


def make_upload_valid(wire, specs, upload_type, scores_type):
  """``(upload, keep) -> int32``: whether the server accepts the upload (``decode_upload``'s
  second result; the sums come from :func:`make_sum_uploads`); the federated computation only."""
  decode_upload = decode_upload_body(specs)
  return wire_forms.computations(wire, lambda upload, keep: decode_upload(upload, keep)[1],
                       (upload_type, scores_type), {1: "keep"})[1]


def make_sum_uploads(wire, specs, upload_type, sums_type):
  """``tff.federated_aggregate`` pieces that sum the decoded uploads one client at a time:
  ``(zero, accumulate, merge, report)``. ``accumulate(sums, (upload, keep))`` decodes a client's
  upload and adds it, so that decoded uploads (8 bytes a mask element) never exist for every
  client of the round at once, as a ``federated_map`` before ``federated_sum`` would keep
  them. The sums are of 0/1 values, exact in float32 in any order."""
  decode_upload = decode_upload_body(specs)
  keep_type, unpack_keep = wire.forms["keep"]

  @tff.tensorflow.computation
  def zero():
    zeros = tuple(tf.zeros(s.shape) for s in specs)
    return collections.OrderedDict(total=zeros, count=zeros)

  def add(a, b):
    return collections.OrderedDict(total=tuple(x + y for x, y in zip(a["total"], b["total"])),
                                   count=tuple(x + y for x, y in zip(a["count"], b["count"])))

  @tff.tensorflow.computation(sums_type, (upload_type, keep_type))
  def accumulate(sums, client):
    return add(sums, decode_upload(client[0], unpack_keep(client[1]))[0])

  merge = tff.tensorflow.computation(add, sums_type, sums_type)
  report = tff.tensorflow.computation(lambda sums: sums, sums_type)
  return zero, accumulate, merge, report


def make_sums_to_int(sums_type):
  """``sums_to_int(sums)``: float32 sums rounded to int32 (for the secure sum)."""

  @tff.tensorflow.computation(sums_type)
  def sums_to_int(sums):
    return collections.OrderedDict(total=tuple(tf.cast(tf.round(t), tf.int32) for t in sums["total"]),
                                   count=tuple(tf.cast(tf.round(c), tf.int32) for c in sums["count"]))
  return sums_to_int


def make_sums_to_float(int_sums_type):
  """``sums_to_float(sums)``: int32 sums back to float32."""

  @tff.tensorflow.computation(int_sums_type)
  def sums_to_float(sums):
    return collections.OrderedDict(total=tuple(tf.cast(t, tf.float32) for t in sums["total"]),
                                   count=tuple(tf.cast(c, tf.float32) for c in sums["count"]))
  return sums_to_float


def make_download_and_apply(wire, config, specs, thresholds, sums_type, state_type, client_seed):
  """``download_and_apply(sums, state) -> (state, downlink bits)`` (step 4 of a round);
  ``client_seed`` from :func:`.client_work.make_client_seed` (stochastic quantization)."""

  def download_and_apply(sums, state):
    new_scores, bits = [], []
    for i in range(len(specs)):
      keep = state["keep"][i]
      count = sums["count"][i]
      total = sums["total"][i]
      if config.ldp_epsilon > 0:  # Unbiased estimate of the true count of ones.
        total = ldp.debias_sum_tf(total, count, config.ldp_epsilon)
      message = tf.boolean_mask(  # float32, one per kept element
          tf.reshape(aggregation.received(keep, total, count, config.min_shared), [-1]),
          tf.reshape(keep > 0, [-1]))
      if config.downlink_bits == 1:
        # The paper's binary downlink: the vote's decision 1[v >= tau] where averaged, the
        # client's own bit elsewhere; 1 bit per kept element.
        own = tf.boolean_mask(tf.reshape(masking.binary_mask(state["scores"][i], thresholds[i]), [-1]),
                              tf.reshape(keep > 0, [-1]))
        decision = tf.where(message >= 0.0, tf.cast(message >= thresholds[i], tf.float32), own)
        packed = bitpack.pack_bits_tf(decision)
        bits.append(tf.size(packed) * 8)
        message = bitpack.unpack_bits_tf(packed, tf.size(decision))
      elif config.downlink_bits:
        packed, _ = quantization.quantize_tf(
            message, config.downlink_bits, config.downlink_stochastic,
            client_seed(state["keep"], state["rounds"], 100 + i))
        bits.append(tf.size(packed) * 8)
        message = quantization.dequantize_tf(packed, tf.size(message), config.downlink_bits)
      else:
        bits.append(tf.size(message) * 32)
      # Client: scatter the message back to its kept positions and move its scores by it.
      positions = tf.where(tf.reshape(keep > 0, [-1]))
      received = tf.reshape(tf.scatter_nd(positions, message, [tf.size(keep, tf.int64)])
                            + tf.where(tf.reshape(keep > 0, [-1]), 0.0, aggregation.UNCHANGED),
                            keep.shape)
      new_scores.append(masking.apply_vote(state["scores"][i], received, config.score_restart,
                                           config.restart_scale, config.restart_eps, thresholds[i]))
    new_state = collections.OrderedDict(scores=tuple(new_scores), keep=state["keep"],
                                        personal=state["personal"], rounds=state["rounds"])
    return new_state, tf.cast(tf.add_n(bits), tf.int64)
  return wire_forms.computations(wire, download_and_apply, (sums_type, state_type), {1: "state"}, "first")
