"""The sampled-mask algorithms (FedPM, FedMask's default recipe, local_masks) on a tiny model,
against numbers computed by hand: a client starting from theta, the server's posterior and its
reset, the bits up and down counted from the payloads, pruned elements staying zero."""

import collections
import math

import numpy as np
import pytest
import tensorflow as tf

from fedmask_tff.algorithms.sampled_masks import algorithm as sampled
from fedmask_tff.algorithms.sampled_masks.config import SampledMaskConfig
from fedmask_tff.masks import pruning
from fedmask_tff.wire import bitpack
from helpers import sampled_mlp_context

CONTEXT = sampled_mlp_context(width=0.05)


def _data(seed, n=16):
  rng = np.random.default_rng(seed)
  return tf.data.Dataset.from_tensor_slices(collections.OrderedDict(
      x=rng.random((n, 6)).astype(np.float32), y=rng.integers(0, 3, n).astype(np.int32))).batch(8)


@pytest.fixture(scope="module")
def fedmask():
  return sampled.SampledFedMask(CONTEXT, SampledMaskConfig(local_epochs=1, learning_rate=1e-6,
                                                           prune_last_layers=1, downlink_bits=2))


def _bits(n, per=1):
  return 8 * math.ceil(n * per / 8)


def test_client_starts_from_theta_and_bits_are_counted(fedmask):
  plan = fedmask.plan
  assert [s.personal for s in plan] == [s.prunable for s in plan] == [False] * (len(plan) - 1) + [True]
  server = fedmask.initialize()
  server["theta"] = tuple(np.full(s.shape, 1.0, np.float32) if not s.personal
                          else np.asarray(t) for s, t in zip(plan, server["theta"]))
  states = [fedmask.initial_client_state() for _ in range(2)]
  server2, new, metrics = fedmask.next(server, [_data(1), _data(2)], states)
  # Shared weights start from logit(clip(1, 0.01, 0.99)) = log(99); lr 1e-6 barely moves them.
  for i, spec in enumerate(plan[:-1]):
    np.testing.assert_allclose(new[0]["scores"][i], math.log(99), atol=1e-3)
  head = plan[-1]
  kept = pruning.kept_count(head.size, 0.2)
  for state, m in zip(new, metrics):
    keep = bitpack.unpack_bits_np(state["keep"][-1], (head.size,))
    assert keep.sum() == kept and int(state["pruned"]) == 1
    shared = sum(_bits(s.size) for s in plan[:-1])
    assert m["uplink_bits"] == shared + _bits(kept) + _bits(head.size)  # + the keep mask, once
    assert m["downlink_bits"] == sum(_bits(s.size, 2) for s in plan[:-1])
    assert m["pruned"] == 1 and m["mask_kept"] == sum(s.size for s in plan[:-1]) + kept
  # Round 2: the pruning mask is not sent again, and stays the same.
  _, newer, metrics2 = fedmask.next(server2, [_data(1), _data(2)], new)
  assert metrics2[0]["uplink_bits"] == metrics[0]["uplink_bits"] - _bits(head.size)
  assert metrics2[0]["pruned"] == 0
  np.testing.assert_array_equal(newer[0]["keep"][-1], new[0]["keep"][-1])


def test_server_posterior_resets_each_round(fedmask):
  plan = fedmask.plan
  server = fedmask.initialize()
  states = [fedmask.initial_client_state() for _ in range(2)]
  server, states, _ = fedmask.next(server, [_data(3), _data(4)], states)
  # Two clients, prior Beta(1, 1) reset: theta of a shared element is (1 + ones) / 4.
  theta0 = np.asarray(server["theta"][0])
  assert set(np.unique(np.round(theta0 * 4, 4))) <= {1.0, 2.0, 3.0}
  np.testing.assert_allclose(np.asarray(server["alpha"][0]) + np.asarray(server["beta"][0]), 4.0)
  # The head: only elements both clients keep are updated (and marked defined).
  both = (bitpack.unpack_bits_np(states[0]["keep"][-1], plan[-1].shape)
          * bitpack.unpack_bits_np(states[1]["keep"][-1], plan[-1].shape)) > 0
  np.testing.assert_array_equal(np.asarray(server["defined"][-1]), both)
  server2, _, _ = fedmask.next(server, [_data(3), _data(4)], states)
  np.testing.assert_allclose(np.asarray(server2["alpha"][0]) + np.asarray(server2["beta"][0]), 4.0)
  assert int(server2["round"]) == 2


def test_pruned_elements_stay_zero_in_the_personal_model(fedmask):
  server = fedmask.initialize()
  states = [fedmask.initial_client_state()]
  server, states, _ = fedmask.next(server, [_data(5)], states)
  head = fedmask.plan[-1]
  keep = bitpack.unpack_bits_np(states[0]["keep"][-1], head.shape)
  model = fedmask.model_fn()
  from fedmask_tff.masks.layers import mask_variables
  _, scores, keeps = mask_variables(model)
  for v, s in zip(scores, states[0]["scores"]):
    v.assign(s)
  keeps[-1].assign(keep)
  masks = model.layers[-1].binary_masks()[0].numpy()
  assert np.all(masks[keep == 0] == 0)
  personal = fedmask.evaluate(server, [_data(6)], states, None)[0]
  assert personal["examples"] == 16.0


def test_fedpm_is_one_global_mask():
  fedpm = sampled.FedPM(CONTEXT, SampledMaskConfig(local_epochs=1, downlink_bits=32))
  assert not any(s.personal or s.prunable for s in fedpm.plan)
  assert fedpm.initial_client_state() is None
  server = fedpm.initialize()
  server, states, metrics = fedpm.next(server, [_data(7), _data(8), _data(9)], None)
  assert states is None
  n = sum(s.size for s in fedpm.plan)
  assert metrics[0]["downlink_bits"] == 32 * n
  assert metrics[0]["uplink_bits"] == sum(_bits(s.size) for s in fedpm.plan)
  # FedPM's prior is reset each round and every element is shared: theta = (1 + ones) / 5.
  assert set(np.unique(np.round(np.asarray(server["theta"][0]) * 5, 4))) <= {1.0, 2.0, 3.0, 4.0}
  a, b = fedpm.evaluate(server, [_data(1), _data(2)], None, None)
  assert a["examples"] == b["examples"] == 16.0


def test_local_masks_sends_nothing_and_keeps_its_own_scores():
  local = sampled.SampledLocalMasks(CONTEXT, SampledMaskConfig(local_epochs=1, prune_last_layers=1))
  assert all(s.personal for s in local.plan)
  server = local.initialize()
  states = [local.initial_client_state()]
  server2, new, metrics = local.next(server, [_data(1)], states)
  assert metrics[0]["uplink_bits"] == 0 and metrics[0]["downlink_bits"] == 0
  assert int(server2["round"]) == int(server["round"])  # nothing aggregated
  assert not np.allclose(new[0]["scores"][0], states[0]["scores"][0])


def test_weight_plan_personal_layers():
  from fedmask_tff import models
  from fedmask_tff.algorithms.sampled_masks import process
  model = models.masked_builder("mlp")(input_shape=(6,), num_classes=3, width=0.05, seed=0,
                                       mask_mode="sampled", score_init=0.0)
  plan = process.weight_plan(model, SampledMaskConfig(prune_last_layers=2, personal_layers=1))
  assert [(s.prunable, s.personal) for s in plan][-3:] == [(False, False), (True, False), (True, True)]
  every = process.weight_plan(model, SampledMaskConfig(prune_last_layers=2))
  assert [(s.prunable, s.personal) for s in every][-2:] == [(True, True), (True, True)]
  alone = process.weight_plan(model, SampledMaskConfig(prune_last_layers=2), everything_personal=True)
  assert all(s.personal for s in alone)


def test_few_local_steps_warning_counts_the_median_clients_steps():
  from fedmask_tff.algorithms.sampled_masks import config as sm_config
  # FEMNIST's median writer (151 examples): 2 epochs x ceil(151/32) = 10 steps -> warned;
  # 5 epochs x ceil(151/16) = 50 steps -> not; the demo's validation split (448 examples) 28 -> not.
  assert sm_config.local_steps(151, 2, 32) == 10
  warning = sm_config.few_local_steps_warning(151, 2, 32)
  assert warning is not None and "10 local steps" in warning and "--local_epochs=2" in warning
  assert sm_config.few_local_steps_warning(151, 5, 16) is None
  assert sm_config.local_steps(448, 2, 32) == 28
  assert sm_config.few_local_steps_warning(448, 2, 32) is None
  assert sm_config.few_local_steps_warning(19, 1, 1) is not None


def test_fused_adam_step_is_tffs_build_adam():
  # Three steps of the fused kernel against TFF's build_adam on the same gradients, and the
  # first step by hand: m = 0.1 g, v = 0.001 g^2, w -= lr sqrt(0.001) / 0.1 * m / (sqrt(v) + eps).
  import tensorflow_federated as tff
  from fedmask_tff.algorithms.sampled_masks import client
  w0 = np.array([[0.5, -1.0], [2.0, 0.0]], np.float32)
  grads = [np.array([[0.3, -0.2], [0.0, 1.5]], np.float32) * k for k in (1.0, -0.5, 2.0)]
  var = tf.Variable(w0)
  slots = client.AdamSlots([var])
  opt = tff.learning.optimizers.build_adam(0.1)
  state = opt.initialize((tf.TensorSpec(w0.shape, tf.float32),))
  expected = (tf.constant(w0),)
  for t, g in enumerate(grads, start=1):
    client.adam_step([var], [tf.constant(g)], slots, tf.constant(float(t)), 0.1)
    state, expected = opt.next(state, expected, (tf.constant(g),))
    if t == 1:
      m, v = 0.1 * grads[0], 0.001 * grads[0] ** 2
      by_hand = w0 - 0.1 * math.sqrt(0.001) / 0.1 * m / (np.sqrt(v) + 1e-7)
      np.testing.assert_allclose(var.numpy(), by_hand, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var.numpy(), expected[0].numpy(), rtol=1e-5, atol=1e-6)
  slots.reset()
  assert not np.any(slots.first[0].numpy()) and not np.any(slots.second[0].numpy())


def test_prune_rate_default_is_the_recipes_and_a_given_one_is_kept():
  from fedmask_tff.algorithms import prune_rate_used
  from fedmask_tff.simulation.run_config import ConfigError, RunConfig
  assert prune_rate_used(RunConfig(algorithm="fedmask")) == 0.5  # sampled masks: chosen on validation
  assert prune_rate_used(RunConfig(algorithm="local_masks")) == 0.5
  assert prune_rate_used(RunConfig(algorithm="fedmask", upload="mask")) == 0.2  # the paper's p_r
  assert prune_rate_used(RunConfig(algorithm="fedmask", upload="score_sign")) == 0.2
  assert prune_rate_used(RunConfig(algorithm="fedmask", prune_rate=0.3)) == 0.3
  assert prune_rate_used(RunConfig(algorithm="fedmask", upload="mask", prune_rate=0.7)) == 0.7
  RunConfig(algorithm="fedmask").validate()
  with pytest.raises(ConfigError, match="prune_rate"):
    RunConfig(algorithm="fedmask", prune_rate=0.0).validate()
