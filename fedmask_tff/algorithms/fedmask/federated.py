"""FedMask's federated computations, composed from the TF computations of
:mod:`.client_work`, :mod:`.server_sums` and :mod:`.server_state`: ``initialize``,
``client_work`` and ``aggregate`` (the two halves of ``next``, which ``--workers`` calls one
after the other), ``next``, ``evaluate`` and ``prepare`` (the pruning epoch before round 1).
"""

from __future__ import annotations

import collections

import numpy as np
import tensorflow_federated as tff



def make_initialize(sh):
  """The server state's type and ``initialize``: G (score_sign), m^T (global_mask) or a round counter."""
  config, global_scores, global_state_type, initial_global_state = sh.config, sh.global_scores, sh.global_state_type, sh.initial_global_state
  initial_mask_state, mask_state_type = sh.initial_mask_state, sh.mask_state_type
  if global_scores:
    server_state_type = tff.FederatedType(global_state_type, tff.SERVER)

    @tff.federated_computation()
    def initialize_fn():
      return tff.federated_eval(initial_global_state, tff.SERVER)
  elif config.global_mask:
    server_state_type = tff.FederatedType(mask_state_type, tff.SERVER)

    @tff.federated_computation()
    def initialize_fn():
      return tff.federated_eval(initial_mask_state, tff.SERVER)
  else:
    server_state_type = tff.FederatedType(tff.TensorType(np.int32), tff.SERVER)

    @tff.federated_computation()
    def initialize_fn():
      return tff.federated_value(np.int32(0), tff.SERVER)
  return server_state_type, initialize_fn


def make_client_work_fn(sh):
  client_update, clients_state_type, config, data_type = sh.client_update_wire, sh.clients_state_type, sh.config, sh.data_type
  global_scores, server_state_type, start_from_global, start_from_mask = sh.global_scores, sh.server_state_type, sh.start_from_global_wire, sh.start_from_mask_wire

  @tff.federated_computation(server_state_type, tff.FederatedType(data_type, tff.CLIENTS),
                             clients_state_type)
  def client_work_fn(server_state, client_data, client_states):
    if global_scores:
      client_states = tff.federated_map(
          start_from_global, (tff.federated_broadcast(server_state.scores), client_states))
    elif config.global_mask:
      client_states = tff.federated_map(
          start_from_mask, (tff.federated_broadcast(server_state.mask), client_states))
    trained, upload, metrics = tff.federated_map(client_update, (client_data, client_states))
    return trained, upload, metrics
  return client_work_fn


def make_summed(sh):
  config, specs, sums_to_float, sums_to_int = sh.config, sh.specs, sh.sums_to_float, sh.sums_to_int
  decode_upload, sum_uploads = sh.decode_upload_wire, sh.sum_uploads

  def summed(upload, keep):
    """The server's sums of the round's uploads (``keep``: each client's pruning masks, in
    their form; see :func:`wire_forms.make_wire`)."""
    if not config.secure_aggregation:
      zero, accumulate, merge, report = sum_uploads
      return tff.federated_aggregate(tff.federated_zip((upload, keep)), zero(), accumulate,
                                     merge, report)
    decoded, _ = tff.federated_map(decode_upload, (upload, keep))
    counts = tff.federated_map(sums_to_int, decoded)
    secure = tff.federated_secure_sum_bitwidth(
        counts, collections.OrderedDict(total=tuple(config.secure_bitwidth for _ in specs),
                                        count=tuple(config.secure_bitwidth for _ in specs)))
    return tff.federated_map(sums_to_float, secure)
  return summed


def make_aggregate_fn(sh):
  client_update, clients_state_type, config, upload_valid = sh.client_update, sh.clients_state_type, sh.config, sh.upload_valid

  download_and_apply, global_downlink_bits, global_scores, global_step = sh.download_and_apply_wire, sh.global_downlink_bits_wire, sh.global_scores, sh.global_step
  increment, mask_downlink_bits, mask_step, server_state_type = sh.increment, sh.mask_downlink_bits_wire, sh.mask_step, sh.server_state_type
  summed, upload_type = sh.summed, sh.upload_type

  @tff.federated_computation(server_state_type, clients_state_type,
                             tff.FederatedType(upload_type, tff.CLIENTS),
                             tff.FederatedType(client_update.type_signature.result[2], tff.CLIENTS))
  def aggregate_fn(server_state, trained, upload, metrics):
    keep = trained if sh.wire.files else trained.keep  # pruning masks (with files: read there)
    valid = tff.federated_map(upload_valid, (upload, keep))
    sums = summed(upload, keep)
    if global_scores:
      new_server = tff.federated_map(global_step, (server_state, sums))
      new_states = trained
      downlink_bits = tff.federated_map(global_downlink_bits, (trained, metrics))
    elif config.global_mask:
      new_server = tff.federated_map(mask_step, (server_state, sums))
      new_states = trained
      downlink_bits = tff.federated_map(
          mask_downlink_bits, (tff.federated_broadcast(server_state.mask), trained, metrics))
    else:
      new_server = tff.federated_map(increment, server_state)
      new_states, downlink_bits = tff.federated_map(
          download_and_apply, (tff.federated_broadcast(sums), trained))
    client_metrics = tff.federated_zip(collections.OrderedDict(
        train=metrics, downlink_bits=downlink_bits, upload_valid=valid))
    return new_server, new_states, client_metrics
  return aggregate_fn


def make_next_fn(sh):
  aggregate_fn, client_work_fn, clients_state_type, data_type = sh.aggregate_fn, sh.client_work_fn, sh.clients_state_type, sh.data_type
  server_state_type = sh.server_state_type

  @tff.federated_computation(server_state_type, tff.FederatedType(data_type, tff.CLIENTS),
                             clients_state_type)
  def next_fn(server_state, client_data, client_states):
    trained, upload, metrics = client_work_fn(server_state, client_data, client_states)
    return aggregate_fn(server_state, trained, upload, metrics)
  return next_fn


def make_evaluate_fn(sh):
  eval_data_type, evaluate_client, packed_masks_type = sh.eval_data_type, sh.evaluate_client_wire, sh.packed_masks_type

  @tff.federated_computation(tff.FederatedType(eval_data_type, tff.CLIENTS),
                             tff.FederatedType(packed_masks_type, tff.CLIENTS))
  def evaluate_fn(client_data, client_masks):
    return tff.federated_map(evaluate_client, (client_data, client_masks))
  return evaluate_fn


def make_prepare_fn(sh):
  clients_state_type, data_type, prepare_client = sh.clients_state_type, sh.data_type, sh.prepare_client_wire

  @tff.federated_computation(tff.FederatedType(data_type, tff.CLIENTS), clients_state_type)
  def prepare_fn(client_data, client_states):
    new_states, metrics = tff.federated_map(prepare_client, (client_data, client_states))
    return new_states, metrics
  return prepare_fn
