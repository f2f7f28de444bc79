"""Local differential privacy for FedMask's uploads: randomized response on mask bits.

Mechanism: each uploaded mask bit is kept with probability
``p = e^eps / (1 + e^eps)`` and flipped otherwise, independently. For one bit,
``P[out | in] / P[out | in'] <= p / (1 - p) = e^eps``: **eps-LDP per bit**.

Debiasing at the server: if ``n`` clients report an element and ``S`` of the
reports are 1, ``E[S] = T p + (n - T)(1 - p)`` for true count ``T``, so
``T_hat = (S - n (1 - p)) / (2p - 1)`` is unbiased, with variance
``n p (1 - p) / (2p - 1)^2`` (large for small eps). The mean FedMask sends is
then ``clip(T_hat / n, 0, 1)`` (clipping adds a bias toward the interior).

Accounting (:func:`privacy_spent`), stated explicitly:

* per element per round: eps (the guarantee for one bit of one report);
* per element over ``R`` rounds (basic composition): ``R * eps``;
* per report, if the protected datum is the client's whole mask of ``d`` bits
  (neighbouring masks may differ in every bit): ``d * eps`` by basic
  composition; over ``R`` rounds ``R * d * eps``. Correlated bits (e.g. a
  filter's bits, or a mask that barely changes between rounds) get no
  protection beyond these composed bounds: the per-element eps does *not*
  bound what a set of correlated bits reveals together.

Not protected at all: the pruning mask ``keep`` (sent in the clear at the first
round; randomize only kept positions, pruned ones stay 0), which clients take
part, and anything derived from the *unrandomized* mask. Entropy coding the
randomized bits against a public reference is post-processing (no extra cost),
but randomization raises the flip rate to at least ``1 - p`` and so the coded size.
The randomness must stay on the client (the server must not know the seeds);
in the simulation seeds derived from (client, round) are fine.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import tensorflow as tf


def check_epsilon(epsilon) -> float:
  """eps must be a number > 0 (``inf`` = no randomization); NaN, 0, negatives raise."""
  try:
    eps = float(epsilon)
  except (TypeError, ValueError):
    raise ValueError(f"epsilon must be a number > 0, got {epsilon!r}") from None
  if math.isnan(eps) or eps <= 0:
    raise ValueError(f"epsilon must be a number > 0 (inf allowed), got {epsilon!r}")
  return eps


def keep_probability(epsilon) -> float:
  """``p = e^eps / (1 + e^eps)`` in (1/2, 1], computed stably (1 for ``eps = inf``)."""
  eps = check_epsilon(epsilon)
  return 1.0 / (1.0 + math.exp(-eps))


def randomized_response(bits, epsilon, seed=None) -> np.ndarray:
  """Flips each 0/1 element independently with probability ``1 - p``.

  ``bits``: 0/1 array, any shape and numeric/bool dtype; returns the same
  shape and dtype. ``seed``: for ``np.random.default_rng``.
  """
  p = keep_probability(epsilon)
  arr = np.asarray(bits)
  if arr.size and not np.all((arr == 0) | (arr == 1)):
    raise ValueError("randomized_response expects 0/1 values")
  if p == 1.0:
    return arr.copy()
  flip = np.random.default_rng(seed).random(arr.shape) >= p
  return np.where(flip, 1 - arr, arr).astype(arr.dtype)


def randomized_response_tf(bits: tf.Tensor, epsilon, seed) -> tf.Tensor:
  """TF version (pure TF ops): ``seed`` is a shape-[2] integer tensor for
  ``tf.random.stateless_uniform`` (draws differ from numpy's); ``epsilon`` a
  Python number (validated when the graph is built). Same shape and dtype as ``bits``.
  """
  p = keep_probability(epsilon)
  bits = tf.convert_to_tensor(bits)
  if p == 1.0:
    return tf.identity(bits)
  flip = tf.random.stateless_uniform(tf.shape(bits), seed=seed, dtype=tf.float64) >= p
  return tf.where(flip, tf.ones_like(bits) - bits, bits)


def debias_sum(observed_sum, count, epsilon):
  """Unbiased estimate of the true count of ones: ``(S - n (1 - p)) / (2p - 1)``.

  ``observed_sum`` (S) and ``count`` (n): arrays (broadcasting) of reported ones
  and of reports per element. Returns float64; not clipped (it may leave [0, n]).
  """
  p = keep_probability(epsilon)
  s = np.asarray(observed_sum, np.float64)
  n = np.asarray(count, np.float64)
  return (s - n * (1.0 - p)) / (2.0 * p - 1.0)


def debias_sum_tf(observed_sum, count, epsilon) -> tf.Tensor:
  """TF version of :func:`debias_sum` (float32 in, float32 out; ``epsilon`` a Python number)."""
  p = keep_probability(epsilon)
  s = tf.cast(observed_sum, tf.float32)
  n = tf.cast(count, tf.float32)
  return (s - n * (1.0 - p)) / (2.0 * p - 1.0)


def debiased_variance(count, epsilon):
  """Variance of :func:`debias_sum`'s estimate for ``count`` reports: ``n p (1-p) / (2p-1)^2``."""
  p = keep_probability(epsilon)
  return np.asarray(count, np.float64) * p * (1 - p) / (2 * p - 1) ** 2


@dataclasses.dataclass(frozen=True)
class PrivacySpent:
  """Epsilons (natural log units) of randomized response under basic composition."""
  per_element_per_round: float    # eps
  per_element_total: float        # rounds * eps
  per_report: float               # bits_per_round * eps (the whole mask as the datum)
  per_client_total: float         # rounds * bits_per_round * eps
  rounds: int
  bits_per_round: int


def privacy_spent(epsilon, bits_per_round: int, rounds: int) -> PrivacySpent:
  """Per-client accounting of eps-RR on ``bits_per_round`` bits per report over ``rounds`` reports.

  ``rounds`` counts the rounds the client actually uploaded in (not all
  rounds of training). Basic composition only (no advanced composition, no
  amplification by sampling); see the module docstring for what it covers.
  """
  eps = check_epsilon(epsilon)
  bits_per_round, rounds = int(bits_per_round), int(rounds)
  if bits_per_round < 0 or rounds < 0:
    raise ValueError(f"bits_per_round and rounds must be >= 0, got {bits_per_round}, {rounds}")
  def times(count, e):  # 0 * inf = 0: nothing released, nothing spent
    return count * e if count else 0.0
  return PrivacySpent(per_element_per_round=eps, per_element_total=times(rounds, eps),
                      per_report=times(bits_per_round, eps),
                      per_client_total=times(rounds * bits_per_round, eps),
                      rounds=rounds, bits_per_round=bits_per_round)
