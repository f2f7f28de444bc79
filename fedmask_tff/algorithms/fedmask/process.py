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
"""

from __future__ import annotations

import collections
import dataclasses
import math
import types
from typing import Callable

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from fedmask_tff.masks import aggregation, masking, pruning, regularizers
from fedmask_tff.wire import bitpack, ldp, payloads, quantization, state_files
from fedmask_tff.models import costs
from fedmask_tff.algorithms import evaluation
from fedmask_tff.masks.layers import mask_variables, masked_layers

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

  def __init__(self, parts):
    super().__init__(parts.initialize_fn, parts.next_fn)
    self.specs, self.config, self.client_state_type = parts.specs, parts.config, parts.state_type
    self.wire_state_type, self.client_states = parts.wire_state_type, parts.client_states
    self.global_scores = parts.global_scores
    self.client_work, self.aggregate = parts.client_work_fn, parts.aggregate_fn
    self.prepare, self.evaluate = parts.prepare_fn, parts.evaluate_fn
    self.client_update, self.prepare_client = parts.client_update, parts.prepare_client
    self.decode_upload, self.download_and_apply = parts.decode_upload, parts.download_and_apply
    self.evaluate_client = parts.evaluate_client
    self.start_from_global, self.start_from_mask = parts.start_from_global, parts.start_from_mask
    self._initial_scores, self._logit_thresholds = parts.initial_scores, parts.logit_thresholds

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
  sh = _facts(model_fn, element_spec, config, eval_element_spec)
  sh.client_states = client_states
  sh.clients_state_type = tff.FederatedType(
      tff.TensorType(np.str_) if client_states == "files" else sh.wire_state_type, tff.CLIENTS)
  sh.wire = _make_wire(sh)
  sh.load_model = _make_load_model(sh)
  sh.encode_upload_fn = _make_encode_upload_fn(sh)
  sh.client_seed = _make_client_seed(sh)
  sh.local_work = _make_local_work(sh)
  sh.client_update, sh.client_update_wire = _make_client_update(sh)
  sh.prepare_client, sh.prepare_client_wire = _make_prepare_client(sh)
  sh.decode_upload, sh.decode_upload_wire = _make_decode_upload(sh)
  sh.upload_valid = _make_upload_valid(sh)
  sh.sum_uploads = _make_sum_uploads(sh)
  sh.download_and_apply, sh.download_and_apply_wire = _make_download_and_apply(sh)
  sh.evaluate_client, sh.evaluate_client_wire = _make_evaluate_client(sh)
  sh.sums_to_int = _make_sums_to_int(sh)
  sh.sums_to_float = _make_sums_to_float(sh)
  sh.increment = _make_increment(sh)
  sh.initial_global_state = _make_initial_global_state(sh)
  sh.quantized_global = _make_quantized_global(sh)
  sh.start_from_global, sh.start_from_global_wire = _make_start_from_global(sh)
  sh.server_votes = _make_server_votes(sh)
  sh.global_step = _make_global_step(sh)
  sh.initial_mask_state = _make_initial_mask_state(sh)
  sh.start_from_mask, sh.start_from_mask_wire = _make_start_from_mask(sh)
  sh.mask_step = _make_mask_step(sh)
  sh.mask_downlink_bits, sh.mask_downlink_bits_wire = _make_mask_downlink_bits(sh)
  sh.global_downlink_bits, sh.global_downlink_bits_wire = _make_global_downlink_bits(sh)
  sh.server_state_type, sh.initialize_fn = _make_initialize(sh)
  sh.client_work_fn = _make_client_work_fn(sh)
  sh.summed = _make_summed(sh)
  sh.aggregate_fn = _make_aggregate_fn(sh)
  sh.next_fn = _make_next_fn(sh)
  sh.evaluate_fn = _make_evaluate_fn(sh)
  sh.prepare_fn = _make_prepare_fn(sh)
  return FedMaskProcess(sh)


def _facts(model_fn, element_spec, config, eval_element_spec) -> types.SimpleNamespace:
  """What every computation of the process shares: the model's masked weights, the initial
  scores, thresholds, FLOP costs and the TFF types of states, uploads and sums."""
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
  return types.SimpleNamespace(
      model_fn=model_fn, config=config, specs=specs, thresholds=thresholds,
      soft_forward=soft_forward, logit_thresholds=logit_thresholds, weight_costs=weight_costs,
      initial_scores=initial_scores, lr=lr, global_scores=global_scores, scores_type=scores_type,
      state_type=state_type, data_type=data_type, eval_data_type=eval_data_type,
      upload_type=upload_type, sums_type=sums_type, prunable_idx=prunable_idx,
      int_sums_type=int_sums_type, global_state_type=global_state_type,
      mask_state_type=mask_state_type, packed_masks_type=packed_masks_type,
      wire_state_type=wire_state_type, wire_state_spec=wire_state_spec)


def loss_fn(y, logits):
  """Mean cross-entropy of a batch: labels ``[batch]`` int32, logits ``[batch, classes]``."""
  return tf.reduce_mean(tf.keras.losses.sparse_categorical_crossentropy(
      y, logits, from_logits=True))


def _make_wire(sh) -> types.SimpleNamespace:
  """How client states cross the TFF boundary (``sh.client_states``), as argument and result
  *forms* for :func:`_computations`.

  The state's *wire form*: the scores as they are (float32), the pruning mask ``keep`` and the
  ``personal`` mask bit-packed (uint8 ``[ceil(n/8)]`` per weight,
  :mod:`fedmask_tff.wire.bitpack`); 4.25 bytes a mask element instead of 12, exact (both masks
  are 0/1). ``FedMaskProcess.pack_state`` and ``unpack_state`` are the numpy side.

  * ``"messages"``: the wire form travels in TFF's values.
  * ``"files"``: a client's state in TFF's values is the path of a file holding its wire form
    (:mod:`fedmask_tff.wire.state_files`); a computation reads it there and writes the state
    it returns next to it, returning the new path.

  Forms: ``"state"`` (a client state), ``"keep"`` (the pruning masks of a trained state:
  packed masks, or with files the state's path) and ``"masks"`` (packed 0/1 masks).
  """
  specs = sh.specs

  def unpack_masks(packed):
    return tuple(tf.reshape(bitpack.unpack_bits_tf(p, s.size), s.shape) for p, s in zip(packed, specs))

  def pack_masks(masks):
    return tuple(tf.reshape(bitpack.pack_bits_tf(m), [bitpack.packed_size_bytes(s.size)])
                 for m, s in zip(masks, specs))

  def from_wire(state):
    return collections.OrderedDict(scores=state["scores"], keep=unpack_masks(state["keep"]),
                                   personal=unpack_masks(state["personal"]), rounds=state["rounds"])

  def to_wire(state):
    return collections.OrderedDict(scores=state["scores"], keep=pack_masks(state["keep"]),
                                   personal=pack_masks(state["personal"]), rounds=state["rounds"])

  masks = (sh.packed_masks_type, unpack_masks)
  if sh.client_states == "files":
    path_type, template = tff.TensorType(np.str_), sh.wire_state_spec
    forms = {"state": (path_type, lambda p: from_wire(state_files.read_tf(p, template))),
             "keep": (path_type, lambda p: unpack_masks(state_files.read_tf(p, template)["keep"])),
             "masks": masks}
    result = lambda arg, state: state_files.write_next_tf(arg, to_wire(state))
  else:
    forms = {"state": (sh.wire_state_type, from_wire), "keep": masks, "masks": masks}
    result = lambda arg, state: to_wire(state)
  return types.SimpleNamespace(forms=forms, result=result, files=sh.client_states == "files")


def _computations(sh, body, arg_types, forms: dict, result: str | None = None):
  """``body`` as two TF computations ``(logical, federated)``.

  ``logical`` takes ``arg_types`` (tests and the driver call it). ``federated`` is what the
  federated computations run: the argument at each position ``i`` of ``forms`` (``{i: form}``,
  see :func:`_make_wire`) arrives in that form and ``body`` sees it unpacked (full-size
  tensors); ``result`` ``"state"`` (the whole result is a client state) or ``"first"`` (its
  first element is) returns that state in the form the process's states travel in, written
  next to the state argument's file when states are files. A client's state is unpacked and
  packed inside its own computation, so its full-size masks live only there.
  """
  logical = tff.tensorflow.computation(body, *arg_types)
  wire = sh.wire
  wire_types = [wire.forms[forms[i]][0] if i in forms else t for i, t in enumerate(arg_types)]
  state_at = next((i for i, f in forms.items() if f == "state"), None)

  def call(args):
    out = body(*[wire.forms[forms[i]][1](a) if i in forms else a for i, a in enumerate(args)])
    if result == "state":
      return wire.result(args[state_at], out)
    if result == "first":
      return (wire.result(args[state_at], out[0]),) + tuple(out[1:])
    return out

  if len(arg_types) == 2:  # TFF takes no *args: one function per arity.
    def federated(a, b):
      return call([a, b])
  else:
    def federated(a, b, c):
      return call([a, b, c])
  return logical, tff.tensorflow.computation(federated, *wire_types)


def _make_load_model(sh):
  model_fn = sh.model_fn

  def load_model(state):
    model = model_fn()
    kernels, score_vars, keep_vars = mask_variables(model)
    assigns = [v.assign(s) for v, s in zip(score_vars, state["scores"])]
    assigns += [v.assign(k) for v, k in zip(keep_vars, state["keep"])]
    return model, kernels, score_vars, keep_vars, assigns
  return load_model


def _make_encode_upload_fn(sh):
  prunable_idx = sh.prunable_idx

  def encode_upload_fn(masks, keeps, send_keep):
    packed_masks = tuple(bitpack.pack_bits_tf(m) for m in masks)
    packed_keeps = tuple(
        tf.cond(send_keep > 0, lambda k=keeps[i]: bitpack.pack_bits_tf(k),
                lambda: tf.zeros([0], tf.uint8)) for i in prunable_idx)
    return collections.OrderedDict(mask=packed_masks, keep=packed_keeps)
  return encode_upload_fn


def _make_client_seed(sh):
  config = sh.config

  def client_seed(keeps, rounds, salt):
    """A shape-[2] int32 seed per client, round and use: from the run's seed, the round and a
    fingerprint of the client's pruning mask (the simulation keeps no client ids in TF)."""
    fingerprint = tf.add_n([tf.reduce_sum(tf.where(tf.reshape(k, [-1]) > 0)[:, 0] % 65521)
                            for k in keeps]) % 2147483647
    return tf.stack([tf.constant(int(config.seed) % 100003 * 7919 + salt, tf.int64)
                     + tf.cast(rounds, tf.int64) * 31, fingerprint])
  return client_seed


def _make_local_work(sh):
  config, load_model, lr = sh.config, sh.load_model, sh.lr
  prunable_idx, soft_forward, thresholds, weight_costs = sh.prunable_idx, sh.soft_forward, sh.thresholds, sh.weight_costs

  def local_work(dataset, state, epochs):
    """A client's training: the pruning epoch (if it has not pruned yet), then ``epochs``
    epochs. Returns ``(new_state, masks, pruned_now, loss_sum, count, flops, diverged)``."""
    model, kernels, score_vars, keep_vars, assigns = load_model(state)

    @tf.function
    def train(dataset, rounds):
      def epoch():
        def step(acc, batch):
          # FLOPs of this step with the mask as it is now: a zero of W * m needs no
          # multiply-add (soft mode: every kept element is non-zero); scores get
          # gradients at kept positions only.
          nnz = [tf.cast(tf.reduce_sum(k if soft else masking.binary_mask(v, t) * k), tf.float64)
                 for v, k, t, soft in zip(score_vars, keep_vars, thresholds, soft_forward)]
          trainable = [tf.cast(tf.reduce_sum(k), tf.float64) for k in keep_vars]
          with tf.GradientTape() as tape:
            loss = loss_fn(batch["y"], model(batch["x"], training=True))
            objective = loss
            if config.group_lasso > 0:
              objective = loss + config.group_lasso * regularizers.structured_penalty(
                  model, normalize=True)
          grads = tape.gradient(objective, score_vars)
          for v, g in zip(score_vars, grads):
            v.assign_sub(lr * g)
          n = tf.cast(tf.shape(batch["y"])[0], tf.float32)
          flops = costs.train_flops(weight_costs, tf.cast(n, tf.float64), nnz, trainable)
          return acc[0] + loss * n, acc[1] + n, acc[2] + flops
        return dataset.reduce((tf.constant(0.0), tf.constant(0.0), tf.constant(0.0, tf.float64)),
                              step)

      def prune():  # One-shot pruning: one epoch, then keep the top p_r for good.
        l0, c0, f0 = epoch()
        with tf.control_dependencies([l0, c0, f0]):
          ops = [keep_vars[i].assign(pruning.top_magnitude_keep(
              kernels[i], score_vars[i], config.prune_rate)) for i in prunable_idx]
        with tf.control_dependencies(ops):
          return tf.identity(l0), tf.identity(c0), tf.identity(f0), tf.constant(1)

      def no_prune():
        return tf.constant(0.0), tf.constant(0.0), tf.constant(0.0, tf.float64), tf.constant(0)

      loss_sum, count, flops, pruned_now = tf.cond(tf.equal(rounds, 0), prune, no_prune)
      for _ in tf.range(epochs):
        l1, c1, f1 = epoch()
        loss_sum, count, flops = loss_sum + l1, count + c1, flops + f1
      return loss_sum, count, flops, pruned_now

    with tf.control_dependencies(assigns):
      loss_sum, count, flops, pruned_now = train(dataset, state["rounds"])
    with tf.control_dependencies([loss_sum, count, flops, pruned_now]):
      scores = tuple(tf.identity(v) for v in score_vars)
      keeps = tuple(tf.identity(v) for v in keep_vars)
    # A client whose training diverged (non-finite loss or scores) keeps its state and
    # uploads nothing; the server then drops it from this round's aggregate.
    diverged = tf.logical_not(tf.reduce_all(
        [tf.math.is_finite(loss_sum)] + [tf.reduce_all(tf.math.is_finite(x)) for x in scores]))
    scores = tuple(tf.where(diverged, old, new) for old, new in zip(state["scores"], scores))
    keeps = tuple(tf.where(diverged, old, new) for old, new in zip(state["keep"], keeps))
    masks = tuple(masking.binary_mask(s, t) * k for s, k, t in zip(scores, keeps, thresholds))
    masks = tuple(tf.where(diverged, old, new) for old, new in zip(state["personal"], masks))
    # `personal`: the client's own binary mask after local training, i.e. its
    # personalized model; `scores` will be restarted from the aggregate.
    new_state = collections.OrderedDict(scores=scores, keep=keeps, personal=masks,
                                        rounds=state["rounds"] + tf.where(diverged, 0, 1))
    return new_state, masks, pruned_now, loss_sum, count, flops, diverged
  return local_work


def _make_client_update(sh):
  client_seed, config, data_type, encode_upload_fn = sh.client_seed, sh.config, sh.data_type, sh.encode_upload_fn
  global_scores, local_work, state_type = sh.global_scores, sh.local_work, sh.state_type

  def client_update(dataset, state):
    new_state, masks, pruned_now, loss_sum, count, flops, diverged = local_work(
        dataset, state, config.local_epochs)
    scores, keeps = new_state["scores"], new_state["keep"]
    sent = masks
    if config.upload == "bernoulli":  # Stochastic mask (after FedPM): E[bit] = sigmoid(m_r).
      seed = client_seed(new_state["keep"], state["rounds"], 200)
      sent = tuple(tf.cast(tf.random.stateless_uniform(tf.shape(s), seed + j) < tf.sigmoid(s),
                           tf.float32) * k for j, (s, k) in enumerate(zip(scores, keeps)))
    if global_scores:  # The direction the client's evidence moved from the server's scores.
      # An element training did not move carries no evidence: it sends a fair coin. (Sending
      # 0, "decreased", made every client vote the inactive channels down each round, until
      # a newcomer's first layer could die: every logit 0, accuracy 0 on its own classes;
      # docs/investigations/zero-accuracy-clients.md.)
      tie_seed = client_seed(new_state["keep"], state["rounds"], 400)
      sent = tuple(
          tf.where(tf.equal(new, old),
                   tf.cast(tf.random.stateless_uniform(tf.shape(new), tie_seed + j) < 0.5,
                           tf.float32),
                   tf.cast(new > old, tf.float32)) * k
          for j, (new, old, k) in enumerate(zip(scores, state["scores"], keeps)))
    if config.ldp_epsilon > 0:  # Randomized response on what leaves the device, not on `personal`.
      seed = client_seed(new_state["keep"], state["rounds"], 1)
      sent = tuple(ldp.randomized_response_tf(m, config.ldp_epsilon, seed + j) * k
                   for j, (m, k) in enumerate(zip(sent, keeps)))
    upload = encode_upload_fn(sent, new_state["keep"], pruned_now)
    upload = collections.OrderedDict(
        mask=tuple(tf.cond(diverged, lambda: tf.zeros([0], tf.uint8), lambda m=m: m)
                   for m in upload["mask"]),
        keep=upload["keep"])
    metrics = collections.OrderedDict(
        loss_sum=tf.where(diverged, 0.0, loss_sum), examples=tf.where(diverged, 0.0, count),
        diverged=tf.cast(diverged, tf.int32), train_flops=flops, pruned=pruned_now,
        uplink_bits=payloads.tensor_bits(upload),
        mask_ones=tf.add_n([tf.reduce_sum(m) for m in masks]),
        mask_kept=tf.add_n([tf.reduce_sum(k) for k in new_state["keep"]]))
    return new_state, upload, metrics
  return _computations(sh, client_update, (data_type, state_type), {1: "state"}, "first")


def _make_prepare_client(sh):
  data_type, encode_upload_fn, local_work, state_type = sh.data_type, sh.encode_upload_fn, sh.local_work, sh.state_type

  def prepare_client(dataset, state):
    """Algorithm 1 lines 4-6 (``prune_at_init``): a client that has not pruned yet trains its
    pruning epoch and prunes; it sends its packed pruning masks (counted in ``uplink_bits``).
    A client that has pruned already is returned unchanged, so a rerun can repeat this."""
    new_state, masks, pruned_now, loss_sum, count, flops, diverged = local_work(dataset, state, 0)
    done = tf.logical_and(pruned_now > 0, tf.logical_not(diverged))
    new_state = collections.OrderedDict(
        (k, tf.nest.map_structure(lambda new, old: tf.where(done, new, old), new_state[k], state[k]))
        for k in ("scores", "keep", "personal", "rounds"))
    sent_keep = encode_upload_fn(masks, new_state["keep"], tf.cast(done, tf.int32))["keep"]
    metrics = collections.OrderedDict(
        loss_sum=tf.where(diverged, 0.0, loss_sum), examples=tf.where(diverged, 0.0, count),
        diverged=tf.cast(diverged, tf.int32), train_flops=flops, pruned=tf.cast(done, tf.int32),
        uplink_bits=payloads.tensor_bits(sent_keep))
    return new_state, metrics
  return _computations(sh, prepare_client, (data_type, state_type), {1: "state"}, "first")


def _decode_upload_body(sh):
  specs = sh.specs

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


def _make_decode_upload(sh):
  return _computations(sh, _decode_upload_body(sh), (sh.upload_type, sh.scores_type), {1: "keep"})


def _make_upload_valid(sh):
  """``(upload, keep) -> int32``: whether the server accepts the upload (``decode_upload``'s
  second result; the sums come from :func:`_make_sum_uploads`)."""
  decode_upload = _decode_upload_body(sh)
  return _computations(sh, lambda upload, keep: decode_upload(upload, keep)[1],
                       (sh.upload_type, sh.scores_type), {1: "keep"})[1]


def _make_sum_uploads(sh):
  """``tff.federated_aggregate`` pieces that sum the decoded uploads one client at a time:
  ``(zero, accumulate, merge, report)``. ``accumulate(sums, (upload, keep))`` decodes a client's
  upload and adds it, so that decoded uploads (8 bytes a mask element) never exist for every
  client of the round at once, as a ``federated_map`` before ``federated_sum`` would keep
  them. The sums are of 0/1 values, exact in float32 in any order."""
  decode_upload, sums_type, wire = _decode_upload_body(sh), sh.sums_type, sh.wire
  keep_type, unpack_keep = wire.forms["keep"]
  specs = sh.specs

  @tff.tensorflow.computation
  def zero():
    zeros = tuple(tf.zeros(s.shape) for s in specs)
    return collections.OrderedDict(total=zeros, count=zeros)

  def add(a, b):
    return collections.OrderedDict(total=tuple(x + y for x, y in zip(a["total"], b["total"])),
                                   count=tuple(x + y for x, y in zip(a["count"], b["count"])))

  @tff.tensorflow.computation(sums_type, (sh.upload_type, keep_type))
  def accumulate(sums, client):
    return add(sums, decode_upload(client[0], unpack_keep(client[1]))[0])

  merge = tff.tensorflow.computation(add, sums_type, sums_type)
  report = tff.tensorflow.computation(lambda sums: sums, sums_type)
  return zero, accumulate, merge, report


def _make_download_and_apply(sh):
  client_seed, config, specs, state_type = sh.client_seed, sh.config, sh.specs, sh.state_type
  sums_type, thresholds = sh.sums_type, sh.thresholds

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
  return _computations(sh, download_and_apply, (sums_type, state_type), {1: "state"}, "first")


def _make_evaluate_client(sh):
  eval_data_type, logit_thresholds, model_fn, scores_type = sh.eval_data_type, sh.logit_thresholds, sh.model_fn, sh.scores_type

  def evaluate_client(dataset, masks):
    model = model_fn()
    _, score_vars, keep_vars = mask_variables(model)
    # Scores of +-1 reproduce the given binary masks exactly (sigmoid(+-1) vs tau = 0.5).
    assigns = [v.assign(tf.where(m > 0, 1.0, -1.0) + masking_offset)
               for v, m, masking_offset in zip(score_vars, masks, logit_thresholds)]
    assigns += [v.assign(tf.ones_like(v)) for v in keep_vars]

    with tf.control_dependencies(assigns):
      return tf.function(lambda d: evaluation.dataset_metrics(model, d))(dataset)
  return _computations(sh, evaluate_client, (eval_data_type, scores_type), {1: "masks"})


def _make_sums_to_int(sh):
  sums_type = sh.sums_type

  @tff.tensorflow.computation(sums_type)
  def sums_to_int(sums):
    return collections.OrderedDict(total=tuple(tf.cast(tf.round(t), tf.int32) for t in sums["total"]),
                                   count=tuple(tf.cast(tf.round(c), tf.int32) for c in sums["count"]))
  return sums_to_int


def _make_sums_to_float(sh):
  int_sums_type = sh.int_sums_type

  @tff.tensorflow.computation(int_sums_type)
  def sums_to_float(sums):
    return collections.OrderedDict(total=tuple(tf.cast(t, tf.float32) for t in sums["total"]),
                                   count=tuple(tf.cast(c, tf.float32) for c in sums["count"]))
  return sums_to_float


def _make_increment(sh):
  @tff.tensorflow.computation(tff.TensorType(np.int32))
  def increment(r):
    return r + 1
  return increment


def _make_initial_global_state(sh):
  config, initial_scores = sh.config, sh.initial_scores

  @tff.tensorflow.computation
  def initial_global_state():
    scores = tuple(tf.constant(x) if config.score_init_noise > 0 else tf.fill(x.shape, x.flat[0])
                   for x in initial_scores)
    return collections.OrderedDict(round=tf.constant(0, tf.int32), scores=scores)
  return initial_global_state


def _make_quantized_global(sh):
  config = sh.config

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


def _make_start_from_global(sh):
  client_seed, config, global_scores, quantized_global = sh.client_seed, sh.config, sh.global_scores, sh.quantized_global
  scores_type, specs, state_type = sh.scores_type, sh.specs, sh.state_type

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
  return _computations(sh, start_from_global, (scores_type, state_type), {1: "state"}, "state")


def _make_server_votes(sh):
  config = sh.config

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


def _make_global_step(sh):
  config, global_state_type, server_votes, sums_type = sh.config, sh.global_state_type, sh.server_votes, sh.sums_type

  @tff.tensorflow.computation(global_state_type, sums_type)
  def global_step(server, sums):
    """``G += step * (2v - 1)`` where at least ``min_shared`` clients keep the element."""
    new = tuple(g + tf.where(shared, config.server_score_step * (2.0 * vote - 1.0), 0.0)
                for g, (vote, shared) in zip(server["scores"], server_votes(sums)))
    return collections.OrderedDict(round=server["round"] + 1, scores=new)
  return global_step


def _make_initial_mask_state(sh):
  specs = sh.specs

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


def _make_start_from_mask(sh):
  config, scores_type, state_type = sh.config, sh.scores_type, sh.state_type
  thresholds = sh.thresholds

  def start_from_mask(global_mask_value, state):
    """Algorithm 1 line 11: a selected client moves its scores by m^T where it keeps the element
    (``score_restart``; ``scaled_logit`` restarts them from m^T ⊙ m_k), its own elsewhere."""
    scores = tuple(
        masking.apply_vote(s, mask_message(m, k)[0], config.score_restart, config.restart_scale,
                           config.restart_eps, t)
        for m, s, k, t in zip(global_mask_value, state["scores"], state["keep"], thresholds))
    return collections.OrderedDict(scores=scores, keep=state["keep"], personal=state["personal"],
                                   rounds=state["rounds"])
  return _computations(sh, start_from_mask, (scores_type, state_type), {1: "state"}, "state")


def _make_mask_step(sh):
  mask_state_type, server_votes, sums_type, thresholds = sh.mask_state_type, sh.server_votes, sh.sums_type, sh.thresholds

  @tff.tensorflow.computation(mask_state_type, sums_type)
  def mask_step(server, sums):
    """m^T = 1[v >= tau] where at least ``min_shared`` clients keep the element; else unchanged."""
    new = tuple(tf.where(shared, tf.cast(vote >= t, tf.float32), m)
                for m, (vote, shared), t in zip(server["mask"], server_votes(sums), thresholds))
    return collections.OrderedDict(round=server["round"] + 1, mask=new)
  return mask_step


def _make_mask_downlink_bits(sh):
  client_update, scores_type, state_type = sh.client_update, sh.scores_type, sh.state_type

  def mask_downlink_bits(global_mask_value, state, metrics):
    """Bits of the m^T message the client received at the start of its round (all positions
    before its pruning)."""
    sizes = [mask_message(m, tf.where(metrics["pruned"] > 0, tf.ones_like(k), k))[1]
             for m, k in zip(global_mask_value, state["keep"])]
    return tf.add_n(sizes)
  return _computations(sh, mask_downlink_bits,
                       (scores_type, state_type, client_update.type_signature.result[2]),
                       {1: "state"})


def _make_global_downlink_bits(sh):
  client_update, config, specs, state_type = sh.client_update, sh.config, sh.specs, sh.state_type

  def global_downlink_bits(state, metrics):
    """float32 G at the positions the client kept when it started (all before its pruning)."""
    counts = [tf.where(metrics["pruned"] > 0, tf.constant(spec.size, tf.int64),
                       tf.cast(tf.reduce_sum(k), tf.int64)) for spec, k in zip(specs, state["keep"])]
    if not config.downlink_bits:
      return 32 * tf.add_n(counts)
    b = int(config.downlink_bits)  # b-bit codes, whole bytes per tensor, plus lo and hi
    return tf.add_n([8 * ((n * b + 7) // 8) + 64 for n in counts])
  return _computations(sh, global_downlink_bits,
                       (state_type, client_update.type_signature.result[2]), {0: "state"})


def _make_initialize(sh):
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


def _make_client_work_fn(sh):
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


def _make_summed(sh):
  config, specs, sums_to_float, sums_to_int = sh.config, sh.specs, sh.sums_to_float, sh.sums_to_int
  decode_upload, sum_uploads = sh.decode_upload_wire, sh.sum_uploads

  def summed(upload, keep):
    """The server's sums of the round's uploads (``keep``: each client's pruning masks, in
    their form; see :func:`_make_wire`)."""
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


def _make_aggregate_fn(sh):
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


def _make_next_fn(sh):
  aggregate_fn, client_work_fn, clients_state_type, data_type = sh.aggregate_fn, sh.client_work_fn, sh.clients_state_type, sh.data_type
  server_state_type = sh.server_state_type

  @tff.federated_computation(server_state_type, tff.FederatedType(data_type, tff.CLIENTS),
                             clients_state_type)
  def next_fn(server_state, client_data, client_states):
    trained, upload, metrics = client_work_fn(server_state, client_data, client_states)
    return aggregate_fn(server_state, trained, upload, metrics)
  return next_fn


def _make_evaluate_fn(sh):
  eval_data_type, evaluate_client, packed_masks_type = sh.eval_data_type, sh.evaluate_client_wire, sh.packed_masks_type

  @tff.federated_computation(tff.FederatedType(eval_data_type, tff.CLIENTS),
                             tff.FederatedType(packed_masks_type, tff.CLIENTS))
  def evaluate_fn(client_data, client_masks):
    return tff.federated_map(evaluate_client, (client_data, client_masks))
  return evaluate_fn


def _make_prepare_fn(sh):
  clients_state_type, data_type, prepare_client = sh.clients_state_type, sh.data_type, sh.prepare_client_wire

  @tff.federated_computation(tff.FederatedType(data_type, tff.CLIENTS), clients_state_type)
  def prepare_fn(client_data, client_states):
    new_states, metrics = tff.federated_map(prepare_client, (client_data, client_states))
    return new_states, metrics
  return prepare_fn
