"""A device choosing, every round, how much of the server's theta to take
(``--choose_personal``; plain TF, inside one client's computation).

FedMask's default fixes which layers start a round from theta (the feature layers) and which
from the device's own scores (the pruned last layers). Measured on Fashion-MNIST Dirichlet 0.1,
the devices with many examples do better with more of the model their own, the small ones with
more of it shared, and on FEMNIST every device does better with the head from theta too
(docs/sampled-masks.md). Here each device decides for itself, on examples it never trains on:

* :func:`choice_flags`: a fixed share (``fraction``) of the device's training examples is held
  out for choosing, picked by a hash of each example's content (so the same examples whatever
  the round's shuffle and batching): :func:`split` gives the batches to train on and those to
  choose on.
* The candidates are nested: candidate ``c`` (0..L, for L masked weights in model order) starts
  weights ``0..c-1`` from theta and ``c..L-1`` from the device's own scores of its last round
  (:func:`nested_starts`): ``c = L`` is all shared, ``c = 0`` is ``local_masks``' start.
* :func:`choose`: each candidate's thresholded mask (the personalized model's inference) is
  scored on the held-out examples; the most correct wins, then the lowest loss, then the fixed
  setting's ``c`` (``--personal_layers``), then the larger ``c``. With no held-out example every
  candidate ties and the fixed setting is kept.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from fedmask_tff.algorithms import evaluation

PRIME = 2147483647  # 2^31 - 1: every hash value stays below it
_MIX = 48271
_QUANTUM = 1000.0  # features are hashed at 1/1000 resolution (integers, so order-free and exact)


def hash_weights(features: int, seed: int) -> np.ndarray:
  """int64 [features]: the fixed random multipliers (< 2^16) of the example hash."""
  return np.random.default_rng([int(seed), 0xC401CE]).integers(1, 2 ** 16, size=int(features),
                                                               dtype=np.int64)


def choice_flags(batch, weights: np.ndarray, fraction: float, seed: int) -> tf.Tensor:
  """bool [batch]: True for the examples held out for choosing (about ``fraction`` of them).

  The hash of an example is exact integer arithmetic on its content (features rounded to 1/1000
  and taken mod 2^31 - 1, times ``weights`` mod 2^31 - 1, summed in int64; then mixed with its
  label and ``seed``), so it does not depend on the batch it is in or on the order of the sum.
  """
  x = tf.reshape(tf.cast(batch["x"], tf.float64), [tf.shape(batch["y"])[0], -1])
  q = tf.math.floormod(tf.cast(tf.round(x * _QUANTUM), tf.int64), PRIME)
  products = tf.math.floormod(q * tf.constant(weights)[tf.newaxis, :], PRIME)  # < 2^31 each
  h = tf.math.floormod(tf.reduce_sum(products, axis=1), PRIME)
  y = tf.cast(tf.reshape(batch["y"], [-1]), tf.int64)
  h = tf.math.floormod(h * _MIX + 7919 * y + int(seed) % PRIME, PRIME)
  h = tf.math.floormod(h * _MIX, PRIME)
  return tf.cast(h, tf.float64) < float(fraction) * PRIME


def split(dataset: tf.data.Dataset, fraction: float, seed: int):
  """``(train, held_out)``: each batch of ``dataset`` cut in two by :func:`choice_flags`; empty
  parts are dropped (a batch wholly held out is not a training step)."""
  features = int(np.prod(dataset.element_spec["x"].shape[1:]))
  weights = hash_weights(features, seed)

  def part(held: bool):
    def cut(batch):
      keep = choice_flags(batch, weights, fraction, seed)
      keep = keep if held else tf.logical_not(keep)
      return {k: tf.boolean_mask(v, keep) for k, v in batch.items()}
    return dataset.map(cut).filter(lambda b: tf.size(b["y"]) > 0)
  return part(False), part(True)


def nested_starts(theta_starts, own, c: int) -> list:
  """Candidate ``c``: weights ``i < c`` from ``theta_starts``, the rest from ``own``."""
  return [t if i < c else o for i, (t, o) in enumerate(zip(theta_starts, own))]


def pick(correct, loss, fixed: int) -> tf.Tensor:
  """int32: the winning candidate among ``correct``/``loss`` (float32 [L + 1], candidate ``c`` at
  index ``c``): most correct, then lowest loss (NaN counts as infinite), then ``fixed``, then the
  largest ``c``."""
  correct, loss = tf.convert_to_tensor(correct), tf.convert_to_tensor(loss)
  loss = tf.where(tf.math.is_finite(loss), loss, np.inf)
  best = tf.equal(correct, tf.reduce_max(correct))
  loss = tf.where(best, loss, np.inf)
  best = tf.logical_and(best, loss <= tf.reduce_min(loss))
  index = tf.range(tf.size(correct, out_type=tf.int32))
  fixed_wins = tf.gather(best, fixed)
  return tf.where(fixed_wins, tf.constant(fixed, tf.int32),
                  tf.reduce_max(tf.where(best, index, -1)))


def choose(model, score_vars, theta_starts, own, held_out, fixed: int, after=()):
  """``(starts, c, correct)``: the scores to start from (candidate ``c`` of
  :func:`nested_starts`, chosen by :func:`pick` on ``held_out``) and each candidate's correct
  count (float32 [L + 1]). ``score_vars`` are assigned each candidate in turn (after the ops in
  ``after``); the caller assigns ``starts`` next."""
  correct, losses, deps = [], [], list(after)
  for c in range(len(score_vars) + 1):
    with tf.control_dependencies(deps):
      assigns = [v.assign(x) for v, x in zip(score_vars, nested_starts(theta_starts, own, c))]
    with tf.control_dependencies(assigns):
      metrics = evaluation.dataset_metrics(model, held_out)
    correct.append(metrics["correct"])
    losses.append(metrics["loss_sum"])
    deps = [metrics["correct"], metrics["loss_sum"]]
  correct, losses = tf.stack(correct), tf.stack(losses)
  c = pick(correct, losses, fixed)
  starts = [tf.where(i < c, t, o) for i, (t, o) in enumerate(zip(theta_starts, own))]
  return starts, c, correct
