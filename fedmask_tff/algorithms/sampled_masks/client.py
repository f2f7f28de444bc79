"""A client's round with sampled masks (plain TF, runs inside one client's TFF computation).

``client_round(model, plan, config, dataset, server, state)`` does, for one client:

1. **Start** (:func:`start_scores`): each masked weight's scores from the server's theta
   (``logit(clip(theta))``, theta as received through the ``downlink_bits`` quantizer) where the
   weight is shared; a pruned weight that is not personal starts from theta at the client's kept
   positions where the server has a value (Algorithm 1, line 13: m^T ⊙ m_k), else from the
   client's own scores; a personal weight (FedMask's last ``personal_layers``, every weight of
   ``local_masks``) from the client's own scores (with ``head_start="theta"``: as a pruned one).
   With ``choose_personal`` theta goes down for every weight and the device picks how many
   weights (from the input) start from it, the rest from its own scores, on a held-out share of
   its training examples (:mod:`.start_choice`); those examples are never trained on.
   With ``personal_offset`` = lambda > 0 an unpruned weight that starts from theta starts from
   ``logit(theta) + o``, where ``o`` is lambda times the device's deviation from its own theta
   start at the end of its last round (kept in its state); its upload samples
   ``sigmoid(m_r - o)``, the round's progress from theta, and the personalized model is m_r.
2. **One-shot pruning** at the client's first round (when the plan prunes): one epoch of
   training, then ``keep`` = the top ``prune_rate`` of ``|W * sigmoid(m_r)|`` in each pruned
   weight (the expected weight: with N(0, 1) scores ``|m_r|`` alone would rank confidently-off
   elements as high as confidently-on ones); pruned elements stay 0 for good.
3. **Local training**: ``local_epochs`` epochs with a fresh Bernoulli sample of every mask in
   every forward pass (the ``"sampled"`` mask mode) and Adam (TFF's ``build_adam`` arithmetic in
   TF's fused kernel, its state started afresh every round) or TFF's SGD on the scores.
4. **Upload** (:func:`upload`): one sample ``b ~ Bernoulli(sigmoid(m_r))`` per kept element,
   1 bit each (only the kept positions of a pruned weight), plus the packed pruning mask, which
   the server stores after the round the client pruned in (the simulation carries it every
   round; it is counted only in that round).

Seeds: every random draw (mask samples, upload) is seeded from the run's seed, the round and a
fingerprint of the client's first batch of the round, so a run repeats exactly.
"""

from __future__ import annotations

import collections

import tensorflow as tf
import tensorflow_federated as tff

from fedmask_tff.algorithms.evaluation import loss_fn
from fedmask_tff.algorithms.sampled_masks import start_choice
from fedmask_tff.algorithms.sampled_masks.config import fixed_theta_layers, receives_theta
from fedmask_tff.masks import layers as masked_layers_lib
from fedmask_tff.masks import probability, pruning
from fedmask_tff.wire import bitpack, payloads


def client_seed(dataset: tf.data.Dataset, round_num, run_seed: int) -> tf.Tensor:
  """int64 [2]: the run's seed and the round, folded with a fingerprint of the first batch."""
  def fingerprint(batch):
    x = tf.reshape(tf.cast(batch["x"], tf.float32), [-1])
    y = tf.cast(tf.reshape(batch["y"], [-1]), tf.float32)
    value = tf.reduce_sum(x * tf.range(1.0, tf.cast(tf.size(x), tf.float32) + 1.0) % 9973.0)
    value += 7.0 * tf.reduce_sum(y * tf.range(1.0, tf.cast(tf.size(y), tf.float32) + 1.0))
    return tf.cast(tf.math.floormod(tf.round(value), 2.0 ** 31), tf.int64)
  first = dataset.take(1).reduce(tf.constant(0, tf.int64), lambda acc, b: acc + fingerprint(b))
  base = tf.stack([tf.constant(run_seed, tf.int64), tf.cast(round_num, tf.int64)])
  return tf.random.experimental.stateless_fold_in(base, first)


def set_sample_seeds(model: tf.keras.Model, seed: tf.Tensor) -> list:
  """Assign ops giving every sampled layer its own stream from ``seed``."""
  ops = []
  for i, layer in enumerate(masked_layers_lib.masked_layers(model)):
    if layer.sample_seed is not None:
      ops.append(layer.sample_seed.assign(
          tf.cast(tf.random.experimental.stateless_fold_in(seed, i + 1), tf.int64)))
  return ops


def unpack_keep(packed, shape) -> tf.Tensor:
  n = 1
  for d in shape:
    n *= int(d)
  return tf.reshape(bitpack.unpack_bits_tf(packed, n), shape)


def received_theta(plan, config, theta, keep):
  """Per weight: ``(probability the client starts from or None, downlink payload or None)``.

  The payload is what the server sends this client: theta quantized to ``downlink_bits`` at the
  weight's elements (shared weights), or at the client's kept positions (``head_start="theta"``).
  """
  out = []
  for spec, t, k in zip(plan, theta, keep):
    if not receives_theta(spec, config):
      out.append((None, None))
      continue
    values = tf.reshape(t, [-1])
    if spec.prunable:  # a pruned weight: theta at the kept positions only
      values = tf.boolean_mask(values, tf.reshape(k, [-1]) > 0)
    payload = probability.quantize_theta_tf(values, config.downlink_bits)
    got = probability.dequantize_theta_tf(payload, tf.size(values), config.downlink_bits)
    if spec.prunable:
      got = tf.scatter_nd(tf.where(tf.reshape(k, [-1]) > 0), got, [spec.size])
    out.append((tf.reshape(got, spec.shape), payload))
  return out


def start_scores(plan, config, received, own, keep, defined):
  """The scores each masked weight starts the round from (see the module docstring)."""
  starts = []
  for spec, (got, _), s, k, d in zip(plan, received, own, keep, defined):
    if got is None:
      starts.append(s)
    elif spec.prunable:  # m^T at the kept positions where the server has a value (line 13)
      starts.append(tf.where((k > 0) & d, probability.start_scores(got, config.eps), s))
    else:
      starts.append(probability.start_scores(got, config.eps))
  return starts


def offset_applies(spec, got) -> bool:
  """Whether ``--personal_offset`` moves ``spec``'s start: a weight that starts from theta and is
  not pruned (a pruned one starts from theta only at some positions)."""
  return got is not None and not spec.prunable


ADAM_BETA_1, ADAM_BETA_2, ADAM_EPSILON = 0.9, 0.999, 1e-7  # TFF's build_adam defaults


class AdamSlots:
  """Adam's moment variables for ``score_vars`` (created once per client computation, outside
  any ``tf.cond``), zeroed at the start of each :func:`train_epochs` call: the state starts
  afresh every round, as with TFF's ``build_adam``."""

  def __init__(self, score_vars):
    self.first = [tf.Variable(tf.zeros(v.shape, v.dtype), trainable=False) for v in score_vars]
    self.second = [tf.Variable(tf.zeros(v.shape, v.dtype), trainable=False) for v in score_vars]

  def reset(self) -> list:
    return [v.assign(tf.zeros_like(v)) for v in self.first + self.second]


def adam_step(score_vars, grads, slots: AdamSlots, step, learning_rate: float) -> list:
  """One Adam step (step ``step`` >= 1, float32) as TF's fused ``ResourceApplyAdam`` kernel: the
  arithmetic of TFF's ``build_adam`` (m += (g - m)(1 - b1); v += (g^2 - v)(1 - b2);
  w -= lr sqrt(1 - b2^t) / (1 - b1^t) m / (sqrt(v) + eps)) in one pass over each weight instead
  of about ten (about 3 ms a step less on the demo cnn; tested equal to ``build_adam``)."""
  b1, b2 = tf.constant(ADAM_BETA_1), tf.constant(ADAM_BETA_2)
  return [tf.raw_ops.ResourceApplyAdam(
      var=v.handle, m=m.handle, v=p.handle, beta1_power=tf.pow(b1, step),
      beta2_power=tf.pow(b2, step), lr=tf.constant(learning_rate, tf.float32), beta1=b1, beta2=b2,
      epsilon=tf.constant(ADAM_EPSILON), grad=g)
      for v, m, p, g in zip(score_vars, slots.first, slots.second, grads)]


def train_epochs(model, score_vars, dataset, epochs, config, slots=None):
  """``epochs`` passes over ``dataset`` with Adam (:func:`adam_step`, its state ``slots``
  zeroed first) or TFF's SGD on ``score_vars``; returns ``(loss_sum, examples)`` float32."""
  adam = config.optimizer == "adam"
  if adam:
    if slots is None:
      raise ValueError("Adam needs its AdamSlots (created outside any tf.cond)")
    opt_state = tf.constant(0.0)  # the step count
    reset = slots.reset()
  else:
    opt = tff.learning.optimizers.build_sgdm(config.learning_rate)
    specs = tuple(tf.TensorSpec(v.shape, v.dtype) for v in score_vars)
    opt_state = tf.nest.map_structure(tf.convert_to_tensor, opt.initialize(specs))
    reset = []

  def step(acc, batch):
    loss_sum, count, state = acc
    with tf.GradientTape() as tape:
      loss = loss_fn(batch["y"], model(batch["x"], training=True))
    grads = tape.gradient(loss, score_vars)
    if adam:
      state = state + 1.0
      updates = adam_step(score_vars, grads, slots, state, config.learning_rate)
    else:
      state, new = opt.next(state, tuple(tf.convert_to_tensor(v) for v in score_vars), tuple(grads))
      updates = [v.assign(w) for v, w in zip(score_vars, new)]
    with tf.control_dependencies(updates):
      n = tf.cast(tf.shape(batch["y"])[0], tf.float32)
      return loss_sum + loss * n, count + n, tf.nest.map_structure(tf.identity, state)

  loss_sum, count = tf.constant(0.0), tf.constant(0.0)
  with tf.control_dependencies(reset):
    loss_sum = tf.identity(loss_sum)
  for _ in range(int(epochs)):  # a Python int: the epochs unroll in the graph
    loss_sum, count, opt_state = dataset.reduce((loss_sum, count, opt_state), step)
  return loss_sum, count


def prune(plan, config, kernels, score_vars, keep_vars) -> list:
  """One-shot pruning of the plan's pruned weights: top ``prune_rate`` of ``|W * sigmoid(m_r)|``."""
  ops = []
  for spec, w, s, k in zip(plan, kernels, score_vars, keep_vars):
    if spec.prunable:
      ops.append(k.assign(pruning.top_magnitude_keep(w, tf.sigmoid(s), config.prune_rate)))
  return ops


def upload(plan, score_vars, keep_vars, seed):
  """``(bits, keep)`` payloads: per weight, one Bernoulli(sigmoid(m_r)) sample per kept element,
  packed (a pruned weight: its kept positions only); and the packed pruning mask (a uint8 [0]
  tensor for a weight that is never pruned)."""
  bits, keeps = [], []
  for i, (spec, s, k) in enumerate(zip(plan, score_vars, keep_vars)):
    u = tf.random.stateless_uniform(spec.shape, seed=tf.random.experimental.stateless_fold_in(seed, 1000 + i))
    sample = tf.cast(u < tf.sigmoid(s), tf.float32)
    flat, kept = tf.reshape(sample, [-1]), tf.reshape(k, [-1]) > 0
    bits.append(bitpack.pack_bits_tf(tf.boolean_mask(flat, kept) if spec.prunable else flat))
    keeps.append(bitpack.pack_bits_tf(k) if spec.prunable else tf.zeros([0], tf.uint8))
  return tuple(bits), tuple(keeps)


def client_round(model, plan, config, dataset, server, state):
  """One client's round; returns ``(upload, new_state, metrics)`` (see the module docstring).

  ``server``: the broadcast server state (``theta``, ``defined``, ``round``); ``state``: the
  client's ``OrderedDict(scores, keep (packed uint8), pruned int32)``, with ``offset`` (float32,
  per weight) under ``personal_offset``.
  """
  kernels, score_vars, keep_vars = masked_layers_lib.mask_variables(model)
  keep_in = [unpack_keep(k, spec.shape) for k, spec in zip(state["keep"], plan)]
  received = received_theta(plan, config, server["theta"], keep_in)
  starts = start_scores(plan, config, received, state["scores"], keep_in, server["defined"])
  seed = client_seed(dataset, server["round"], config.seed)
  setup = [v.assign(k) for v, k in zip(keep_vars, keep_in)] + set_sample_seeds(model, seed)
  if config.choose_personal:  # every weight received theta; the device picks how many to take
    dataset, held_out = start_choice.split(dataset, config.choice_fraction, config.seed)
    starts, theta_layers, _ = start_choice.choose(model, score_vars, starts, state["scores"],
                                                  held_out, fixed_theta_layers(plan), setup)
    held_examples = held_out.reduce(0.0, lambda n, b: n + tf.cast(tf.shape(b["y"])[0], tf.float32))
  else:
    theta_layers = sum(1 for g, _ in received if g is not None)
    held_examples = tf.constant(0.0)
  theta_starts = starts
  if "offset" in state:  # --personal_offset: logit(theta) + the device's kept deviation
    starts = [x + o if offset_applies(spec, g) else x
              for spec, x, o, (g, _) in zip(plan, starts, state["offset"], received)]
  with tf.control_dependencies(setup):
    setup = [v.assign(x) for v, x in zip(score_vars, starts)]
  prunes = any(spec.prunable for spec in plan)
  pruning_now = tf.logical_and(tf.equal(state["pruned"], 0), prunes)
  slots = AdamSlots(score_vars) if config.optimizer == "adam" else None
  with tf.control_dependencies(setup):
    loss0, count0 = tf.cond(pruning_now,
                            lambda: train_epochs(model, score_vars, dataset, 1, config, slots),
                            lambda: (tf.constant(0.0), tf.constant(0.0)))
  with tf.control_dependencies([loss0, count0]):
    pruned_ops = tf.cond(pruning_now, lambda: tf.group(prune(plan, config, kernels, score_vars, keep_vars)),
                         lambda: tf.no_op())
  with tf.control_dependencies([pruned_ops]):
    loss1, count1 = train_epochs(model, score_vars, dataset, config.local_epochs, config, slots)
  with tf.control_dependencies([loss1, count1]):
    sent = score_vars
    if "offset" in state:  # the upload is the round's progress from theta, not the deviation
      sent = [v - o for v, o in zip(score_vars, state["offset"])]
    bits, keeps = upload(plan, sent, keep_vars, tf.random.experimental.stateless_fold_in(seed, 7))
    new_scores = tuple(tf.identity(v) for v in score_vars)
    new_keep = tuple(bitpack.pack_bits_tf(k) for k in keep_vars)
    masks = [tf.cast(tf.sigmoid(s) >= 0.5, tf.float32) * k for s, k in zip(score_vars, keep_vars)]
    mask_kept = tf.add_n([tf.reduce_sum(tf.identity(k)) for k in keep_vars])
  loss_sum, examples = loss0 + loss1, count0 + count1
  diverged = tf.logical_not(tf.math.is_finite(loss_sum))
  down = [p for _, p in received if p is not None]
  keep_bits = tf.where(pruning_now, payloads.tensor_bits(keeps), tf.constant(0, tf.int64))
  metrics = collections.OrderedDict(
      loss_sum=tf.where(diverged, 0.0, loss_sum), examples=tf.where(diverged, 0.0, examples),
      trained_examples=examples,
      uplink_bits=payloads.tensor_bits(bits) + keep_bits,
      downlink_bits=payloads.tensor_bits(tuple(down)) if down else tf.constant(0, tf.int64),
      diverged=tf.cast(diverged, tf.int32), pruned=tf.cast(pruning_now, tf.int32),
      mask_ones=tf.add_n([tf.reduce_sum(m) for m in masks]),
      mask_kept=mask_kept, theta_layers=tf.cast(theta_layers, tf.float32),
      held_out_examples=held_examples)
  new_state = collections.OrderedDict(
      scores=new_scores, keep=new_keep,
      pruned=tf.where(tf.logical_or(pruning_now, tf.equal(state["pruned"], 1)), 1, 0))
  if "offset" in state:
    new_state["offset"] = tuple(
        config.personal_offset * (v - t) if offset_applies(spec, g) else tf.zeros_like(v)
        for spec, v, t, (g, _) in zip(plan, new_scores, theta_starts, received))
  return (bits, keeps), new_state, metrics
