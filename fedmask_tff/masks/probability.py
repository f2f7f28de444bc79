"""Masks as trained probabilities: the server's Beta-Bernoulli estimate and its downlink.

A client trains scores ``s`` whose ``sigmoid(s)`` is the probability that an element is on (the
``"sampled"`` mask mode of :mod:`fedmask_tff.masks.masking`) and uploads one sample
``b ~ Bernoulli(sigmoid(s))`` per element it keeps (1 bit). The server keeps, per element, a
Beta(alpha, beta) belief about the probability theta that the element is on:

* :func:`posterior`: after a round in which ``count`` clients sent bits summing to ``ones``,
  ``alpha' = a0 + decay * (alpha - a0) + ones`` and ``beta' = a0 + decay * (beta - a0) +
  (count - ones)`` (prior Beta(a0, a0)). ``decay = 0`` resets the prior every round (FedPM's
  default: theta is the posterior mean of this round's bits alone); ``0 < decay <= 1`` keeps
  that share of the earlier evidence. Elements that fewer than ``min_shared`` clients sent
  keep their belief unchanged (FedMask's rule: an element is averaged only where at least two
  devices keep it).
* :func:`theta`: the posterior mean ``alpha / (alpha + beta)``.
* :func:`start_scores`: the scores a client starts from, ``logit(clip(theta, eps, 1 - eps))``.
* :func:`quantize_theta` / :func:`dequantize_theta`: theta sent down in ``b`` bits per element,
  the uniform levels ``code / (2^b - 1)``, nearest rounding (half to even), 1 bit: the decision
  ``1[theta >= 0.5]``; ``b = 32`` sends float32. ``n`` values cost ``8 * ceil(n b / 8)`` bits. Packed little-endian like :mod:`fedmask_tff.wire.bitpack`.

Every function works on numpy arrays (the tests' hand-computed cases) and, where it says so, on
TF tensors (inside TFF computations) with the same results.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from fedmask_tff.wire import bitpack

DOWNLINK_BITS = (1, 2, 4, 8, 32)
DEFAULT_EPS = 0.01


def check_downlink_bits(bits) -> int:
  if isinstance(bits, bool) or bits not in DOWNLINK_BITS:
    raise ValueError(f"theta's downlink bits must be one of {DOWNLINK_BITS}, got {bits!r}")
  return int(bits)


def check_decay(decay) -> float:
  decay = float(decay)
  if not 0.0 <= decay <= 1.0 or math.isnan(decay):
    raise ValueError(f"evidence decay must be in [0, 1], got {decay}")
  return decay


def _lib(*values):
  return tf if any(isinstance(v, (tf.Tensor, tf.Variable)) for v in values) else np


def posterior(alpha, beta, ones, count, decay: float = 0.0, prior: float = 1.0,
              min_shared: int = 1):
  """``(alpha', beta')`` after a round (numpy or TF; see the module docstring).

  ``ones``: per element, the sum of the uploaded bits; ``count``: how many clients sent the
  element (float). Elements with ``count < min_shared`` keep ``(alpha, beta)``.
  """
  lib = _lib(alpha, beta, ones, count)
  new_alpha = prior + decay * (alpha - prior) + ones
  new_beta = prior + decay * (beta - prior) + (count - ones)
  shared = count >= min_shared
  return lib.where(shared, new_alpha, alpha), lib.where(shared, new_beta, beta)


def theta(alpha, beta):
  """The posterior mean ``alpha / (alpha + beta)``."""
  return alpha / (alpha + beta)


def start_scores(probability, eps: float = DEFAULT_EPS):
  """``logit(clip(probability, eps, 1 - eps))``: the scores whose sigmoid is ``probability``."""
  lib = _lib(probability)
  clip = (tf.clip_by_value if lib is tf else np.clip)(probability, eps, 1.0 - eps)
  return lib.math.log(clip) - lib.math.log(1.0 - clip) if lib is tf else np.log(clip) - np.log1p(-clip)


def quantize_theta(values, bits: int):
  """``values`` in [0, 1] (numpy, any shape) -> the downlink payload: uint8 packed codes of
  ``bits`` bits each (``ceil(n bits / 8)`` bytes), or float32 ``[n]`` for ``bits = 32``."""
  bits = check_downlink_bits(bits)
  if bits == 32:
    return np.asarray(values, np.float32).reshape(-1)
  code_bits = (theta_codes(values, bits)[:, None] >> np.arange(bits)) & 1
  return bitpack.pack_bits_np(code_bits.reshape(-1))


def theta_codes(values, bits: int) -> np.ndarray:
  """``values`` in [0, 1] (numpy, any shape) -> int64 ``[n]`` codes in ``[0, 2^bits - 1]``: the
  levels :func:`quantize_theta` packs (``bits`` in 1, 2, 4, 8; 1 is the decision
  ``1[theta >= 0.5]``, as the threshold reads it)."""
  bits = check_downlink_bits(bits)
  if bits == 32:
    raise ValueError("theta_codes: 32-bit theta goes down as float32, not as codes")
  v = np.asarray(values, np.float64).reshape(-1)
  if bits == 1:
    return (v >= 0.5).astype(np.int64)
  return np.rint(np.clip(v, 0.0, 1.0) * ((1 << bits) - 1)).astype(np.int64)


def dequantize_theta(payload, n: int, bits: int) -> np.ndarray:
  """Inverse of :func:`quantize_theta`: float32 ``[n]``."""
  bits = check_downlink_bits(bits)
  if bits == 32:
    return np.asarray(payload, np.float32).reshape(-1)[:n]
  code_bits = bitpack.unpack_bits_np(payload, (n * bits,), np.int64).reshape(n, bits)
  return (code_bits @ (1 << np.arange(bits))).astype(np.float32) / ((1 << bits) - 1)


def quantize_theta_tf(values: tf.Tensor, bits: int) -> tf.Tensor:
  """TF :func:`quantize_theta` (the same bytes)."""
  bits = check_downlink_bits(bits)
  v = tf.reshape(tf.cast(values, tf.float32), [-1])
  if bits == 32:
    return v
  codes = tf.cast(tf.round(tf.clip_by_value(v, 0.0, 1.0) * ((1 << bits) - 1)), tf.int32)
  if bits == 1:
    codes = tf.cast(v >= 0.5, tf.int32)
  code_bits = tf.bitwise.bitwise_and(tf.bitwise.right_shift(codes[:, None], tf.range(bits)), 1)
  return bitpack.pack_bits_tf(tf.reshape(code_bits, [-1]))


def dequantize_theta_tf(payload: tf.Tensor, n: int, bits: int) -> tf.Tensor:
  """TF :func:`dequantize_theta`: float32 ``[n]``."""
  bits = check_downlink_bits(bits)
  if bits == 32:
    return tf.reshape(payload, [-1])[:n]
  code_bits = tf.cast(tf.reshape(bitpack.unpack_bits_tf(payload, n * bits), [-1, bits]), tf.int32)
  codes = tf.reduce_sum(code_bits * tf.constant([1 << i for i in range(bits)], tf.int32), axis=1)
  return tf.cast(codes, tf.float32) / float((1 << bits) - 1)
