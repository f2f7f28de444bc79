"""Downlink quantization of FedMask's per-element averages to ``b`` bits each.

Each value is either an average of mask bits in ``[0, 1]`` or the sentinel
``-1`` ("keep yours"). With ``b`` bits (``2 <= b <= 16``) there are ``2^b``
codes:

* codes ``0 .. K`` with ``K = 2^b - 2`` are the uniform levels ``code / K``,
  i.e. spacing ``1 / (2^b - 2)``; both 0 and 1 are levels, so exact 0 and 1
  (and, for even ``K``, 0.5) survive, and deterministic rounding (round half to
  even, ``np.rint`` / ``tf.round``) errs by at most ``1 / (2 (2^b - 2))``;
* code ``2^b - 1`` (all ones) is the sentinel -1.

``b = 1`` is refused: its two codes would leave one level for the whole of
``[0, 1]`` besides the sentinel (``K = 0``), i.e. no information about the value.
``b = 2`` gives the levels {0, 0.5, 1} plus the sentinel.

Stochastic rounding picks ``floor(v K)`` or ``floor(v K) + 1`` with probability
``frac(v K)`` for the upper one, so ``E[dequantize] = v`` exactly (unbiased);
numpy draws from ``np.random.default_rng(seed)``, TF from
``tf.random.stateless_uniform`` with a shape-[2] integer seed (the two draw
different numbers: only deterministic rounding is bit-identical across them).

Packing: element ``i``'s code bit ``k`` (least significant first) is global bit
``i * b + k``, stored as bit ``p % 8`` of byte ``p // 8`` (the little-endian
order of :mod:`fedmask_tff.wire.bitpack`, padded with zeros): ``n`` values take
``ceil(n b / 8)`` bytes; the message costs ``8 * packed.size`` bits.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from fedmask_tff.wire import bitpack

SENTINEL = -1.0
MIN_BITS, MAX_BITS = 2, 16


def check_bits(bits) -> int:
  if isinstance(bits, bool) or int(bits) != bits or not MIN_BITS <= int(bits) <= MAX_BITS:
    raise ValueError(f"bits must be an integer in [{MIN_BITS}, {MAX_BITS}], got {bits!r} "
                     "(b = 1 leaves no level besides the sentinel's)")
  return int(bits)


def num_levels(bits: int) -> int:
  """``K + 1 = 2^b - 1`` value levels; the spacing is ``1 / K``."""
  return (1 << check_bits(bits)) - 1


def max_error(bits: int) -> float:
  """Largest deterministic round-trip error: half the spacing, ``1 / (2 (2^b - 2))``."""
  return 0.5 / ((1 << check_bits(bits)) - 2)


def packed_size_bytes(n: int, bits: int) -> int:
  return (int(n) * check_bits(bits) + 7) // 8


def quantize(values, bits: int, stochastic: bool = False, seed=None):
  """Quantizes averages in ``[0, 1]`` (or -1) to ``bits``-bit codes and packs them.

  Args:
    values: float array, any shape (flattened row-major): values in ``[0, 1]``
      or exactly -1 (the sentinel).
    bits: code width ``b`` in ``[2, 16]``.
    stochastic: unbiased stochastic rounding instead of round-to-nearest.
    seed: seed of ``np.random.default_rng`` (stochastic rounding only).

  Returns:
    ``(packed, n)``: uint8 ``[ceil(n b / 8)]`` and the number of values ``n``.
  """
  b = check_bits(bits)
  v = np.asarray(values, dtype=np.float64).reshape(-1)
  sentinel = v == SENTINEL
  if not np.all(sentinel | ((v >= 0) & (v <= 1))):  # NaN fails both
    bad = v[~(sentinel | ((v >= 0) & (v <= 1)))][:3]
    raise ValueError(f"values must lie in [0, 1] or be -1, found e.g. {bad.tolist()}")
  k = (1 << b) - 2
  scaled = np.where(sentinel, 0.0, v) * k  # exact: a float32/64 times an integer < 2^16
  if stochastic:
    low = np.floor(scaled)
    u = np.random.default_rng(seed).random(v.size)
    codes = low + (u < scaled - low)
  else:
    codes = np.rint(scaled)
  codes = np.where(sentinel, k + 1, codes).astype(np.int64)
  code_bits = (codes[:, None] >> np.arange(b)) & 1
  return np.packbits(code_bits.reshape(-1).astype(np.uint8), bitorder="little"), int(v.size)


def dequantize(packed, n: int, bits: int) -> np.ndarray:
  """Inverse of :func:`quantize`: float32 ``[n]``, levels ``code / (2^b - 2)``, -1 restored."""
  b = check_bits(bits)
  packed = np.asarray(packed, dtype=np.uint8).reshape(-1)
  n = int(n)
  if packed.size != packed_size_bytes(n, b):
    raise ValueError(f"{packed.size} bytes cannot hold {n} values of {b} bits "
                     f"(need {packed_size_bytes(n, b)})")
  code_bits = np.unpackbits(packed, count=n * b, bitorder="little").reshape(n, b)
  codes = code_bits.astype(np.int64) @ (1 << np.arange(b, dtype=np.int64))
  k = (1 << b) - 2
  return np.where(codes > k, SENTINEL, codes / k).astype(np.float32)


def quantize_tf(values: tf.Tensor, bits: int, stochastic: bool = False, seed=None):
  """TF version of :func:`quantize` (pure TF ops, usable in a TFF computation).

  ``values``: float tensor, any shape; negative values are taken as the sentinel
  and the rest is clipped to ``[0, 1]`` (no Python-side validation in a graph).
  ``bits``: a Python int in [2, 16]. ``seed``: shape-[2] int32/int64 tensor for
  ``tf.random.stateless_uniform`` (required when ``stochastic``).
  Returns ``(packed uint8 [ceil(n b / 8)], n int32 scalar)``; deterministic codes
  equal :func:`quantize`'s bit for bit.
  """
  b = check_bits(bits)
  k = (1 << b) - 2
  v = tf.reshape(tf.cast(values, tf.float64), [-1])
  sentinel = v < 0
  scaled = tf.clip_by_value(tf.where(sentinel, tf.zeros_like(v), v), 0.0, 1.0) * k
  if stochastic:
    if seed is None:
      raise ValueError("stochastic rounding in TF needs a shape-[2] integer seed")
    low = tf.floor(scaled)
    u = tf.random.stateless_uniform(tf.shape(v), seed=seed, dtype=tf.float64)
    codes = low + tf.cast(u < scaled - low, tf.float64)
  else:
    codes = tf.round(scaled)  # half to even, like np.rint
  codes = tf.where(sentinel, tf.cast(k + 1, tf.int32), tf.cast(codes, tf.int32))
  code_bits = tf.bitwise.bitwise_and(tf.bitwise.right_shift(codes[:, None], tf.range(b)), 1)
  return bitpack.pack_bits_tf(tf.reshape(code_bits, [-1])), tf.size(v)


def dequantize_tf(packed: tf.Tensor, n, bits: int) -> tf.Tensor:
  """TF inverse of :func:`quantize_tf`: float32 ``[n]`` (``packed`` must hold ``ceil(n b / 8)`` bytes)."""
  b = check_bits(bits)
  k = (1 << b) - 2
  code_bits = tf.cast(tf.reshape(bitpack.unpack_bits_tf(packed, n * b), [-1, b]), tf.int32)
  codes = tf.reduce_sum(code_bits * tf.constant([1 << i for i in range(b)], tf.int32), axis=1)
  return tf.where(codes > k, tf.constant(SENTINEL, tf.float32),
                  tf.cast(tf.cast(codes, tf.float64) / k, tf.float32))
