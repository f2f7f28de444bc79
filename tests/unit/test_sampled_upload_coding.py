"""Entropy coding of sampled uploads (``--uplink_coding=entropy``): the references by hand, the
coded size against the packed one, and a round with coding equal to one without (lossless)."""

import collections
import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from fedmask_tff.algorithms.sampled_masks import algorithm as sampled
from fedmask_tff.algorithms.sampled_masks import upload_coding
from fedmask_tff.algorithms.sampled_masks.config import SampledMaskConfig, WeightPlan
from fedmask_tff.wire import bitpack
from helpers import sampled_mlp_context

CONTEXT = sampled_mlp_context(width=0.05)
WIDER = dataclasses.replace(CONTEXT, model_width=1.0)  # a wider mlp: shared weights large enough to code

SHARED = WeightPlan("w0", (4,), 4, prunable=False, personal=False)
PRUNED = WeightPlan("w1", (4,), 4, prunable=True, personal=False)
PERSONAL = WeightPlan("w2", (4,), 4, prunable=True, personal=True)


def test_references_by_hand():
  config = SampledMaskConfig(downlink_bits=2)
  theta = [np.array([0.9, 0.2, 0.6, 0.4], np.float32)] * 3
  # 2 bits: levels 0, 1/3, 2/3, 1 -> 0.9 -> 1, 0.2 -> 1/3, 0.6 -> 2/3, 0.4 -> 1/3.
  defined = [np.ones(4, bool), np.array([True, True, False, True]), np.ones(4, bool)]
  keep = [bitpack.pack_bits_np(np.ones(4, np.uint8)),
          bitpack.pack_bits_np(np.array([1, 0, 1, 1], np.uint8)),
          bitpack.pack_bits_np(np.array([1, 1, 0, 0], np.uint8))]
  shared, pruned, personal = upload_coding.references([SHARED, PRUNED, PERSONAL], config, theta,
                                                      defined, keep)
  np.testing.assert_array_equal(shared, [1, 0, 1, 0])
  np.testing.assert_array_equal(pruned, [1, 0, 0])  # kept 0, 2, 3; element 2 not defined
  np.testing.assert_array_equal(personal, [0, 0])  # nothing went down: zeros
  head_from_theta = upload_coding.references([PERSONAL], SampledMaskConfig(head_start="theta"),
                                             theta[2:], defined[2:], keep[2:])[0]
  np.testing.assert_array_equal(head_from_theta, [1, 0])
  # 1 bit down: the decision 1[theta >= 0.5] itself.
  one = upload_coding.references([SHARED], SampledMaskConfig(downlink_bits=1), theta[:1],
                                 defined[:1], keep[:1])[0]
  np.testing.assert_array_equal(one, [1, 0, 1, 0])


def test_coded_bits_exact_small_when_the_sample_agrees_and_refuses_a_wrong_size():
  rng = np.random.default_rng(0)
  ref = (rng.random(20000) < 0.5).astype(np.uint8)
  agree = ref.copy()
  agree[rng.choice(20000, 200, replace=False)] ^= 1  # 1 % flips
  coded = upload_coding.coded_bits([bitpack.pack_bits_np(agree)], [ref])
  assert coded < 0.15 * 20000  # entropy of 1 % flips: 0.081 bit each
  noise = (rng.random(20000) < 0.5).astype(np.uint8)
  # Independent of the reference: the packed bits go as they are, + the byte saying so.
  assert upload_coding.coded_bits([bitpack.pack_bits_np(noise)], [ref]) == 20000 + 8
  assert upload_coding.coded_bits([np.zeros(0, np.uint8)], [np.zeros(0, np.uint8)]) == 8
  with pytest.raises(ValueError, match="weight 0: 3 bytes for 20000"):
    upload_coding.coded_bits([np.zeros(3, np.uint8)], [ref])
  # Several clients at once: each one's total as alone, in their order.
  uploads = [[bitpack.pack_bits_np(agree)], [bitpack.pack_bits_np(noise)],
             [np.zeros(0, np.uint8)]]
  refs = [[ref], [ref], [np.zeros(0, np.uint8)]]
  assert upload_coding.coded_bits_many(uploads, refs, check=1) == [coded, 20000 + 8, 8]


def test_the_checked_upload_is_decoded_and_a_wrong_stream_raises(monkeypatch):
  from fedmask_tff.wire import coding
  ref = np.zeros(64, np.uint8)
  bits = [bitpack.pack_bits_np(np.ones(64, np.uint8))]
  real = coding.decode_mask
  monkeypatch.setattr(coding, "decode_mask", lambda *a: 1 - real(*a))  # a broken decoder
  assert upload_coding.coded_bits_many([bits, bits], [[ref], [ref]], check=None)  # not decoded
  with pytest.raises(RuntimeError, match="did not decode exactly"):
    upload_coding.coded_bits_many([bits, bits], [[ref], [ref]], check=1)


def _data(seed, n=16):
  rng = np.random.default_rng(seed)
  return tf.data.Dataset.from_tensor_slices(collections.OrderedDict(
      x=rng.random((n, 6)).astype(np.float32), y=rng.integers(0, 3, n).astype(np.int32))).batch(8)


def test_a_coded_round_is_the_same_round_with_fewer_bits():
  config = SampledMaskConfig(local_epochs=1, learning_rate=1e-6, prune_last_layers=1, downlink_bits=2)
  plain = sampled.SampledFedMask(WIDER, config)
  coded = sampled.SampledFedMask(WIDER, config, uplink_coding="entropy")
  assert coded.settings["uplink_coding"] == "entropy"
  server = plain.initialize()
  # A confident theta (0.99 at every shared element): lr 1e-6 keeps the scores at logit(0.99),
  # so the samples agree with the reference 1[theta_q >= 0.5] = 1 at about 99 % of them.
  server["theta"] = tuple(np.full(s.shape, 0.99, np.float32) if not s.personal else np.asarray(t)
                          for s, t in zip(plain.plan, server["theta"]))
  states = [plain.initial_client_state() for _ in range(2)]
  data = [_data(1), _data(2)]
  s1, n1, m1 = plain.next(server, data, states)
  s2, n2, m2 = coded.next(server, data, states)
  for a, b in zip(tf.nest.flatten(s1), tf.nest.flatten(s2)):  # the same server state ...
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for a, b in zip(tf.nest.flatten(n1), tf.nest.flatten(n2)):  # ... and client states
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  shared = sum(s.size for s in plain.plan if not s.personal)
  for p, c in zip(m1, m2):
    assert c["uplink_bits_packed"] == p["uplink_bits"]
    assert c["uplink_bits"] < p["uplink_bits"] - shared // 2  # the shared bits cost < half
    assert c["downlink_bits"] == p["downlink_bits"] and c["loss_sum"] == p["loss_sum"]
  # --downlink_coding=entropy: the same round again; theta's 2-bit codes, one level at every
  # shared element, cost next to nothing, and the uplink is left as it was
  down = sampled.SampledFedMask(WIDER, config, downlink_coding="entropy")
  s3, n3, m3 = down.next(server, data, states)
  for a, b in zip(tf.nest.flatten((s1, n1)), tf.nest.flatten((s3, n3))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for p, c in zip(m1, m3):
    assert c["downlink_bits_packed"] == p["downlink_bits"] == 2 * shared
    assert c["downlink_bits"] < 0.05 * p["downlink_bits"]
    assert c["uplink_bits"] == p["uplink_bits"]
  assert "downlink_bits_packed_per_client" in down.round_extras(m3)


def test_fedpm_codes_its_uploads_and_local_masks_sends_nothing():
  fedpm = sampled.FedPM(CONTEXT, SampledMaskConfig(local_epochs=1, downlink_bits=32),
                        uplink_coding="entropy")
  plain = sampled.FedPM(CONTEXT, SampledMaskConfig(local_epochs=1, downlink_bits=32))
  server = fedpm.initialize()
  coded_server, _, metrics = fedpm.next(server, [_data(3), _data(4)], None)
  plain_server, _, plain_metrics = plain.next(server, [_data(3), _data(4)], None)
  for a, b in zip(tf.nest.flatten(coded_server), tf.nest.flatten(plain_server)):  # the same round
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert [m["loss_sum"] for m in metrics] == [m["loss_sum"] for m in plain_metrics]
  n = sum(s.size for s in fedpm.plan)
  for m in metrics:
    assert m["uplink_bits_packed"] == sum(8 * ((s.size + 7) // 8) for s in fedpm.plan)
    assert 0 < m["uplink_bits"] <= m["uplink_bits_packed"] + 8
  local = sampled.SampledLocalMasks(CONTEXT, SampledMaskConfig(local_epochs=1), uplink_coding="entropy")
  assert local.uplink_coding == "none"
  with pytest.raises(ValueError, match="uplink_coding must be"):
    sampled.SampledFedMask(CONTEXT, SampledMaskConfig(), uplink_coding="zip")
  assert n > 0


def test_auto_is_entropy_for_sampled_uploads_only_and_bad_combinations_are_refused():
  from fedmask_tff.algorithms import uplink_coding_used
  from fedmask_tff.simulation.run_config import ConfigError, RunConfig
  assert uplink_coding_used("fedmask", "sampled", "auto") == "entropy"
  assert uplink_coding_used("fedpm", "mask", "auto") == "entropy"  # fedpm is always sampled
  assert uplink_coding_used("fedmask", "score_sign", "auto") == "none"
  assert uplink_coding_used("fedmask", "mask", "auto") == "none"
  assert uplink_coding_used("local_masks", "sampled", "auto") == "none"  # sends nothing
  assert uplink_coding_used("fedavg", "sampled", "auto") == "none"
  assert uplink_coding_used("fedmask", "sampled", "none") == "none"
  for algorithm in ("fedmask", "fedpm", "fedavg", "local_masks", "standalone"):
    RunConfig(algorithm=algorithm).validate()  # the default, auto, fits every algorithm
  RunConfig(algorithm="fedmask", upload="score_sign").validate()
  RunConfig(algorithm="fedpm", uplink_coding="entropy").validate()
  with pytest.raises(ConfigError, match="not --upload=score_sign"):
    RunConfig(algorithm="fedmask", upload="score_sign", uplink_coding="entropy").validate()
  with pytest.raises(ConfigError, match="uplink_coding apply to --algorithm=fedmask"):
    RunConfig(algorithm="local_masks", uplink_coding="entropy").validate()
  with pytest.raises(ConfigError, match="'auto', 'none' or 'entropy'"):
    RunConfig(uplink_coding="zip").validate()
