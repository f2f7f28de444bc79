"""The FedMask iterative process on TFF (``build_fedmask_process``).

One round, for the sampled clients (all TFF computations; W never travels: every
client rebuilds it from the model's seed):

1. **Client work** (``client_update``): load the client's scores ``m_r`` and
   pruning mask ``keep`` from its state. At its first round the client trains
   one epoch, then keeps the top ``prune_rate`` of ``|W * m_r|`` in the last
   ``prune_last_layers`` masked layers (one-shot pruning, for good). Then it
   trains ``local_epochs`` epochs of SGD on ``m_r`` (W frozen).
2. **Upload** (``encode_upload``): the binary mask ``1[sigmoid(m_r) >= tau] * keep``
   of every masked weight, bit-packed (8 per byte); at the client's first
   round also its packed pruning masks. Bits are counted from these bytes.
3. **Server** (``tff.federated_aggregate`` whose ``accumulate`` runs ``decode_upload``):
   unpack each payload and sum, per element, ``mask * keep`` and ``keep``, one client at a
   time (with secure aggregation: ``decode_upload`` per client, then the secure sum). The
   server keeps every client's pruning mask from its first upload (the paper's server does
   the same); in the simulation that cached copy travels with the client state.
4. **Download** (``encode_download`` / ``apply_download``): each client gets a
   float32 value per element it keeps: the mean over the clients sharing the
   element where at least ``min_shared`` (2) keep it, else -1 ("unchanged").
   The client restarts ``m_r`` from the means
   (:func:`fedmask_tff.masks.masking.scores_from_mask_values`) and keeps its own
   scores elsewhere. Bits are counted from that float32 message.

``next(server_state, client_data, client_states)`` returns
``(server_state, client_states, client_metrics)``; the states are
CLIENTS-placed values (in their wire form, or the paths of files holding it:
``client_states="files"``, :mod:`fedmask_tff.wire.state_files`), kept between rounds by
:class:`fedmask_tff.wire.client_state.PackedStateStore` in the driver. ``next`` is the
composition of ``process.client_work`` (steps 1-2, no aggregation) and
``process.aggregate`` (steps 3-4, one sum), which ``--workers`` calls one after
the other so that TFF's mergeable context can split each over several workers.

Where each part lives: this module derives the facts the computations are built from
(``_facts``: the masked weights, initial scores, thresholds and TFF types) and composes the
process, passing each factory the facts it uses;
:mod:`.client_work` the client's computations (steps 1-2, evaluation), :mod:`.server_sums` the
aggregation (steps 3-4), :mod:`.server_state` the server's G or m^T when it keeps one,
:mod:`.federated` the federated computations, and :mod:`.wire_forms` how client states cross
the TFF boundary.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Callable, NamedTuple

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from fedmask_tff.masks import pruning
from fedmask_tff.wire import bitpack
from fedmask_tff.models import costs
from fedmask_tff.masks.layers import masked_layers

from fedmask_tff.algorithms.fedmask import client_work, federated, server_state, server_sums, wire_forms
from fedmask_tff.algorithms.fedmask.config import FedMaskConfig

@dataclasses.dataclass(frozen=True)
class MaskSpec:
  """One masked weight tensor of the model."""
  name: str
  shape: tuple
  prunable: bool

  @property
  def size(self) -> int:
    return int(np.prod(self.shape))


def mask_specs(model: tf.keras.Model, prune_last_layers: int) -> list[MaskSpec]:
  """The model's masked weights in order; those of the last ``prune_last_layers`` layers are prunable."""
  flags = pruning.prunable_flags(model, prune_last_layers)
  kernels = [kernel for layer in masked_layers(model) for _, kernel, _, _ in layer.masked_weights]
  # The variable's own name is unique in the model (two LSTMs both have a "cell").
  return [MaskSpec(kernel.name.split(":")[0], tuple(kernel.shape.as_list()), prunable)
          for kernel, prunable in zip(kernels, flags)]


class FedMaskProcess(tff.templates.IterativeProcess):
  """FedMask's ``tff.templates.IterativeProcess`` plus what the driver needs to feed it.

  Attributes (besides ``initialize`` and ``next``):
    specs: the model's masked weights (:class:`MaskSpec`), in order; config: the
      :class:`FedMaskConfig`; client_state_type: the TFF type of a client's state
      (``scores``, ``keep``, ``personal``: float32 of each weight's shape, ``rounds``);
      wire_state_type: the same state in its *wire form*, ``keep`` and ``personal``
      bit-packed (:meth:`pack_state`); global_scores: whether the server keeps real-valued
      global scores (``upload="score_sign"``).
    next, client_work, aggregate, prepare: the federated computations; every client state
      they take and return is in the wire form (``pack_state`` / ``unpack_state`` convert),
      or, with ``client_states == "files"``, the path of a file holding it
      (:class:`fedmask_tff.wire.state_files.StateExchange` writes and reads them).
      ``client_work`` and ``aggregate`` are the two halves of ``next`` (``--workers``);
      ``prepare``: ``(data@CLIENTS, states@CLIENTS) -> (states, metrics)``, the pruning epoch
      before round 1 (``prune_at_init``).
    evaluate: ``(data@CLIENTS, packed binary masks@CLIENTS) -> metrics@CLIENTS`` (pass
      ``pack_masks(state["personal"])`` for the personalized model).
    client_update, prepare_client, decode_upload, download_and_apply, evaluate_client,
      start_from_global, start_from_mask: the TF computations of each step on full-size
      (unpacked) states, for tests and the driver.
  """

  def __init__(self, *, initialize_fn, next_fn, specs, config, client_state_type, wire_state_type,
               client_states, global_scores, client_work, aggregate, prepare, evaluate,
               client_update, prepare_client, decode_upload, download_and_apply, evaluate_client,
               start_from_global, start_from_mask, initial_scores, logit_thresholds):
    """The attributes above, from :func:`build_fedmask_process` (``initial_scores``: numpy, one
    per masked weight; ``logit_thresholds``: the logit of each masked weight's tau)."""
    super().__init__(initialize_fn, next_fn)
    self.specs, self.config, self.client_state_type = specs, config, client_state_type
    self.wire_state_type, self.client_states = wire_state_type, client_states
    self.global_scores = global_scores
    self.client_work, self.aggregate = client_work, aggregate
    self.prepare, self.evaluate = prepare, evaluate
    self.client_update, self.prepare_client = client_update, prepare_client
    self.decode_upload, self.download_and_apply = decode_upload, download_and_apply
    self.evaluate_client = evaluate_client
    self.start_from_global, self.start_from_mask = start_from_global, start_from_mask
    self._initial_scores, self._logit_thresholds = initial_scores, logit_thresholds

  def initial_client_state(self):
    """The numpy state of a client never seen: the initial scores, nothing pruned."""
    return collections.OrderedDict(
        scores=tuple(x.copy() for x in self._initial_scores),
        keep=tuple(np.ones(s.shape, np.float32) for s in self.specs),
        personal=tuple((x >= lt).astype(np.float32)
                       for x, lt in zip(self._initial_scores, self._logit_thresholds)),
        rounds=np.int32(0))

  def pack_state(self, state):
    """A client state (numpy, as :meth:`initial_client_state` gives it) in its wire form: the
    same ``scores`` and ``rounds``, ``keep`` and ``personal`` as uint8 ``[ceil(n/8)]`` each."""
    return collections.OrderedDict(scores=tuple(np.asarray(x, np.float32) for x in state["scores"]),
                                   keep=self.pack_masks(state["keep"]),
                                   personal=self.pack_masks(state["personal"]),
                                   rounds=np.int32(state["rounds"]))

  def unpack_state(self, wire):
    """The inverse of :meth:`pack_state` (masks back to float32 0/1 of each weight's shape)."""
    return collections.OrderedDict(
        scores=tuple(np.asarray(x, np.float32) for x in wire["scores"]),
        keep=tuple(bitpack.unpack_bits_np(np.asarray(p), s.shape) for p, s in zip(wire["keep"], self.specs)),
        personal=tuple(bitpack.unpack_bits_np(np.asarray(p), s.shape)
                       for p, s in zip(wire["personal"], self.specs)),
        rounds=np.int32(wire["rounds"]))

  def pack_masks(self, masks) -> tuple:
    """0/1 masks, one per masked weight, bit-packed (what ``evaluate`` takes)."""
    if len(masks) != len(self.specs):
      raise ValueError(f"{len(masks)} masks for a model with {len(self.specs)} masked weights")
    return tuple(bitpack.pack_bits_np(m) for m in masks)

  def start_masks(self, server_state, state):
    """The binary masks of the aggregate as a client sees it, before local training (numpy):
    with ``score_sign`` the mask of the server's scores ``G`` at its kept positions; with
    ``global_mask`` the mask it starts its next round from (its scores moved by m^T);
    otherwise the mask it restarted from after its last aggregation."""
    if self.global_scores:
      scores = server_state["scores"]
    elif self.config.global_mask:
      scores = self.start_from_mask(server_state["mask"], state)["scores"]
    else:
      scores = state["scores"]
    return tuple(((np.asarray(sc) >= lt) * np.asarray(k)).astype(np.float32)
                 for sc, k, lt in zip(scores, state["keep"], self._logit_thresholds))


def build_fedmask_process(model_fn: Callable[[], tf.keras.Model], element_spec,
                          config: FedMaskConfig = FedMaskConfig(),
                          eval_element_spec=None, client_states: str = "messages") -> FedMaskProcess:
  """Builds FedMask as a TFF iterative process.

  Args:
    model_fn: no-argument callable returning a fresh, uncompiled Keras model of
      masked layers that outputs logits; it must build the same frozen W on
      every call (seeded layers do).
    element_spec: the element spec of a client's *batched* training dataset,
      an ``OrderedDict(x=..., y=...)`` of ``tf.TensorSpec`` (labels int32).
    config: a :class:`FedMaskConfig`.
    eval_element_spec: element spec of the evaluation datasets (default: the same).
    client_states: how client states cross the TFF boundary: ``"messages"`` (in TFF's values,
      in their wire form) or ``"files"`` (TFF's values carry paths; each client's computation
      reads its state from a file and writes the new one beside it, where the work runs:
      :mod:`fedmask_tff.wire.state_files`, driven by its ``StateExchange``). The same numbers
      either way (tested).
  """
  if client_states not in ("messages", "files"):
    raise ValueError(f"client_states must be 'messages' or 'files', got {client_states!r}")
  f = _facts(model_fn, element_spec, config, eval_element_spec)
  clients_state_type = tff.FederatedType(
      tff.TensorType(np.str_) if client_states == "files" else f.wire_state_type, tff.CLIENTS)
  wire = wire_forms.make_wire(f.specs, client_states, f.packed_masks_type, f.wire_state_type,
                              f.wire_state_spec)
  # Each factory gets the facts it uses; those of .wire_forms.computations return
  # (logical, federated) pairs. Steps 1-2 (client_work), 3-4 (server_sums), then the server's
  # G or m^T when it keeps one (server_state) and the federated computations (federated).
  load_model = client_work.make_load_model(model_fn)
  encode_upload_fn = client_work.make_encode_upload_fn(f.prunable_idx)
  client_seed = client_work.make_client_seed(config)
  local_work = client_work.make_local_work(config, load_model, f.lr, f.prunable_idx, f.soft_forward,
                                           f.thresholds, f.weight_costs)
  client_update, client_update_wire = client_work.make_client_update(
      wire, config, f.data_type, f.state_type, f.global_scores, local_work, client_seed,
      encode_upload_fn)
  metrics_type = client_update.type_signature.result[2]
  prepare_client, prepare_client_wire = client_work.make_prepare_client(
      wire, f.data_type, f.state_type, local_work, encode_upload_fn)
  decode_upload, decode_upload_wire = server_sums.make_decode_upload(
      wire, f.specs, f.upload_type, f.scores_type)
  upload_valid = server_sums.make_upload_valid(wire, f.specs, f.upload_type, f.scores_type)
  sum_uploads = server_sums.make_sum_uploads(wire, f.specs, f.upload_type, f.sums_type)
  download_and_apply, download_and_apply_wire = server_sums.make_download_and_apply(
      wire, config, f.specs, f.thresholds, f.sums_type, f.state_type, client_seed)
  evaluate_client, evaluate_client_wire = client_work.make_evaluate_client(
      wire, model_fn, f.eval_data_type, f.scores_type, f.logit_thresholds)
  sums_to_int = server_sums.make_sums_to_int(f.sums_type)
  sums_to_float = server_sums.make_sums_to_float(f.int_sums_type)
  sp = _server_state_parts(wire, config, f, client_seed, metrics_type)
  server_state_type, initialize_fn = federated.make_initialize(
      config, f.global_scores, f.global_state_type, f.mask_state_type, sp.initial_global_state,
      sp.initial_mask_state)
  client_work_fn = federated.make_client_work_fn(
      config, f.global_scores, server_state_type, f.data_type, clients_state_type,
      client_update_wire, sp.start_from_global_wire, sp.start_from_mask_wire)
  summed = federated.make_summed(config, f.specs, sum_uploads, decode_upload_wire, sums_to_int,
                                 sums_to_float)
  aggregate_fn = federated.make_aggregate_fn(
      config, f.global_scores, wire.files, server_state_type, clients_state_type, f.upload_type,
      metrics_type, upload_valid, summed, sp.global_step, sp.mask_step, sp.increment,
      sp.global_downlink_bits_wire, sp.mask_downlink_bits_wire, download_and_apply_wire)
  next_fn = federated.make_next_fn(server_state_type, f.data_type, clients_state_type,
                                   client_work_fn, aggregate_fn)
  evaluate_fn = federated.make_evaluate_fn(f.eval_data_type, f.packed_masks_type,
                                           evaluate_client_wire)
  prepare_fn = federated.make_prepare_fn(f.data_type, clients_state_type, prepare_client_wire)
  return FedMaskProcess(
      initialize_fn=initialize_fn, next_fn=next_fn, specs=f.specs, config=config,
      client_state_type=f.state_type, wire_state_type=f.wire_state_type,
      client_states=client_states, global_scores=f.global_scores, client_work=client_work_fn,
      aggregate=aggregate_fn, prepare=prepare_fn, evaluate=evaluate_fn,
      client_update=client_update, prepare_client=prepare_client, decode_upload=decode_upload,
      download_and_apply=download_and_apply, evaluate_client=evaluate_client,
      start_from_global=sp.start_from_global, start_from_mask=sp.start_from_mask,
      initial_scores=f.initial_scores, logit_thresholds=f.logit_thresholds)


class _ServerParts(NamedTuple):
  """The server state's computations (:mod:`.server_state`): G's or m^T's start, step and
  downlink, and the round counter (``*_wire``: the federated form a client computation uses)."""
  increment: object
  initial_global_state: object
  initial_mask_state: object
  start_from_global: object
  start_from_global_wire: object
  start_from_mask: object
  start_from_mask_wire: object
  global_step: object
  mask_step: object
  global_downlink_bits_wire: object
  mask_downlink_bits_wire: object


def _server_state_parts(wire, config, f, client_seed, metrics_type) -> _ServerParts:
  """Builds :class:`_ServerParts` from the wire forms, the config, the facts ``f``
  (:class:`_Facts`), the clients' seed computation and the clients' metrics type."""
  quantized_global = server_state.make_quantized_global(config)
  start_from_global, start_from_global_wire = server_state.make_start_from_global(
      wire, config, f.specs, f.global_scores, f.scores_type, f.state_type, client_seed,
      quantized_global)
  server_votes = server_state.make_server_votes(config)
  start_from_mask, start_from_mask_wire = server_state.make_start_from_mask(
      wire, config, f.thresholds, f.scores_type, f.state_type)
  _, mask_downlink_bits_wire = server_state.make_mask_downlink_bits(
      wire, f.scores_type, f.state_type, metrics_type)
  _, global_downlink_bits_wire = server_state.make_global_downlink_bits(
      wire, config, f.specs, f.state_type, metrics_type)
  return _ServerParts(
      increment=server_state.make_increment(),
      initial_global_state=server_state.make_initial_global_state(config, f.initial_scores),
      initial_mask_state=server_state.make_initial_mask_state(f.specs),
      start_from_global=start_from_global, start_from_global_wire=start_from_global_wire,
      start_from_mask=start_from_mask, start_from_mask_wire=start_from_mask_wire,
      global_step=server_state.make_global_step(config, f.global_state_type, f.sums_type,
                                                server_votes),
      mask_step=server_state.make_mask_step(f.mask_state_type, f.sums_type, f.thresholds,
                                            server_votes),
      global_downlink_bits_wire=global_downlink_bits_wire,
      mask_downlink_bits_wire=mask_downlink_bits_wire)


class _Facts(NamedTuple):
  """What :func:`_facts` derives from the model and the config, for the builder to pass on.

  Per masked weight, in order: ``specs`` (:class:`MaskSpec`), ``thresholds`` (its layer's tau),
  ``soft_forward`` (whether its layer's forward pass is soft), ``logit_thresholds`` (logit of
  tau), ``weight_costs`` (its FLOP costs), ``initial_scores`` (numpy); ``prunable_idx``: the
  indices of the prunable ones. ``lr``: the clients' learning rate; ``global_scores``: whether
  the server keeps global scores (``upload="score_sign"``). TFF types: ``scores_type`` (a
  float32 tensor of each weight's shape), ``state_type`` / ``wire_state_type`` (a client state,
  full-size / in its wire form; ``wire_state_spec``: the latter as ``tf.TensorSpec`` s),
  ``data_type`` / ``eval_data_type`` (a client's training / evaluation dataset), ``upload_type``,
  ``sums_type`` / ``int_sums_type`` (the server's sums in float32 / int32),
  ``global_state_type`` / ``mask_state_type`` (the server state with G / m^T) and
  ``packed_masks_type`` (bit-packed masks).
  """
  specs: list
  thresholds: list
  soft_forward: list
  logit_thresholds: list
  weight_costs: list
  initial_scores: list
  lr: float
  global_scores: bool
  scores_type: tuple
  state_type: tff.Type
  data_type: tff.Type
  eval_data_type: tff.Type
  upload_type: tff.Type
  sums_type: tff.Type
  prunable_idx: list
  int_sums_type: tff.Type
  global_state_type: tff.Type
  mask_state_type: tff.Type
  packed_masks_type: tuple
  wire_state_type: tff.Type
  wire_state_spec: collections.OrderedDict


def _facts(model_fn, element_spec, config, eval_element_spec) -> _Facts:
  """The facts the process's computations are built from: the model's masked weights, the
  initial scores, thresholds, FLOP costs and the TFF types of states, uploads and sums."""
  probe = model_fn()
  layers = masked_layers(probe)
  config.validate(len(layers))
  specs = mask_specs(probe, config.prune_last_layers)
  thresholds = [layer.threshold for layer in layers for _ in layer.masked_weights]
  score_init = [layer.score_init for layer in layers for _ in layer.masked_weights]
  soft_forward = [layer.mask_mode == "soft" for layer in layers for _ in layer.masked_weights]
  logit_thresholds = [math.log(t / (1 - t)) for t in thresholds]
  weight_costs = costs.weight_costs(probe)
  if [w.elements for w in weight_costs] != [s.size for s in specs]:
    raise ValueError("the FLOP counter does not see the model's masked weights one to one: "
                     f"{[w.name for w in weight_costs]} vs {[s.name for s in specs]}")
  del probe
  initial_scores = []
  noise_rng = np.random.default_rng([int(config.seed), 4099])
  for s, v in zip(specs, score_init):
    scores = np.full(s.shape, v, np.float32)
    if config.score_init_noise > 0:
      scores += noise_rng.uniform(-config.score_init_noise, config.score_init_noise,
                                  s.shape).astype(np.float32)
    initial_scores.append(scores)
  lr = float(config.learning_rate)
  global_scores = config.upload == "score_sign"
  scores_type = tuple(tff.TensorType(np.float32, s.shape) for s in specs)
  state_type = tff.types.to_type(collections.OrderedDict(
      scores=scores_type, keep=scores_type, personal=scores_type,
      rounds=tff.TensorType(np.int32)))
  data_type = tff.SequenceType(tff.types.tensorflow_to_type(element_spec))
  eval_data_type = tff.SequenceType(tff.types.tensorflow_to_type(eval_element_spec or element_spec))
  packed_type = tuple(tff.TensorType(np.uint8, [None]) for s in specs)
  keep_packed_type = tuple(tff.TensorType(np.uint8, [None]) for s in specs if s.prunable)
  upload_type = tff.types.to_type(collections.OrderedDict(mask=packed_type, keep=keep_packed_type))
  sums_type = tff.types.to_type(collections.OrderedDict(total=scores_type, count=scores_type))
  prunable_idx = [i for i, s in enumerate(specs) if s.prunable]
  int_sums_type = tff.types.to_type(collections.OrderedDict(
      total=tuple(tff.TensorType(np.int32, s.shape) for s in specs),
      count=tuple(tff.TensorType(np.int32, s.shape) for s in specs)))
  global_state_type = tff.types.to_type(collections.OrderedDict(
      round=tff.TensorType(np.int32), scores=scores_type))
  mask_state_type = tff.types.to_type(collections.OrderedDict(
      round=tff.TensorType(np.int32), mask=scores_type))
  packed_masks_type = tuple(tff.TensorType(np.uint8, [bitpack.packed_size_bytes(s.size)])
                            for s in specs)
  wire_state_type = tff.types.to_type(collections.OrderedDict(
      scores=scores_type, keep=packed_masks_type, personal=packed_masks_type,
      rounds=tff.TensorType(np.int32)))
  wire_state_spec = collections.OrderedDict(
      scores=tuple(tf.TensorSpec(s.shape, tf.float32) for s in specs),
      keep=tuple(tf.TensorSpec([bitpack.packed_size_bytes(s.size)], tf.uint8) for s in specs),
      personal=tuple(tf.TensorSpec([bitpack.packed_size_bytes(s.size)], tf.uint8) for s in specs),
      rounds=tf.TensorSpec([], tf.int32))
  return _Facts(
      specs=specs, thresholds=thresholds,
      soft_forward=soft_forward, logit_thresholds=logit_thresholds, weight_costs=weight_costs,
      initial_scores=initial_scores, lr=lr, global_scores=global_scores, scores_type=scores_type,
      state_type=state_type, data_type=data_type, eval_data_type=eval_data_type,
      upload_type=upload_type, sums_type=sums_type, prunable_idx=prunable_idx,
      int_sums_type=int_sums_type, global_state_type=global_state_type,
      mask_state_type=mask_state_type, packed_masks_type=packed_masks_type,
      wire_state_type=wire_state_type, wire_state_spec=wire_state_spec)
