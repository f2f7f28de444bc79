"""The coded downlink of sampled masks (``--downlink_coding``): bit planes by hand, exact decode,
the bits per client against the packed payload, and the flag's rules (a coded round against an
uncoded one: ``test_sampled_upload_coding.py``)."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from fedmask_tff.algorithms.sampled_masks import algorithm as sampled
from fedmask_tff.algorithms.sampled_masks import downlink_coding
from fedmask_tff.algorithms.sampled_masks.config import SampledMaskConfig, WeightPlan
from fedmask_tff.masks import probability
from fedmask_tff.wire import bitpack, coding
from helpers import sampled_mlp_context

CONTEXT = sampled_mlp_context(width=1.0)


def test_bit_planes_by_hand_and_back():
  codes = np.array([0, 1, 2, 3, 3, 0])
  (hi, hi_ref), (lo, lo_ref) = downlink_coding.bit_planes(codes, 2)
  np.testing.assert_array_equal(hi, [0, 0, 1, 1, 1, 0])
  np.testing.assert_array_equal(hi_ref, [0, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(lo, [0, 1, 0, 1, 1, 0])
  np.testing.assert_array_equal(lo_ref, hi)  # the low plane is coded given the decision
  np.testing.assert_array_equal(downlink_coding.codes_from_planes([hi, lo], 2), codes)
  # theta's 2-bit levels: rint(3 theta); the top plane is the decision 1[theta >= 0.5]
  theta = np.array([0.0, 0.2, 0.49, 0.51, 0.9, 1.0])
  np.testing.assert_array_equal(probability.theta_codes(theta, 2), [0, 1, 1, 2, 3, 3])
  np.testing.assert_array_equal(probability.theta_codes(theta, 1), [0, 0, 0, 1, 1, 1])
  with pytest.raises(ValueError, match="float32"):
    probability.theta_codes(theta, 32)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_planes_decode_exactly(bits):
  rng = np.random.default_rng(bits)
  theta = np.where(rng.random(5000) < 0.8, rng.choice([0.02, 0.98], 5000), rng.random(5000))
  codes = probability.theta_codes(theta, bits)
  pairs = downlink_coding.bit_planes(codes, bits)
  streams = coding.encode_masks(pairs, downlink_coding.LANE_LEN)
  np.testing.assert_array_equal(downlink_coding.decode_planes(streams, codes.size, bits), codes)
  # the coded codes rebuild exactly what quantize_theta packs
  packed = probability.quantize_theta(theta, bits)
  np.testing.assert_array_equal(
      probability.dequantize_theta(packed, theta.size, bits),
      probability.dequantize_theta(probability.quantize_theta(
          downlink_coding.codes_from_planes([p for p, _ in pairs], bits) / ((1 << bits) - 1), bits),
          theta.size, bits))


def test_downlink_bits_per_client_shared_once_pruned_at_each_clients_kept_positions():
  shared = WeightPlan("w0", (4000,), 4000, prunable=False, personal=False)
  pruned = WeightPlan("w1", (800,), 800, prunable=True, personal=True)
  rng = np.random.default_rng(0)
  theta = [np.where(rng.random(4000) < 0.5, 0.01, 0.99).astype(np.float32),  # confident
           rng.random(800).astype(np.float32)]
  keep_a = np.zeros(800, np.uint8)
  keep_a[:400] = 1
  keeps = [(bitpack.pack_bits_np(np.ones(4000, np.uint8)), bitpack.pack_bits_np(keep_a)),
           (bitpack.pack_bits_np(np.ones(4000, np.uint8)), bitpack.pack_bits_np(np.ones(800, np.uint8)))]
  own = SampledMaskConfig(downlink_bits=2, head_start="own")
  by_own = downlink_coding.downlink_bits_many([shared, pruned], own, theta, keeps, check=True)
  codes = probability.theta_codes(theta[0], 2)
  expected = 8 + sum(8 * len(s) for s in coding.encode_masks(downlink_coding.bit_planes(codes, 2),
                                                              downlink_coding.LANE_LEN))
  assert by_own == [expected, expected]  # the personal head gets nothing; the same for both
  # levels 0 and 3 only, the decision a fair coin: about 1 bit an element of the 2 packed
  assert 4000 <= expected < 1.15 * 4000
  by_theta = downlink_coding.downlink_bits_many([shared, pruned], dataclasses.replace(
      own, head_start="theta"), theta, keeps, check=True)
  # uniform theta does not compress: the pruned payload costs its packed size (2 bits a kept element)
  assert by_theta[0] - by_own[0] == pytest.approx(2 * 400, abs=8 * 200)
  assert by_theta[1] - by_own[1] == pytest.approx(2 * 800, abs=8 * 200)
  assert by_theta[1] > by_theta[0]
  with pytest.raises(ValueError, match="float32"):
    downlink_coding.downlink_bits_many([shared], SampledMaskConfig(downlink_bits=32), theta[:1],
                                       keeps)


def test_bad_downlink_codings_are_refused():  # the coded round itself: test_sampled_upload_coding
  config = SampledMaskConfig(local_epochs=1, prune_last_layers=1, downlink_bits=2)
  with pytest.raises(ValueError, match="downlink_coding must be"):
    sampled.SampledFedMask(CONTEXT, config, downlink_coding="zip")
  with pytest.raises(ValueError, match="float32"):
    sampled.FedPM(CONTEXT, dataclasses.replace(config, downlink_bits=32), downlink_coding="entropy")


def test_auto_codes_quantized_theta_only_and_bad_combinations_are_refused():
  from fedmask_tff.algorithms import downlink_coding_used
  from fedmask_tff.simulation.run_config import ConfigError, RunConfig, unused_settings
  assert downlink_coding_used("fedmask", "sampled", "auto", 0) == "entropy"  # 2 bits by default
  assert downlink_coding_used("fedmask", "sampled", "auto", 32) == "none"
  assert downlink_coding_used("fedpm", "sampled", "auto", 0) == "none"  # fedpm: float32
  assert downlink_coding_used("fedpm", "sampled", "auto", 4) == "entropy"
  assert downlink_coding_used("fedmask", "score_sign", "auto", 0) == "none"
  assert downlink_coding_used("local_masks", "sampled", "auto", 0) == "none"
  assert downlink_coding_used("fedmask", "sampled", "none", 2) == "none"
  RunConfig(algorithm="fedmask", downlink_coding="entropy").validate()
  RunConfig(algorithm="fedpm", downlink_coding="entropy", downlink_bits=2).validate()
  with pytest.raises(ConfigError, match="set --downlink_bits to 1, 2, 4 or 8"):
    RunConfig(algorithm="fedpm", downlink_coding="entropy").validate()
  with pytest.raises(ConfigError, match="score-threshold"):
    RunConfig(algorithm="fedmask", upload="score_sign", downlink_coding="entropy").validate()
  with pytest.raises(ConfigError, match="downlink_coding apply to --algorithm=fedmask"):
    RunConfig(algorithm="fedavg", downlink_coding="entropy").validate()
  with pytest.raises(ConfigError, match="'auto', 'none' or 'entropy'"):
    RunConfig(downlink_coding="zip").validate()
  assert "downlink_coding" not in unused_settings(RunConfig(algorithm="fedmask"))
  assert "downlink_coding" in unused_settings(RunConfig(algorithm="fedmask", upload="score_sign"))
