"""FedMask's federated computations, composed from the TF computations of
:mod:`.client_work`, :mod:`.server_sums` and :mod:`.server_state`: ``initialize``,
``client_work`` and ``aggregate`` (the two halves of ``next``, which ``--workers`` calls one
after the other), ``next``, ``evaluate`` and ``prepare`` (the pruning epoch before round 1).

Each ``make_*`` builds one computation from the facts it is given (by
:func:`fedmask_tff.algorithms.fedmask.process.build_fedmask_process`). Those named the same mean
the same throughout: ``config`` the :class:`.config.FedMaskConfig`; ``global_scores`` whether the
server keeps global scores (``upload="score_sign"``); ``data_type`` the TFF type of a client's
training dataset; ``clients_state_type`` of the CLIENTS-placed client states (wire form, or
file paths); ``server_state_type`` of the SERVER-placed server state (:func:`make_initialize`).
Arguments ending in ``_wire`` are the federated (wire-form) halves of the ``(logical,
federated)`` pairs of :mod:`.client_work`, :mod:`.server_sums` and :mod:`.server_state`.
"""

from __future__ import annotations

import collections

import numpy as np
import tensorflow_federated as tff



def make_initialize(config, global_scores, global_state_type, mask_state_type, initial_global_state,
                    initial_mask_state):
  """The server state's type and ``initialize``: G (score_sign), m^T (global_mask) or a round
  counter. ``global_state_type`` / ``mask_state_type``: the TFF types of G's and m^T's server
  state; ``initial_global_state`` / ``initial_mask_state``: their initial values
  (:mod:`.server_state`)."""
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


def make_client_work_fn(config, global_scores, server_state_type, data_type, clients_state_type,
                        client_update_wire, start_from_global_wire, start_from_mask_wire):
  """``client_work(server_state, data, states) -> (trained, upload, metrics)``, all @CLIENTS."""

  @tff.federated_computation(server_state_type, tff.FederatedType(data_type, tff.CLIENTS),
                             clients_state_type)
  def client_work_fn(server_state, client_data, client_states):
    if global_scores:
      client_states = tff.federated_map(
          start_from_global_wire, (tff.federated_broadcast(server_state.scores), client_states))
    elif config.global_mask:
      client_states = tff.federated_map(
          start_from_mask_wire, (tff.federated_broadcast(server_state.mask), client_states))
    trained, upload, metrics = tff.federated_map(client_update_wire, (client_data, client_states))
    return trained, upload, metrics
  return client_work_fn


def make_summed(config, specs, sum_uploads, decode_upload_wire, sums_to_int, sums_to_float):
  """``summed(upload, keep)`` (a Python function for the federated computations): the round's
  sums, through ``sum_uploads`` (:func:`.server_sums.make_sum_uploads`) or, with secure
  aggregation, ``decode_upload_wire`` per client, ``sums_to_int``, the secure sum and
  ``sums_to_float``. ``specs``: the model's masked weights (one bitwidth each)."""

  def summed(upload, keep):
    """The server's sums of the round's uploads (``keep``: each client's pruning masks, in
    their form; see :func:`wire_forms.make_wire`)."""
    if not config.secure_aggregation:
      zero, accumulate, merge, report = sum_uploads
      return tff.federated_aggregate(tff.federated_zip((upload, keep)), zero(), accumulate,
                                     merge, report)
    decoded, _ = tff.federated_map(decode_upload_wire, (upload, keep))
    counts = tff.federated_map(sums_to_int, decoded)
    secure = tff.federated_secure_sum_bitwidth(
        counts, collections.OrderedDict(total=tuple(config.secure_bitwidth for _ in specs),
                                        count=tuple(config.secure_bitwidth for _ in specs)))
    return tff.federated_map(sums_to_float, secure)
  return summed


def make_aggregate_fn(config, global_scores, states_in_files, server_state_type, clients_state_type,
                      upload_type, metrics_type, upload_valid, summed, global_step, mask_step,
                      increment, global_downlink_bits_wire, mask_downlink_bits_wire,
                      download_and_apply_wire):
  """``aggregate(server_state, trained, upload, metrics) -> (server_state, states, metrics)``.

  ``states_in_files``: whether client states travel as file paths; ``upload_type`` /
  ``metrics_type``: the TFF types of a client's upload and of ``client_update``'s metrics;
  ``upload_valid`` (:func:`.server_sums.make_upload_valid`); ``summed`` (:func:`make_summed`);
  ``global_step``, ``mask_step``, ``increment``: the server state's step (:mod:`.server_state`).
  """

  @tff.federated_computation(server_state_type, clients_state_type,
                             tff.FederatedType(upload_type, tff.CLIENTS),
                             tff.FederatedType(metrics_type, tff.CLIENTS))
  def aggregate_fn(server_state, trained, upload, metrics):
    keep = trained if states_in_files else trained.keep  # pruning masks (with files: read there)
    valid = tff.federated_map(upload_valid, (upload, keep))
    sums = summed(upload, keep)
    if global_scores:
      new_server = tff.federated_map(global_step, (server_state, sums))
      new_states = trained
      downlink_bits = tff.federated_map(global_downlink_bits_wire, (trained, metrics))
    elif config.global_mask:
      new_server = tff.federated_map(mask_step, (server_state, sums))
      new_states = trained
      downlink_bits = tff.federated_map(
          mask_downlink_bits_wire, (tff.federated_broadcast(server_state.mask), trained, metrics))
    else:
      new_server = tff.federated_map(increment, server_state)
      new_states, downlink_bits = tff.federated_map(
          download_and_apply_wire, (tff.federated_broadcast(sums), trained))
    client_metrics = tff.federated_zip(collections.OrderedDict(
        train=metrics, downlink_bits=downlink_bits, upload_valid=valid))
    return new_server, new_states, client_metrics
  return aggregate_fn


def make_next_fn(server_state_type, data_type, clients_state_type, client_work_fn, aggregate_fn):
  """``next``: ``client_work_fn`` then ``aggregate_fn`` (:func:`make_client_work_fn`,
  :func:`make_aggregate_fn`)."""

  @tff.federated_computation(server_state_type, tff.FederatedType(data_type, tff.CLIENTS),
                             clients_state_type)
  def next_fn(server_state, client_data, client_states):
    trained, upload, metrics = client_work_fn(server_state, client_data, client_states)
    return aggregate_fn(server_state, trained, upload, metrics)
  return next_fn


def make_evaluate_fn(eval_data_type, packed_masks_type, evaluate_client_wire):
  """``evaluate(data@CLIENTS, packed masks@CLIENTS) -> metrics@CLIENTS``; ``eval_data_type``
  and ``packed_masks_type``: the TFF types of an evaluation dataset and of bit-packed masks."""

  @tff.federated_computation(tff.FederatedType(eval_data_type, tff.CLIENTS),
                             tff.FederatedType(packed_masks_type, tff.CLIENTS))
  def evaluate_fn(client_data, client_masks):
    return tff.federated_map(evaluate_client_wire, (client_data, client_masks))
  return evaluate_fn


def make_prepare_fn(data_type, clients_state_type, prepare_client_wire):
  """``prepare(data@CLIENTS, states@CLIENTS) -> (states, metrics)``, the pruning epoch."""

  @tff.federated_computation(tff.FederatedType(data_type, tff.CLIENTS), clients_state_type)
  def prepare_fn(client_data, client_states):
    new_states, metrics = tff.federated_map(prepare_client_wire, (client_data, client_states))
    return new_states, metrics
  return prepare_fn
