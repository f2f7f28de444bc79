"""Tests of downlink quantization (fedmask_tff.wire.quantization): error bounds, sentinel, packing, TF == numpy."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from fedmask_tff.wire import quantization as q

ALL_BITS = list(range(2, 17))


def sample_values(n, seed=0, sentinel_rate=0.2):
  rng = np.random.default_rng(seed)
  v = rng.random(n)
  v[rng.random(n) < sentinel_rate] = -1.0
  v[:3] = [0.0, 1.0, 0.5][:min(3, n)] if n >= 3 else v[:n]
  return v.astype(np.float32)


@pytest.mark.parametrize("bits", ALL_BITS)
def test_deterministic_roundtrip_error_and_sentinel(bits):
  v = sample_values(3001, seed=bits)
  packed, n = q.quantize(v, bits)
  assert n == v.size
  assert packed.dtype == np.uint8 and packed.size == (n * bits + 7) // 8
  out = q.dequantize(packed, n, bits)
  assert out.dtype == np.float32 and out.shape == (n,)
  sentinel = v == -1
  np.testing.assert_array_equal(out[sentinel], -1.0)
  assert np.all((out[~sentinel] >= 0) & (out[~sentinel] <= 1))
  err = np.abs(out[~sentinel].astype(np.float64) - v[~sentinel])
  bound = 1 / (2 * (2 ** bits - 2))
  assert q.max_error(bits) == pytest.approx(bound)
  assert err.max() <= bound + 1e-7  # + float32 rounding of the output
  # 0 and 1 are levels: exact.
  assert out[0] == 0.0 and out[1] == 1.0


def test_levels_b2():
  # b = 2: levels {0, 0.5, 1} and the sentinel (code 3).
  v = np.array([0.0, 0.2, 0.26, 0.5, 0.74, 0.8, 1.0, -1.0])
  packed, n = q.quantize(v, 2)
  np.testing.assert_array_equal(q.dequantize(packed, n, 2), [0, 0, 0.5, 0.5, 0.5, 1, 1, -1])
  # Codes 0,0,1,1,1,2,2,3 packed 2 bits each, LSB first: 0b01_01_00_00, 0b11_10_10_01.
  np.testing.assert_array_equal(packed, [0b01010000, 0b11101001])
  assert q.num_levels(2) == 3


@pytest.mark.parametrize("bits", [1, 0, 17, 2.5, True])
def test_bad_bits_raise(bits):
  with pytest.raises(ValueError):
    q.quantize(np.zeros(3), bits)


@pytest.mark.parametrize("bad", [np.nan, 1.5, -0.5, -2.0, np.inf])
def test_bad_values_raise(bad):
  with pytest.raises(ValueError):
    q.quantize(np.array([0.2, bad]), 4)


@pytest.mark.parametrize("n,bits", [(0, 4), (1, 2), (1, 16), (3, 3), (7, 5), (8, 7), (9, 9), (1000, 13)])
def test_packing_sizes_exact(n, bits):
  packed, m = q.quantize(np.linspace(0, 1, n), bits)
  assert m == n and packed.size == q.packed_size_bytes(n, bits) == (n * bits + 7) // 8
  assert q.dequantize(packed, n, bits).shape == (n,)
  with pytest.raises(ValueError):
    q.dequantize(np.concatenate([packed, [0]]).astype(np.uint8), n, bits)


@pytest.mark.parametrize("bits", [2, 3, 8])
def test_stochastic_unbiased(bits):
  v = np.array([0.0, 0.1, 0.33, 0.5, 0.77, 0.999, 1.0, -1.0])
  draws = np.stack([q.dequantize(*q.quantize(v, bits, stochastic=True, seed=s), bits)
                    for s in range(4000)])
  np.testing.assert_array_equal(draws[:, -1], -1.0)
  spacing = 1 / (2 ** bits - 2)
  # Each draw is one of the two neighbouring levels; the mean's std is <= spacing / (2 sqrt(4000)).
  assert np.all(np.abs(draws[:, :-1] - v[:-1]) <= spacing + 1e-6)
  np.testing.assert_allclose(draws[:, :-1].mean(0), v[:-1], atol=5 * spacing / (2 * np.sqrt(4000)))
  # Seeded: reproducible.
  a = q.quantize(v, bits, stochastic=True, seed=3)[0]
  np.testing.assert_array_equal(a, q.quantize(v, bits, stochastic=True, seed=3)[0])


@pytest.mark.parametrize("bits", [2, 3, 5, 8, 11, 16])
@pytest.mark.parametrize("n", [1, 9, 1000])
def test_tf_matches_numpy(bits, n):
  v = sample_values(n, seed=n + bits)
  # Exact ties: round half to even in both.
  v[: min(n, 2)] = 0.5 / (2 ** bits - 2) * np.array([1, 3])[: min(n, 2)]
  packed_np, _ = q.quantize(v, bits)
  packed_tf, n_tf = q.quantize_tf(tf.constant(v), bits)
  assert int(n_tf) == n
  np.testing.assert_array_equal(packed_tf.numpy(), packed_np)
  np.testing.assert_array_equal(q.dequantize_tf(packed_tf, n, bits).numpy(),
                                q.dequantize(packed_np, n, bits))


def test_tf_in_tf_function_and_stochastic():
  v = sample_values(5000, seed=1)

  @tf.function
  def roundtrip(x, seed):
    packed, n = q.quantize_tf(x, 4, stochastic=True, seed=seed)
    return q.dequantize_tf(packed, 5000, 4), tf.size(packed) * 8

  out, nbits = roundtrip(tf.constant(v), tf.constant([1, 2]))
  assert int(nbits) == 8 * ((5000 * 4 + 7) // 8)
  out = out.numpy()
  np.testing.assert_array_equal(out[v == -1], -1.0)
  assert np.all(np.abs(out[v != -1] - v[v != -1]) <= 1 / 14 + 1e-6)
  # Unbiased on average over elements.
  assert abs(float(np.mean(out[v != -1] - v[v != -1]))) < 0.005
  with pytest.raises(ValueError):
    q.quantize_tf(tf.constant(v), 4, stochastic=True)
