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
3. **Server** (``decode_upload`` + ``tff.federated_sum``): unpack each payload
   and sum, per element, ``mask * keep`` and ``keep``. The server keeps every
   client's pruning mask from its first upload (the paper's server does the
   same); in the simulation that cached copy travels with the client state.
4. **Download** (``encode_download`` / ``apply_download``): each client gets a
   float32 value per element it keeps: the mean over the clients sharing the
   element where at least ``min_shared`` (2) keep it, else -1 ("unchanged").
   The client restarts ``m_r`` from the means
   (:func:`fedmask_tff.masks.masking.scores_from_mask_values`) and keeps its own
   scores elsewhere. Bits are counted from that float32 message.

``next(server_state, client_data, client_states)`` returns
``(server_state, client_states, client_metrics)``; the states are
CLIENTS-placed values, kept between rounds by
:class:`fedmask_tff.wire.client_state.ClientStateStore` in the driver. ``next`` is the
composition of ``process.client_work`` (steps 1-2, no aggregation) and
``process.aggregate`` (steps 3-4, one sum), which ``--workers`` calls one after
the other so that TFF's mergeable context can split each over several workers.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Callable

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from fedmask_tff.masks import aggregation, masking, pruning, regularizers
from fedmask_tff.wire import bitpack, ldp, payloads, quantization
from fedmask_tff.models import costs
from fedmask_tff.algorithms import evaluation
from fedmask_tff.masks.layers import mask_variables, masked_layers

DOWNLINK_UNCHANGED = aggregation.UNCHANGED
UPLOADS = ("mask", "bernoulli", "score_sign")


@dataclasses.dataclass(frozen=True)
class FedMaskConfig:
  """Hyper-parameters of FedMask's client work and aggregation.

  Attributes:
    local_epochs: epochs of local training per round (after the pruning epoch
      at a client's first round).
    learning_rate: SGD step size on the scores. Score gradients carry W
      (about ``1/sqrt(fan_in)``) and ``sigmoid'(m_r) <= 1/4``, so useful values
      are far larger than for weight training.
    prune_rate: fraction of elements one-shot pruning keeps, in (0, 1].
    prune_last_layers: how many of the last masked layers are pruned.
    score_restart: how the vote moves a client's scores (``masking.apply_vote``):
      ``"scaled_logit"`` or ``"linear"`` overwrite every averaged element's
      score; ``"vote_shift"``, ``"disagree_shift"`` and ``"disagree_restart"``
      keep the client's scores between rounds and only move them.
    restart_scale, restart_eps: the rule's scale (restart scale, or shift step)
      and logit clip.
    min_shared: clients that must keep an element for it to be averaged.
    group_lasso: weight λ of the paper's structured-sparsity term added to the
      client loss: ``λ * regularizers.structured_penalty(model, normalize=True)``
      (group lasso over filters / rows / columns of σ(m_r) · keep); 0 = off.
    secure_aggregation: sum the two per-element counts (``mask * keep`` and
      ``keep``, integers) with ``tff.federated_secure_sum_bitwidth``, so the
      server learns only the sums; each client applies the rule itself.
    secure_bitwidth: bits of the secure sums (they count clients: 2^bits - 1
      must exceed the clients per round).
    downlink_bits: 0 sends one float32 per kept element; 1 sends the vote's
      decision ``1[v >= tau]`` (the client's own bit where not averaged), as the
      paper's "updated binary masks"; ``b`` in [2, 16] quantizes each to ``b`` bits (:mod:`fedmask_tff.wire.quantization`: levels
      ``i / (2^b - 2)``, the top code means "keep yours").
    downlink_stochastic: stochastic (unbiased) instead of nearest rounding.
    ldp_epsilon: > 0 turns on randomized response on the uploaded mask bits
      (:mod:`fedmask_tff.wire.ldp`; each bit kept with probability
      e^eps / (1 + e^eps)); the server debiases the sums. 0 = off. The
      client's own (personalized) mask is not randomized.
    score_init_noise: > 0 adds uniform noise in [-a, a] (seeded by ``seed``, the
      same for every client) to the layers' constant ``score_init``, so that the
      initial mask is random around the threshold instead of all ones.
    upload: what the 1 bit per element says. ``"mask"`` (the paper): the
      client's binary mask ``1[sigmoid(m_r) >= tau] * keep``; the server averages
      it and each client moves its scores by the vote (``score_restart``).
      ``"bernoulli"`` (after FedPM, Isik et al. 2023): a sample
      ``m ~ Bernoulli(sigmoid(m_r)) * keep``, so the server's mean estimates the
      clients' mean probability (restart with ``scaled_logit``, scale 1, to read
      it as a probability); the personal mask stays the thresholded one.
      ``"score_sign"`` (beyond the paper; Algorithm 1 with a real-valued global
      mask): the server holds global scores ``G`` (its m^T), a selected client
      starts from ``G`` at the positions it keeps (line 11: m^T ⊙ m_k), trains,
      and uploads ``1[m_r(after) > m_r(start)]``, the direction its evidence
      moved; the server steps ``G += server_score_step * (2v - 1)`` where at
      least ``min_shared`` clients keep the element (a majority-vote sign step).
      The downlink is ``G`` at the client's kept positions: float32, or with
      ``downlink_bits=b`` (2..16) ``b`` bits each between the tensor's min and
      max (sent as two float32).
    server_score_step: the server's step on ``G`` per round (``score_sign``).
    global_weight: ``score_sign`` only: a selected client starts from
      ``global_weight * G + (1 - global_weight) * own`` at its kept positions
      (1: from ``G`` itself; below 1 the client's own evidence from its earlier
      rounds is kept in part).
    personal_head: ``score_sign`` only (ignored otherwise): a client starts
      from ``G`` in the unpruned layers only and keeps its own scores in the
      pruned (last) layers between rounds, so its classifier stays personal
      while the feature layers are learned by everyone. The pruned layers'
      directions are still uploaded and ``G`` keeps them (for newcomers).
    global_mask: ``upload="mask"`` or ``"bernoulli"`` only: Algorithm 1 read
      literally (lines 9-11). The server keeps the binary global mask m^T,
      ``1[v >= tau]`` per element from the last aggregation in which at least
      ``min_shared`` clients kept it (an element never shared has none); a
      selected client starts its round from m^T at the positions it keeps (its
      scores moved by ``score_restart``, so ``scaled_logit`` restarts them from
      m^T ⊙ m_k), trains, and uploads; no vote is applied after its round. The
      downlink is m^T's bit per kept element (plus one "defined" bit per kept
      element while some are undefined), counted from the packed message.
    prune_at_init: every client trains its one pruning epoch and prunes before
      round 1 (Algorithm 1 lines 4-6), sending its pruning mask then, instead of
      at its first participation (see :meth:`FedMaskProcess.prepare_clients`).
    seed: the run's seed, from which per-client, per-round seeds of the
      stochastic rounding and randomized response are derived (together with
      the round and the client's pruning mask).
  """
  local_epochs: int = 2
  learning_rate: float = 30.0
  prune_rate: float = 0.2
  prune_last_layers: int = 2
  score_restart: str = "scaled_logit"
  restart_scale: float = 0.1
  restart_eps: float = 0.01
  min_shared: int = aggregation.MIN_SHARED_CLIENTS
  group_lasso: float = 0.0
  secure_aggregation: bool = False
  secure_bitwidth: int = 16
  downlink_bits: int = 0
  downlink_stochastic: bool = False
  ldp_epsilon: float = 0.0
  score_init_noise: float = 0.0
  upload: str = "score_sign"
  server_score_step: float = 0.03
  personal_head: bool = True
  global_weight: float = 0.5
  global_mask: bool = False
  prune_at_init: bool = False
  seed: int = 0

  def validate(self, num_masked_layers: int | None = None) -> "FedMaskConfig":
    if int(self.local_epochs) < 1:
      raise ValueError(f"local_epochs must be >= 1, got {self.local_epochs}")
    if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
      raise ValueError(f"learning_rate must be a finite number > 0, got {self.learning_rate}")
    pruning.check_prune_rate(self.prune_rate)
    if int(self.prune_last_layers) < 0:
      raise ValueError(f"prune_last_layers must be >= 0, got {self.prune_last_layers}")
    if num_masked_layers is not None and self.prune_last_layers > num_masked_layers:
      raise ValueError(f"prune_last_layers={self.prune_last_layers} but the model has only "
                       f"{num_masked_layers} masked layers")
    masking.check_rule(self.score_restart, self.restart_scale, self.restart_eps)
    if not (math.isfinite(self.group_lasso) and self.group_lasso >= 0):
      raise ValueError(f"group_lasso must be a finite number >= 0, got {self.group_lasso}")
    if int(self.downlink_bits) == 1 and self.downlink_stochastic:
      raise ValueError("downlink_stochastic applies to downlink_bits >= 2 (the 1-bit downlink "
                       "sends the vote's decision)")
    if int(self.downlink_bits) not in (0, 1):
      quantization.check_bits(self.downlink_bits)
    if self.ldp_epsilon != 0:
      ldp.check_epsilon(self.ldp_epsilon)
    if not 2 <= int(self.secure_bitwidth) <= 31:
      raise ValueError(f"secure_bitwidth must be in [2, 31], got {self.secure_bitwidth}")
    if not (math.isfinite(self.score_init_noise) and self.score_init_noise >= 0):
      raise ValueError(f"score_init_noise must be a finite number >= 0, got {self.score_init_noise}")
    if self.upload not in UPLOADS:
      raise ValueError(f"upload must be one of {UPLOADS}, got {self.upload!r}")
    if not (math.isfinite(self.server_score_step) and self.server_score_step > 0):
      raise ValueError(f"server_score_step must be a finite number > 0, got {self.server_score_step}")
    if self.upload == "score_sign" and int(self.downlink_bits) == 1:
      raise ValueError("upload='score_sign' sends the server's real-valued scores down: "
                       "downlink_bits=1 (a vote's decision) applies to upload='mask'; use 0 "
                       "(float32) or 2..16 bits")
    if not (0.0 < self.global_weight <= 1.0):
      raise ValueError(f"global_weight must be in (0, 1], got {self.global_weight}")
    if self.global_mask and self.upload == "score_sign":
      raise ValueError("global_mask keeps the binary global mask m^T of upload='mask' or "
                       "'bernoulli'; upload='score_sign' already starts clients from the server's scores")
    if self.global_mask and int(self.downlink_bits) >= 2:
      raise ValueError("global_mask sends m^T down as 1 bit per kept element; downlink_bits "
                       f"{self.downlink_bits} does not apply (use 0 or 1)")
    if int(self.min_shared) < 1:
      raise ValueError(f"min_shared must be >= 1, got {self.min_shared}")
    return self


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
  """A ``tff.templates.IterativeProcess`` plus what the driver needs to feed it.

  Extra attributes: ``specs`` (list of :class:`MaskSpec`), ``config``,
  ``client_state_type``, ``initial_client_state()`` (numpy), ``evaluate``
  (a federated computation ``(data@CLIENTS, binary masks@CLIENTS) -> metrics@CLIENTS``;
  pass ``state["personal"]`` for the personalized model)
  and the TF computations of each step, for tests.
  """


def build_fedmask_process(model_fn: Callable[[], tf.keras.Model], element_spec,
                          config: FedMaskConfig = FedMaskConfig(),
                          eval_element_spec=None) -> FedMaskProcess:
  """Builds FedMask as a TFF iterative process.

  Args:
    model_fn: no-argument callable returning a fresh, uncompiled Keras model of
      masked layers that outputs logits; it must build the same frozen W on
      every call (seeded layers do).
    element_spec: the element spec of a client's *batched* training dataset,
      an ``OrderedDict(x=..., y=...)`` of ``tf.TensorSpec`` (labels int32).
    config: a :class:`FedMaskConfig`.
    eval_element_spec: element spec of the evaluation datasets (default: the same).
  """
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
  # Variable length: the server validates what arrives (a malformed upload is dropped).
  packed_type = tuple(tff.TensorType(np.uint8, [None]) for s in specs)
  keep_packed_type = tuple(tff.TensorType(np.uint8, [None]) for s in specs if s.prunable)
  upload_type = tff.types.to_type(collections.OrderedDict(mask=packed_type, keep=keep_packed_type))
  sums_type = tff.types.to_type(collections.OrderedDict(total=scores_type, count=scores_type))
  prunable_idx = [i for i, s in enumerate(specs) if s.prunable]

  def loss_fn(y, logits):
    return tf.reduce_mean(tf.keras.losses.sparse_categorical_crossentropy(
        y, logits, from_logits=True))

  def load_model(state):
    model = model_fn()
    kernels, score_vars, keep_vars = mask_variables(model)
    assigns = [v.assign(s) for v, s in zip(score_vars, state["scores"])]
    assigns += [v.assign(k) for v, k in zip(keep_vars, state["keep"])]
    return model, kernels, score_vars, keep_vars, assigns

  def encode_upload_fn(masks, keeps, send_keep):
    packed_masks = tuple(bitpack.pack_bits_tf(m) for m in masks)
    packed_keeps = tuple(
        tf.cond(send_keep > 0, lambda k=keeps[i]: bitpack.pack_bits_tf(k),
                lambda: tf.zeros([0], tf.uint8)) for i in prunable_idx)
    return collections.OrderedDict(mask=packed_masks, keep=packed_keeps)

  def client_seed(keeps, rounds, salt):
    """A shape-[2] int32 seed per client, round and use: from the run's seed, the round and a
    fingerprint of the client's pruning mask (the simulation keeps no client ids in TF)."""
    fingerprint = tf.add_n([tf.reduce_sum(tf.where(tf.reshape(k, [-1]) > 0)[:, 0] % 65521)
                            for k in keeps]) % 2147483647
    return tf.stack([tf.constant(int(config.seed) % 100003 * 7919 + salt, tf.int64)
                     + tf.cast(rounds, tf.int64) * 31, fingerprint])

  # --- Client work -------------------------------------------------------------
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

  @tff.tensorflow.computation(data_type, state_type)
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
      sent = tuple(tf.cast(new > old, tf.float32) * k
                   for new, old, k in zip(scores, state["scores"], keeps))
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

  @tff.tensorflow.computation(data_type, state_type)
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

  # --- Server side: decode each upload and sum ------------------------------------
  @tff.tensorflow.computation(upload_type, scores_type)
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

  # --- Download: the server's per-client message, and the client's restart -------
  @tff.tensorflow.computation(sums_type, state_type)
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
                            + tf.where(tf.reshape(keep > 0, [-1]), 0.0, DOWNLINK_UNCHANGED),
                            keep.shape)
      new_scores.append(masking.apply_vote(state["scores"][i], received, config.score_restart,
                                           config.restart_scale, config.restart_eps, thresholds[i]))
    new_state = collections.OrderedDict(scores=tuple(new_scores), keep=state["keep"],
                                        personal=state["personal"], rounds=state["rounds"])
    return new_state, tf.cast(tf.add_n(bits), tf.int64)

  # --- Evaluation: each client's binary-masked model on its own data -------------
  @tff.tensorflow.computation(eval_data_type, scores_type)
  def evaluate_client(dataset, masks):
    model = model_fn()
    _, score_vars, keep_vars = mask_variables(model)
    # Scores of +-1 reproduce the given binary masks exactly (sigmoid(+-1) vs tau = 0.5).
    assigns = [v.assign(tf.where(m > 0, 1.0, -1.0) + masking_offset)
               for v, m, masking_offset in zip(score_vars, masks, logit_thresholds)]
    assigns += [v.assign(tf.ones_like(v)) for v in keep_vars]

    with tf.control_dependencies(assigns):
      return tf.function(lambda d: evaluation.dataset_metrics(model, d))(dataset)

  int_sums_type = tff.types.to_type(collections.OrderedDict(
      total=tuple(tff.TensorType(np.int32, s.shape) for s in specs),
      count=tuple(tff.TensorType(np.int32, s.shape) for s in specs)))

  @tff.tensorflow.computation(sums_type)
  def sums_to_int(sums):
    return collections.OrderedDict(total=tuple(tf.cast(tf.round(t), tf.int32) for t in sums["total"]),
                                   count=tuple(tf.cast(tf.round(c), tf.int32) for c in sums["count"]))

  @tff.tensorflow.computation(int_sums_type)
  def sums_to_float(sums):
    return collections.OrderedDict(total=tuple(tf.cast(t, tf.float32) for t in sums["total"]),
                                   count=tuple(tf.cast(c, tf.float32) for c in sums["count"]))

  @tff.tensorflow.computation(tff.TensorType(np.int32))
  def increment(r):
    return r + 1

  # score_sign: the server's state is its real-valued global scores G and the round counter.
  global_state_type = tff.types.to_type(collections.OrderedDict(
      round=tff.TensorType(np.int32), scores=scores_type))

  @tff.tensorflow.computation
  def initial_global_state():
    scores = tuple(tf.constant(x) if config.score_init_noise > 0 else tf.fill(x.shape, x.flat[0])
                   for x in initial_scores)
    return collections.OrderedDict(round=tf.constant(0, tf.int32), scores=scores)

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

  @tff.tensorflow.computation(scores_type, state_type)
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

  def server_votes(sums):
    """Per tensor: ``(v, shared)``: the share of 1s among the clients keeping each element
    (debiased under LDP) and whether at least ``min_shared`` clients keep it."""
    votes = []
    for total, count in zip(sums["total"], sums["count"]):
      if config.ldp_epsilon > 0:
        total = ldp.debias_sum_tf(total, count, config.ldp_epsilon)
      votes.append(aggregation.votes(total, count, config.min_shared))
    return votes

  @tff.tensorflow.computation(global_state_type, sums_type)
  def global_step(server, sums):
    """``G += step * (2v - 1)`` where at least ``min_shared`` clients keep the element."""
    new = tuple(g + tf.where(shared, config.server_score_step * (2.0 * vote - 1.0), 0.0)
                for g, (vote, shared) in zip(server["scores"], server_votes(sums)))
    return collections.OrderedDict(round=server["round"] + 1, scores=new)

  # global_mask (Algorithm 1 literally): the server's state is the binary m^T (-1: never shared).
  mask_state_type = tff.types.to_type(collections.OrderedDict(
      round=tff.TensorType(np.int32), mask=scores_type))

  @tff.tensorflow.computation
  def initial_mask_state():
    return collections.OrderedDict(round=tf.constant(0, tf.int32),
                                   mask=tuple(tf.fill(s.shape, DOWNLINK_UNCHANGED) for s in specs))

  def mask_message(m, keep):
    """What a client receives of m^T (one tensor): its bit per kept element, packed, plus a
    packed "defined" bit per kept element while any of them has no m^T yet. Returns the
    decoded message scattered back (``DOWNLINK_UNCHANGED`` where not kept or undefined)
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
    message = tf.where(defined > 0, bitpack.unpack_bits_tf(packed_bits, n), DOWNLINK_UNCHANGED)
    positions = tf.where(flat_keep)
    received = tf.tensor_scatter_nd_update(tf.fill([tf.size(keep)], DOWNLINK_UNCHANGED), positions,
                                           message)
    return tf.reshape(received, keep.shape), size

  @tff.tensorflow.computation(scores_type, state_type)
  def start_from_mask(global_mask_value, state):
    """Algorithm 1 line 11: a selected client moves its scores by m^T where it keeps the element
    (``score_restart``; ``scaled_logit`` restarts them from m^T ⊙ m_k), its own elsewhere."""
    scores = tuple(
        masking.apply_vote(s, mask_message(m, k)[0], config.score_restart, config.restart_scale,
                           config.restart_eps, t)
        for m, s, k, t in zip(global_mask_value, state["scores"], state["keep"], thresholds))
    return collections.OrderedDict(scores=scores, keep=state["keep"], personal=state["personal"],
                                   rounds=state["rounds"])

  @tff.tensorflow.computation(mask_state_type, sums_type)
  def mask_step(server, sums):
    """m^T = 1[v >= tau] where at least ``min_shared`` clients keep the element; else unchanged."""
    new = tuple(tf.where(shared, tf.cast(vote >= t, tf.float32), m)
                for m, (vote, shared), t in zip(server["mask"], server_votes(sums), thresholds))
    return collections.OrderedDict(round=server["round"] + 1, mask=new)

  @tff.tensorflow.computation(scores_type, state_type, client_update.type_signature.result[2])
  def mask_downlink_bits(global_mask_value, state, metrics):
    """Bits of the m^T message the client received at the start of its round (all positions
    before its pruning)."""
    sizes = [mask_message(m, tf.where(metrics["pruned"] > 0, tf.ones_like(k), k))[1]
             for m, k in zip(global_mask_value, state["keep"])]
    return tf.add_n(sizes)

  @tff.tensorflow.computation(state_type, client_update.type_signature.result[2])
  def global_downlink_bits(state, metrics):
    """float32 G at the positions the client kept when it started (all before its pruning)."""
    counts = [tf.where(metrics["pruned"] > 0, tf.constant(spec.size, tf.int64),
                       tf.cast(tf.reduce_sum(k), tf.int64)) for spec, k in zip(specs, state["keep"])]
    if not config.downlink_bits:
      return 32 * tf.add_n(counts)
    b = int(config.downlink_bits)  # b-bit codes, whole bytes per tensor, plus lo and hi
    return tf.add_n([8 * ((n * b + 7) // 8) + 64 for n in counts])

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

  clients_state_type = tff.FederatedType(state_type, tff.CLIENTS)

  # A round is two federated computations, each with at most one aggregation, so that TFF's
  # mergeable execution context can split either over several workers without computing
  # anything twice: `client_work` (no aggregation) and `aggregate` (one sum, then each
  # client's own rule). `next_fn` is their composition.
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

  def summed(decoded):
    if not config.secure_aggregation:
      return tff.federated_sum(decoded)
    counts = tff.federated_map(sums_to_int, decoded)
    secure = tff.federated_secure_sum_bitwidth(
        counts, collections.OrderedDict(total=tuple(config.secure_bitwidth for _ in specs),
                                        count=tuple(config.secure_bitwidth for _ in specs)))
    return tff.federated_map(sums_to_float, secure)

  @tff.federated_computation(server_state_type, clients_state_type,
                             tff.FederatedType(upload_type, tff.CLIENTS),
                             tff.FederatedType(client_update.type_signature.result[2], tff.CLIENTS))
  def aggregate_fn(server_state, trained, upload, metrics):
    decoded, valid = tff.federated_map(decode_upload, (upload, trained.keep))
    sums = summed(decoded)
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

  @tff.federated_computation(server_state_type, tff.FederatedType(data_type, tff.CLIENTS),
                             clients_state_type)
  def next_fn(server_state, client_data, client_states):
    trained, upload, metrics = client_work_fn(server_state, client_data, client_states)
    return aggregate_fn(server_state, trained, upload, metrics)

  @tff.federated_computation(tff.FederatedType(eval_data_type, tff.CLIENTS),
                             tff.FederatedType(scores_type, tff.CLIENTS))
  def evaluate_fn(client_data, client_masks):
    return tff.federated_map(evaluate_client, (client_data, client_masks))

  @tff.federated_computation(tff.FederatedType(data_type, tff.CLIENTS), clients_state_type)
  def prepare_fn(client_data, client_states):
    new_states, metrics = tff.federated_map(prepare_client, (client_data, client_states))
    return new_states, metrics

  process = FedMaskProcess(initialize_fn, next_fn)
  process.prepare = prepare_fn
  process.specs = specs
  process.config = config
  process.client_state_type = state_type
  process.evaluate = evaluate_fn
  process.client_work = client_work_fn
  process.aggregate = aggregate_fn
  process.client_update = client_update
  process.decode_upload = decode_upload
  process.download_and_apply = download_and_apply
  process.evaluate_client = evaluate_client

  def initial_client_state():
    return collections.OrderedDict(
        scores=tuple(x.copy() for x in initial_scores),
        keep=tuple(np.ones(s.shape, np.float32) for s in specs),
        personal=tuple((x >= lt).astype(np.float32) for x, lt in zip(initial_scores, logit_thresholds)),
        rounds=np.int32(0))

  process.initial_client_state = initial_client_state

  process.global_scores = global_scores
  process.start_from_global = start_from_global

  def start_masks(server_state, state):
    """The binary masks of the aggregate as a client sees it, before local training (numpy):
    with ``score_sign`` the mask of the server's scores ``G`` at its kept positions; with
    ``global_mask`` the mask it starts its next round from (its scores moved by m^T);
    otherwise the mask it restarted from after its last aggregation."""
    if global_scores:
      scores = server_state["scores"]
    elif config.global_mask:
      scores = start_from_mask(server_state["mask"], state)["scores"]
    else:
      scores = state["scores"]
    return tuple(((np.asarray(sc) >= lt) * np.asarray(k)).astype(np.float32)
                 for sc, k, lt in zip(scores, state["keep"], logit_thresholds))

  process.start_masks = start_masks
  process.start_from_mask = start_from_mask
  process.prepare_client = prepare_client
  return process
