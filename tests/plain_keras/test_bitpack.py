"""Tests of mask bit-packing (fedmask_tff.wire.bitpack): numpy and TF give the same bytes."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from fedmask_tff.wire import bitpack

SHAPES = [(1,), (7,), (8,), (9,), (1000,), (3, 5, 7), (2, 8), (4, 3, 2, 2)]


def random_bits(shape, seed=0, p=0.5):
  return (np.random.default_rng(seed).random(shape) < p).astype(np.float32)


# ------------------------------------------------------------- hand cases ---

def test_hand_case_little_endian():
  bits = np.array([1, 0, 1, 1, 0, 0, 0, 0, 1])
  packed = bitpack.pack_bits_np(bits)
  assert packed.dtype == np.uint8
  np.testing.assert_array_equal(packed, [13, 1])
  np.testing.assert_array_equal(bitpack.pack_bits_tf(tf.constant(bits)).numpy(), [13, 1])
  np.testing.assert_array_equal(bitpack.unpack_bits_np(np.array([13, 1], np.uint8), (9,)), bits)
  np.testing.assert_array_equal(bitpack.unpack_bits_tf(tf.constant([13, 1], tf.uint8), 9).numpy(),
                                bits)


@pytest.mark.parametrize("bits,expected", [
    ([0, 0, 0, 0, 0, 0, 0, 1], [128]),
    ([1, 1, 1, 1, 1, 1, 1, 1], [255]),
    ([0, 1], [2]),
    ([1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1], [255, 0, 2]),
])
def test_more_hand_cases(bits, expected):
  np.testing.assert_array_equal(bitpack.pack_bits_np(np.array(bits)), expected)
  np.testing.assert_array_equal(bitpack.pack_bits_tf(tf.constant(bits, tf.float32)).numpy(), expected)


def test_row_major_flattening():
  # Shape (2, 5): flattened row-major, so element [1, 0] is bit 5 of byte 0.
  bits = np.zeros((2, 5))
  bits[1, 0] = 1
  bits[1, 4] = 1  # flat index 9: bit 1 of byte 1
  np.testing.assert_array_equal(bitpack.pack_bits_np(bits), [32, 2])
  np.testing.assert_array_equal(bitpack.pack_bits_tf(tf.constant(bits)).numpy(), [32, 2])


@pytest.mark.parametrize("n,expected", [(0, 0), (1, 1), (7, 1), (8, 1), (9, 2), (16, 2),
                                        (17, 3), (1000, 125), (1001, 126)])
def test_packed_size_bytes(n, expected):
  assert bitpack.packed_size_bytes(n) == expected


# ------------------------------------------------------- np / tf agreement ---

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_np_and_tf_identical_bytes(shape, seed):
  bits = random_bits(shape, seed)
  packed_np = bitpack.pack_bits_np(bits)
  packed_tf = bitpack.pack_bits_tf(tf.constant(bits)).numpy()
  n = int(np.prod(shape))
  assert packed_np.shape == packed_tf.shape == (bitpack.packed_size_bytes(n),)
  assert packed_tf.dtype == np.uint8
  np.testing.assert_array_equal(packed_np, packed_tf)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32, np.uint8, bool])
def test_input_dtypes(dtype):
  bits = random_bits((3, 5, 7), 4)
  expected = bitpack.pack_bits_np(bits)
  np.testing.assert_array_equal(bitpack.pack_bits_np(bits.astype(dtype)), expected)
  np.testing.assert_array_equal(bitpack.pack_bits_tf(tf.constant(bits.astype(dtype))).numpy(),
                                expected)


@pytest.mark.parametrize("p", [0.0, 1.0])
@pytest.mark.parametrize("n", [1, 9, 64])
def test_all_zeros_all_ones(p, n):
  bits = np.full((n,), p, np.float32)
  packed = bitpack.pack_bits_np(bits)
  np.testing.assert_array_equal(packed, bitpack.pack_bits_tf(tf.constant(bits)).numpy())
  # Padding bits are zero: the last byte holds only n % 8 ones.
  assert int(np.unpackbits(packed).sum()) == int(p) * n


# ------------------------------------------------------------- round trips ---

@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip_np(shape):
  bits = random_bits(shape, 2)
  out = bitpack.unpack_bits_np(bitpack.pack_bits_np(bits), shape)
  assert out.shape == shape and out.dtype == np.float32
  np.testing.assert_array_equal(out, bits)
  assert bitpack.unpack_bits_np(bitpack.pack_bits_np(bits), shape, dtype=np.int32).dtype == np.int32


@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip_tf(shape):
  bits = random_bits(shape, 3)
  n = int(np.prod(shape))
  out = bitpack.unpack_bits_tf(bitpack.pack_bits_tf(tf.constant(bits)), n)
  assert out.dtype == tf.float32 and out.shape == (n,)
  np.testing.assert_array_equal(out.numpy().reshape(shape), bits)


@pytest.mark.parametrize("shape", SHAPES)
def test_cross_round_trips(shape):
  bits = random_bits(shape, 5)
  n = int(np.prod(shape))
  np.testing.assert_array_equal(
      bitpack.unpack_bits_np(bitpack.pack_bits_tf(tf.constant(bits)).numpy(), shape), bits)
  np.testing.assert_array_equal(
      bitpack.unpack_bits_tf(tf.constant(bitpack.pack_bits_np(bits)), n).numpy().reshape(shape), bits)


def test_tf_in_tf_function_with_unknown_size():
  @tf.function(input_signature=[tf.TensorSpec([None], tf.float32)])
  def pack(x):
    return bitpack.pack_bits_tf(x)

  for n in (1, 7, 8, 9, 1000):
    bits = random_bits((n,), n)
    np.testing.assert_array_equal(pack(tf.constant(bits)).numpy(), bitpack.pack_bits_np(bits))


def test_empty_mask():
  assert bitpack.pack_bits_np(np.zeros((0,))).size == 0
  assert bitpack.pack_bits_tf(tf.zeros([0])).numpy().size == 0
  assert bitpack.unpack_bits_np(np.zeros((0,), np.uint8), (0,)).shape == (0,)


# ----------------------------------------------------------------- errors ---

@pytest.mark.parametrize("num_bytes", [0, 1, 3])
def test_unpack_wrong_number_of_bytes(num_bytes):
  # 9 elements need exactly 2 bytes.
  with pytest.raises(ValueError, match="need 2 bytes"):
    bitpack.unpack_bits_np(np.zeros(num_bytes, np.uint8), (9,))
  with pytest.raises(ValueError):
    bitpack.unpack_bits_np(np.zeros(num_bytes, np.uint8), (3, 3))


@pytest.mark.parametrize("bad", [2, -1, 0.5, np.nan])
def test_pack_non_binary_raises(bad):
  bits = np.array([0, 1, 1, 0, 1], np.float64)
  bits[3] = bad
  with pytest.raises(ValueError, match="0/1"):
    bitpack.pack_bits_np(bits)
