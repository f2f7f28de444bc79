"""Tests of the uplink mask coder (fedmask_tff.wire.coding): exact, compact, fast, self-checking."""

from __future__ import annotations

import time

import numpy as np
import pytest
import tensorflow as tf

from fedmask_tff.wire import coding


def pair(n, flip_rate, seed=0, ref_density=0.3):
  rng = np.random.default_rng(seed)
  ref = (rng.random(n) < ref_density).astype(np.uint8)
  bits = ref ^ (rng.random(n) < flip_rate).astype(np.uint8)
  return bits, ref


def roundtrip(bits, ref, **kw):
  data = coding.encode_mask(bits, ref, **kw)
  assert isinstance(data, bytes)
  out = coding.decode_mask(data, ref, len(ref))
  assert out.dtype == np.uint8 and out.shape == (len(ref),)
  np.testing.assert_array_equal(out, bits)
  return data


@pytest.mark.parametrize("flip_rate", [0.0, 0.01, 0.1, 0.5])
@pytest.mark.parametrize("n", [1, 7, 8, 9, 100, 5000, 40000])
def test_roundtrip_random(flip_rate, n):
  bits, ref = pair(n, flip_rate, seed=n)
  roundtrip(bits, ref)


@pytest.mark.parametrize("lane_len", [1, 3, 16, 1000])
def test_encode_masks_writes_the_bytes_encode_mask_writes_one_by_one(lane_len):
  # Several masks coded in one pass, side by side: sizes below, at and above a lane, empty,
  # all-agreeing (raw beats nothing), incompressible (raw stored), each decodable alone.
  sizes_rates = [(0, 0.1), (1, 0.5), (17, 0.0), (999, 0.02), (1000, 0.3), (4097, 0.5),
                 (5000, 0.01), (33, 0.2)]
  pairs = [pair(n, rate, seed=i) for i, (n, rate) in enumerate(sizes_rates)]
  together = coding.encode_masks(pairs, lane_len)
  assert together == [coding.encode_mask(b, r, lane_len) for b, r in pairs]
  for (bits, ref), data in zip(pairs, together):
    np.testing.assert_array_equal(coding.decode_mask(data, ref, len(ref)), bits)
  assert coding.encode_masks([], lane_len) == []


def test_encode_masks_names_the_bad_pair():
  with pytest.raises(ValueError, match="pair 1: bits \\(2\\) and reference \\(3\\)"):
    coding.encode_masks([pair(5, 0.1), (np.array([0, 1]), np.array([0, 0, 1]))])
  with pytest.raises(ValueError, match="bits\\[0\\] must contain only 0 and 1"):
    coding.encode_masks([(np.array([0, 2]), np.array([0, 0]))])
  with pytest.raises(ValueError, match="lane_len"):
    coding.encode_masks([pair(5, 0.1)], lane_len=0)


@pytest.mark.parametrize("lane_len", [1, 3, 16, 17, 1000])
@pytest.mark.parametrize("n", [1, 17, 33, 999, 4097])
def test_roundtrip_lane_layouts(lane_len, n):
  # Many lanes, a short last lane, lanes shorter than an update block, ...
  bits, ref = pair(n, 0.2, seed=lane_len + n)
  roundtrip(bits, ref, lane_len=lane_len)


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1000])
@pytest.mark.parametrize("value", [0, 1])
def test_constant_masks(n, value):
  bits = np.full(n, value, np.uint8)
  for ref in (np.zeros(n, np.uint8), np.ones(n, np.uint8), bits):
    roundtrip(bits, ref)


def test_empty_mask():
  data = roundtrip(np.zeros(0, np.uint8), np.zeros(0, np.uint8))
  assert len(data) == 9  # mode + n + CRC
  assert coding.empirical_entropy_bits(np.zeros(0), np.zeros(0)) == 0.0


def test_accepts_float_and_bool_and_shapes():
  rng = np.random.default_rng(3)
  bits = (rng.random((4, 5, 6)) < 0.5).astype(np.float32)
  ref = rng.random((4, 5, 6)) < 0.5
  data = coding.encode_mask(bits, ref)
  np.testing.assert_array_equal(coding.decode_mask(data, ref.reshape(-1), 120), bits.reshape(-1))


def test_structured_flips_use_context():
  # Flips in bursts: the previous-flip context makes them cheaper than i.i.d. flips.
  n = 100_000
  ref = np.zeros(n, np.uint8)
  bits = np.zeros(n, np.uint8)
  for start in range(0, n, 1000):
    bits[start:start + 50] = 1
  data = roundtrip(bits, ref)
  h0 = coding.empirical_entropy_bits(bits, ref, conditional=False)
  assert 8 * len(data) < 0.2 * h0


@pytest.mark.parametrize("flip_rate", [0.01, 0.1])
def test_length_close_to_entropy(flip_rate):
  n = 1_000_000
  bits, ref = pair(n, flip_rate, seed=7)
  size = 8 * len(coding.encode_mask(bits, ref))
  entropy = coding.empirical_entropy_bits(bits, ref)
  lanes = -(-n // coding.DEFAULT_LANE_LEN)
  # Entropy + 32 bits per lane + header/CRC + learning cost, and within a few percent.
  assert size <= entropy * 1.005 + 32 * lanes + 300
  assert size <= entropy * 1.03 + 300


def test_small_input_overhead_is_a_small_constant():
  bits, ref = pair(5000, 0.01, seed=1)
  size = 8 * len(coding.encode_mask(bits, ref))
  assert size <= coding.empirical_entropy_bits(bits, ref) * 1.05 + 200


def test_incompressible_falls_back_to_raw():
  n = 100_000
  bits, ref = pair(n, 0.5, seed=2)
  data = roundtrip(bits, ref)
  assert data[0] == coding.MODE_RAW
  assert len(data) == 9 + (n + 7) // 8


def test_speed_one_million_bits():
  n = 1_000_000
  bits, ref = pair(n, 0.05, seed=4)
  t0 = time.process_time()
  data = coding.encode_mask(bits, ref)
  t1 = time.process_time()
  out = coding.decode_mask(data, ref, n)
  t2 = time.process_time()
  np.testing.assert_array_equal(out, bits)
  # ~0.2 s each way on one core; CPU time, with slack for a loaded machine.
  assert t1 - t0 < 1.0, f"encode took {t1 - t0:.2f} s CPU"
  assert t2 - t1 < 1.0, f"decode took {t2 - t1:.2f} s CPU"


# ------------------------------------------------------------ errors ---

@pytest.fixture(scope="module")
def stream():
  bits, ref = pair(20_000, 0.05, seed=5)
  return coding.encode_mask(bits, ref, lane_len=512), bits, ref


def test_truncated_stream_raises(stream):
  data, _, ref = stream
  for cut in (0, 3, 8, 12, len(data) // 2, len(data) - 1, len(data) - 4):
    with pytest.raises(coding.CodingError):
      coding.decode_mask(data[:cut], ref, ref.size)


def test_corrupt_bytes_raise(stream):
  data, _, ref = stream
  rng = np.random.default_rng(0)
  for pos in [0, 1, 5, 9, 13, 20, len(data) // 2, len(data) - 5, len(data) - 1] + \
      rng.integers(0, len(data), 20).tolist():
    bad = bytearray(data)
    bad[pos] ^= 1 << int(rng.integers(8))
    with pytest.raises(coding.CodingError):
      coding.decode_mask(bytes(bad), ref, ref.size)


def test_wrong_reference_or_length_raises(stream):
  data, _, ref = stream
  other = ref.copy()
  other[123] ^= 1
  with pytest.raises(coding.CodingError):
    coding.decode_mask(data, other, ref.size)
  with pytest.raises(coding.CodingError):
    coding.decode_mask(data, ref[:-1], ref.size - 1)
  with pytest.raises(ValueError):
    coding.decode_mask(data, ref, ref.size + 1)


def test_corrupt_raw_stream_raises():
  bits, ref = pair(1000, 0.5, seed=6)
  data = coding.encode_mask(bits, ref)
  assert data[0] == coding.MODE_RAW
  bad = bytearray(data)
  bad[50] ^= 4
  with pytest.raises(coding.CodingError):
    coding.decode_mask(bytes(bad), ref, 1000)


def test_bad_inputs_raise():
  with pytest.raises(ValueError):
    coding.encode_mask(np.array([0, 2]), np.array([0, 0]))
  with pytest.raises(ValueError):
    coding.encode_mask(np.array([0, 1]), np.array([0, 0, 1]))
  with pytest.raises(ValueError):
    coding.encode_mask(np.array([0, 1]), np.array([0, 0]), lane_len=0)


def test_empirical_entropy():
  bits = np.array([1, 0, 1, 0], np.uint8)
  ref = np.zeros(4, np.uint8)
  assert coding.empirical_entropy_bits(bits, ref, conditional=False) == pytest.approx(4.0)
  # Conditioned on the previous flip the alternation is deterministic.
  assert coding.empirical_entropy_bits(bits, ref) == pytest.approx(0.0)
  assert coding.empirical_entropy_bits(bits, bits) == 0.0


# ---------------------------------------------------------------- TF ---

def test_tf_wrappers_eager_and_tf_function():
  bits, ref = pair(3000, 0.1, seed=8)

  @tf.function
  def both(b, r):
    data = coding.encode_mask_tf(b, r)
    return data, coding.decode_mask_tf(data, r, 3000)

  data, out = both(tf.constant(bits), tf.constant(ref))
  assert data.dtype == tf.uint8
  assert bytes(data.numpy()) == coding.encode_mask(bits, ref)
  np.testing.assert_array_equal(out.numpy(), bits)
  assert coding.coded_bits(bits, ref) == 8 * int(tf.size(data))
