"""FedMask's client side as TF computations: loading a client's scores into the masked model,
its local training (the one-shot pruning epoch, then SGD on the scores ``m_r`` with W frozen),
the upload it sends (bit-packed masks, 1 bit per element), and its evaluation.

Each ``make_*`` builds one computation from the facts it is given (by
:func:`fedmask_tff.algorithms.fedmask.process.build_fedmask_process`). Those named the same mean
the same throughout: ``config`` the :class:`.config.FedMaskConfig`; ``thresholds`` each masked
weight's tau, ``logit_thresholds`` its logit; ``prunable_idx`` the indices of the prunable weights;
``data_type`` / ``eval_data_type`` / ``state_type`` / ``scores_type`` the TFF types of a client's
training and evaluation datasets, of its (full-size) state and of a tuple of float32 tensors
of the masked weights' shapes; ``wire`` how client states cross the TFF boundary
(:class:`.wire_forms.Wire`). Computations made with :func:`.wire_forms.computations` come as
``(logical, federated)`` pairs.
"""

from __future__ import annotations

import collections

import tensorflow as tf

from fedmask_tff.masks import masking, pruning, regularizers
from fedmask_tff.wire import bitpack, ldp, payloads
from fedmask_tff.models import costs
from fedmask_tff.algorithms import evaluation
from fedmask_tff.masks.layers import mask_variables
from fedmask_tff.algorithms.fedmask import wire_forms


def loss_fn(y, logits):
  """Mean cross-entropy of a batch: labels ``[batch]`` int32, logits ``[batch, classes]``."""
  return tf.reduce_mean(tf.keras.losses.sparse_categorical_crossentropy(
      y, logits, from_logits=True))


def make_load_model(model_fn):
  """``load_model(state)``: a fresh model from ``model_fn`` (the process's model builder) with
  the state's scores and pruning masks assigned; returns the model, its kernels, score and
  keep variables and the assign ops."""

  def load_model(state):
    model = model_fn()
    kernels, score_vars, keep_vars = mask_variables(model)
    assigns = [v.assign(s) for v, s in zip(score_vars, state["scores"])]
    assigns += [v.assign(k) for v, k in zip(keep_vars, state["keep"])]
    return model, kernels, score_vars, keep_vars, assigns
  return load_model


def make_encode_upload_fn(prunable_idx):
  """``encode_upload_fn(masks, keeps, send_keep)``: the upload, every mask bit-packed, plus the
  packed pruning masks of the prunable weights (``prunable_idx``) when ``send_keep > 0``."""

  def encode_upload_fn(masks, keeps, send_keep):
    packed_masks = tuple(bitpack.pack_bits_tf(m) for m in masks)
    packed_keeps = tuple(
        tf.cond(send_keep > 0, lambda k=keeps[i]: bitpack.pack_bits_tf(k),
                lambda: tf.zeros([0], tf.uint8)) for i in prunable_idx)
    return collections.OrderedDict(mask=packed_masks, keep=packed_keeps)
  return encode_upload_fn


def make_client_seed(config):
  """``client_seed(keeps, rounds, salt)``, seeded by ``config.seed``."""

  def client_seed(keeps, rounds, salt):
    """A shape-[2] int32 seed per client, round and use: from the run's seed, the round and a
    fingerprint of the client's pruning mask (the simulation keeps no client ids in TF)."""
    fingerprint = tf.add_n([tf.reduce_sum(tf.where(tf.reshape(k, [-1]) > 0)[:, 0] % 65521)
                            for k in keeps]) % 2147483647
    return tf.stack([tf.constant(int(config.seed) % 100003 * 7919 + salt, tf.int64)
                     + tf.cast(rounds, tf.int64) * 31, fingerprint])
  return client_seed


def make_local_work(config, load_model, lr, prunable_idx, soft_forward, thresholds, weight_costs):
  """``local_work(dataset, state, epochs)``, a client's training.

  Args: ``load_model`` from :func:`make_load_model`; ``lr`` the learning rate (float);
  ``soft_forward`` per masked weight, whether its layer's forward pass is soft;
  ``weight_costs`` the model's FLOP costs per masked weight
  (:func:`fedmask_tff.models.costs.weight_costs`).
  """

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


def make_client_update(wire, config, data_type, state_type, global_scores, local_work,
                       client_seed, encode_upload_fn):
  """``client_update(dataset, state) -> (state, upload, metrics)`` (steps 1-2 of a round).

  Args: ``global_scores`` whether the server keeps global scores (``upload="score_sign"``);
  ``local_work``, ``client_seed``, ``encode_upload_fn`` from :func:`make_local_work`,
  :func:`make_client_seed`, :func:`make_encode_upload_fn`.
  """

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
  return wire_forms.computations(wire, client_update, (data_type, state_type), {1: "state"}, "first")


def make_prepare_client(wire, data_type, state_type, local_work, encode_upload_fn):
  """``prepare_client(dataset, state) -> (state, metrics)``; ``local_work`` and
  ``encode_upload_fn`` from :func:`make_local_work` and :func:`make_encode_upload_fn`."""

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
  return wire_forms.computations(wire, prepare_client, (data_type, state_type), {1: "state"}, "first")


def make_evaluate_client(wire, model_fn, eval_data_type, scores_type, logit_thresholds):
  """``evaluate_client(dataset, masks) -> metrics``: a fresh model from ``model_fn`` (the
  process's model builder) evaluated with the given binary masks (the masks travel packed)."""

  def evaluate_client(dataset, masks):
    model = model_fn()
    _, score_vars, keep_vars = mask_variables(model)
    # Scores of +-1 reproduce the given binary masks exactly (sigmoid(+-1) vs tau = 0.5).
    assigns = [v.assign(tf.where(m > 0, 1.0, -1.0) + masking_offset)
               for v, m, masking_offset in zip(score_vars, masks, logit_thresholds)]
    assigns += [v.assign(tf.ones_like(v)) for v in keep_vars]

    with tf.control_dependencies(assigns):
      return tf.function(lambda d: evaluation.dataset_metrics(model, d))(dataset)
  return wire_forms.computations(wire, evaluate_client, (eval_data_type, scores_type), {1: "masks"})
