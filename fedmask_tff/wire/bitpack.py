"""Packing 0/1 masks 8 elements per byte, in numpy and in TensorFlow.

Bit order is little-endian within a byte: element ``8*j + b`` is bit ``b`` of
byte ``j``; the last byte is padded with zeros. Both implementations produce
identical bytes (tested), so a payload packed in a TFF computation can be read
with numpy and vice versa.

Sizes: ``n`` elements pack into ``ceil(n / 8)`` bytes = ``8 * ceil(n / 8)`` bits.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

_WEIGHTS = np.array([1, 2, 4, 8, 16, 32, 64, 128], dtype=np.int32)


def packed_size_bytes(num_elements: int) -> int:
  return (int(num_elements) + 7) // 8


def pack_bits_np(bits) -> np.ndarray:
  """Flattens a 0/1 array (any shape, any numeric or bool dtype) into uint8 bytes."""
  bits = np.asarray(bits)
  flat = bits.reshape(-1)
  if flat.size and not np.all((flat == 0) | (flat == 1)):
    bad = flat[(flat != 0) & (flat != 1)][:3]
    raise ValueError(f"pack_bits_np expects 0/1 values, found e.g. {bad.tolist()}")
  return np.packbits(flat.astype(np.uint8), bitorder="little")


def unpack_bits_np(packed, shape, dtype=np.float32) -> np.ndarray:
  """Inverse of :func:`pack_bits_np`: bytes -> 0/1 array of ``shape``."""
  packed = np.asarray(packed, dtype=np.uint8).reshape(-1)
  n = int(np.prod(shape)) if len(shape) else 1
  if packed.size != packed_size_bytes(n):
    raise ValueError(f"{packed.size} packed bytes cannot hold a mask of shape {tuple(shape)} "
                     f"({n} elements need {packed_size_bytes(n)} bytes)")
  bits = np.unpackbits(packed, count=n, bitorder="little")
  return bits.reshape(shape).astype(dtype)


def pack_bits_tf(bits: tf.Tensor) -> tf.Tensor:
  """TF version of :func:`pack_bits_np` (values are assumed 0/1): returns uint8 ``[ceil(n/8)]``."""
  flat = tf.reshape(tf.cast(bits, tf.int32), [-1])
  n = tf.size(flat)
  pad = (8 - n % 8) % 8
  flat = tf.concat([flat, tf.zeros([pad], tf.int32)], axis=0)
  groups = tf.reshape(flat, [-1, 8])
  return tf.cast(tf.reduce_sum(groups * _WEIGHTS, axis=1), tf.uint8)


def unpack_bits_tf(packed: tf.Tensor, num_elements) -> tf.Tensor:
  """TF inverse of :func:`pack_bits_tf`: uint8 bytes -> float32 0/1 ``[num_elements]``."""
  as_int = tf.cast(tf.reshape(packed, [-1, 1]), tf.int32)
  bits = tf.bitwise.bitwise_and(tf.bitwise.right_shift(as_int, tf.range(8, dtype=tf.int32)), 1)
  return tf.cast(tf.reshape(bits, [-1])[:num_elements], tf.float32)
