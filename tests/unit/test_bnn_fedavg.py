"""Tests of FedAvg on a binarized network (fedmask_tff.algorithms.bnn_fedavg).

A tiny binarized model (8 inputs -> 5 -> 3, BinaryDense, 55 latent weights)
keeps the TFF calls fast: its sign upload is ceil(55 / 8) = 7 bytes = 56 bits.
The client's training is reproduced eagerly (same model, same batches, the
same SGD and clipping outside TFF) to check the uploaded signs; the server's
example-weighted mean of +-1 signs is checked by hand on hand-made uploads and
against the uploads of two real clients. The end-to-end test trains the
binarized MLP on a tiny 28x28 task through the FederatedAlgorithm interface.
"""

from __future__ import annotations

import collections
import math

import numpy as np
import pytest
import tensorflow as tf

from fedmask_tff.models import binarized, costs
from fedmask_tff.wire import bitpack
from fedmask_tff.algorithms import evaluation
from fedmask_tff.algorithms import bnn_fedavg, local_training
from fedmask_tff.algorithms.base import BuildContext
from fedmask_tff.models.binarized import BinaryDense

LR = 3.0
N_WEIGHTS = 8 * 5 + 5 * 3
SPEC = collections.OrderedDict(x=tf.TensorSpec([None, 8], tf.float32),
                               y=tf.TensorSpec([None], tf.int32))


def tiny_model():
  return tf.keras.Sequential([
      tf.keras.Input(shape=(8,)),
      BinaryDense(5, activation="relu", kernel_initializer=binarized.ClippedHeNormal(seed=1),
                  name="fc1"),
      BinaryDense(3, kernel_initializer=binarized.ClippedHeNormal(seed=2), name="fc2"),
  ])


def client_data(seed, n):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n, 8)).astype(np.float32)
  return x, (x[:, :3] @ rng.standard_normal(3) > 0).astype(np.int32) + (x[:, 3] > 1)


def dataset(x, y, batch=4):
  return tf.data.Dataset.from_tensor_slices(
      collections.OrderedDict(x=x, y=y.astype(np.int32))).batch(batch)


def eager_training(latent, x, y, lr=LR):
  """The client's local training outside TFF: the latent weights after one epoch."""
  model = tiny_model()
  for v, w in zip(evaluation.model_weights(model), latent):
    v.assign(w)
  local_training.sgd_epochs(model, model.trainable_variables, dataset(x, y), 1, lr,
                            post_step=binarized.clip_latent)
  return [v.numpy() for v in evaluation.model_weights(model)]


@pytest.fixture(scope="module")
def process(tff_context):
  """The default server rule (module constants)."""
  return bnn_fedavg.build_bnn_process(tiny_model, SPEC, learning_rate=LR, local_epochs=1)


@pytest.fixture(scope="module")
def plain_mean_process(tff_context):
  """The plain rule: the new global latent weights are the mean of the signs."""
  return bnn_fedavg.build_bnn_process(tiny_model, SPEC, learning_rate=LR, local_epochs=1,
                                      server_rule="mean", server_rate=1.0, restart_scale=1.0,
                                      restart_per_layer=False)


def expected_rule(process, latent, mean):
  """The server rule by hand, in numpy, on flat vectors (see the module docstring)."""
  c = np.concatenate([np.full(int(np.prod(s)), m) for s, m in
                      zip(process.shapes, process.restart_multipliers)])
  eta = process.server_rate
  if process.server_rule == "delta":
    return np.clip(latent + eta * c * (mean - np.where(latent >= 0, 1.0, -1.0)), -1, 1)
  return np.clip(latent + eta * (c * mean - latent), -1, 1)


def flat(ws):
  return np.concatenate([np.asarray(w).reshape(-1) for w in ws])


def test_upload_is_one_bit_per_weight_and_equals_the_signs(process):
  assert process.num_elements == N_WEIGHTS
  latent = process.initialize()
  assert all(np.abs(w).max() <= 1 for w in latent)
  x, y = client_data(0, 12)
  upload, metrics = process.client_update(dataset(x, y), latent)
  upload = np.asarray(upload)
  assert upload.dtype == np.uint8 and upload.shape == (math.ceil(N_WEIGHTS / 8),)
  assert int(metrics["uplink_bits"]) == 8 * math.ceil(N_WEIGHTS / 8) == 56
  assert int(metrics["downlink_bits"]) == 32 * N_WEIGHTS
  assert float(metrics["examples"]) == 12
  trained = eager_training(latent, x, y)
  for w in trained:  # latent weights stay in [-1, 1], even with a large step
    assert np.abs(w).max() <= 1.0
  flat = np.concatenate([w.reshape(-1) for w in trained])
  bits = np.unpackbits(upload, bitorder="little")
  np.testing.assert_array_equal(bits[:N_WEIGHTS], (flat >= 0).astype(np.uint8))
  assert not bits[N_WEIGHTS:].any()  # padding to the byte is zeros
  # Training moved some signs (otherwise the comparison above says little).
  initial = np.concatenate([w.reshape(-1) for w in latent])
  assert np.any((initial >= 0) != (flat >= 0))


def hand_uploads(process):
  """Two hand-made uploads (3 and 1 examples) through decode_upload, summed; and their mean."""
  signs_a = np.where(np.arange(N_WEIGHTS) % 2 == 0, 1.0, -1.0)
  signs_b = np.where(np.arange(N_WEIGHTS) % 3 == 0, 1.0, -1.0)
  weighted = []
  for signs, n in ((signs_a, 3.0), (signs_b, 1.0)):
    packed = bitpack.pack_bits_np((signs > 0).astype(np.uint8))
    w, examples = process.decode_upload(packed, np.float32(n))
    assert float(examples) == n
    weighted.append(w)
  total = tuple(a + b for a, b in zip(*weighted))
  return total, (3 * signs_a + 1 * signs_b) / 4  # e.g. (+1, -1) -> 0.5, (-1, +1) -> -0.5


def test_server_mean_of_signs_by_hand(plain_mean_process):
  process = plain_mean_process
  latent = process.initialize()
  total, mean = hand_uploads(process)
  new = flat(process.server_update(latent, total, np.float32(4.0)))
  np.testing.assert_allclose(new, mean, rtol=1e-6)
  assert set(np.round(new, 6)) <= {-1.0, -0.5, 0.5, 1.0}
  # No examples at all: the global latent weights stay as they were.
  same = process.server_update(latent, total, np.float32(0.0))
  for a, b in zip(same, latent):
    np.testing.assert_array_equal(a, b)


def test_default_server_rule_by_hand(process):
  assert process.server_rule == bnn_fedavg.DEFAULT_SERVER_RULE
  assert process.server_rate == bnn_fedavg.DEFAULT_SERVER_RATE
  scales = [binarized.binary_scale(s) for s in process.shapes]  # 8 -> 5: sqrt(2/8); 5 -> 3: sqrt(2/5)
  assert scales == pytest.approx([0.5, math.sqrt(0.4)])
  r = bnn_fedavg.DEFAULT_RESTART_SCALE
  expected_c = [r * s for s in scales] if bnn_fedavg.DEFAULT_RESTART_PER_LAYER else [r, r]
  assert list(process.restart_multipliers) == pytest.approx(expected_c)
  total, mean = hand_uploads(process)
  for latent in (process.initialize(),
                 tuple(np.float32(0.3) * np.sign(w - 0.05) for w in process.initialize())):
    new = flat(process.server_update(latent, total, np.float32(4.0)))
    np.testing.assert_allclose(new, expected_rule(process, flat(latent), mean), rtol=1e-5,
                               atol=1e-7)
    assert np.abs(new).max() <= 1.0
    # Weights on which every client kept the global sign keep it (the rule never flips them).
    old = flat(latent)
    agree = np.abs(mean) == 1.0
    agree &= np.sign(mean) == np.where(old >= 0, 1.0, -1.0)
    assert agree.any()
    np.testing.assert_array_equal(new[agree] >= 0, old[agree] >= 0)


def test_next_averages_the_clients_signs(process):
  latent = process.initialize()
  sizes = (12, 4)
  data = [client_data(s, n) for s, n in zip((1, 2), sizes)]
  new, metrics = process.next(latent, [dataset(x, y) for x, y in data])
  signs = []
  for x, y in data:
    trained = flat(eager_training(latent, x, y))
    signs.append(np.where(trained >= 0, 1.0, -1.0))
  mean = (sizes[0] * signs[0] + sizes[1] * signs[1]) / sum(sizes)
  flat_new = flat(new)
  np.testing.assert_allclose(flat_new, expected_rule(process, flat(latent), mean), rtol=1e-5,
                             atol=1e-7)
  assert np.abs(flat_new).max() <= 1.0
  assert [float(m["examples"]) for m in metrics] == [12.0, 4.0]
  assert [int(m["uplink_bits"]) for m in metrics] == [56, 56]


def test_rejects_non_binarized_models(tff_context):
  dense = lambda: tf.keras.Sequential([tf.keras.Input(shape=(8,)),  # noqa: E731
                                       tf.keras.layers.Dense(3, use_bias=False)])
  with pytest.raises(ValueError, match="binarized"):
    bnn_fedavg.build_bnn_process(dense, SPEC)


# --- End to end, through the FederatedAlgorithm interface --------------------------------------

IMG_SPEC = collections.OrderedDict(x=tf.TensorSpec([None, 28, 28, 1], tf.float32),
                                   y=tf.TensorSpec([None], tf.int32))


def halves_task(seed, n):
  """Class 0: left half bright, class 1: right half bright, plus noise."""
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 2, n).astype(np.int32)
  x = rng.random((n, 28, 28, 1)).astype(np.float32) * 0.3
  x[y == 0, :, :14] += 0.7
  x[y == 1, :, 14:] += 0.7
  return x, y


def test_algorithm_trains_and_evaluates(tff_context):
  ctx = BuildContext(input_shape=(28, 28, 1), num_classes=2, model="mlp", model_width=0.25,
                     seed=0, element_spec=IMG_SPEC, eval_element_spec=IMG_SPEC, local_epochs=1,
                     learning_rate=30.0, batch_size=8)
  alg = bnn_fedavg.build_bnn_fedavg(ctx)
  assert alg.name == "bnn_fedavg"
  assert alg.settings["learning_rate"] == bnn_fedavg.DEFAULT_LEARNING_RATE
  assert alg.settings["server_rule"] == bnn_fedavg.DEFAULT_SERVER_RULE
  assert alg.settings["server_rate"] == bnn_fedavg.DEFAULT_SERVER_RATE
  assert alg.initial_client_state() is None
  n = alg.model_parameters
  assert n == 784 * 50 + 50 * 50 + 50 * 2
  train_sizes, test_sizes = (40, 24, 32), (12, 20, 8)
  train = [dataset(*halves_task(i, s), batch=8) for i, s in enumerate(train_sizes)]
  test = [dataset(*halves_task(100 + i, s), batch=8) for i, s in enumerate(test_sizes)]
  weight_costs = costs.weight_costs(binarized.build_binary_mlp(num_classes=2, width=0.25))
  state = alg.initialize()
  losses = []
  for _ in range(2):
    state, states, metrics = alg.next(state, train, None)
    assert states is None and len(metrics) == 3
    for m, size in zip(metrics, train_sizes):
      assert m["examples"] == size
      assert m["uplink_bits"] == 8 * math.ceil(n / 8)
      assert m["downlink_bits"] == 32 * n
      assert m["train_flops"] == costs.train_flops(weight_costs, size)
    losses.append(sum(m["loss_sum"] for m in metrics) / sum(train_sizes))
    assert all(np.abs(np.asarray(w)).max() <= 1.0 for w in state)
  assert losses[1] < losses[0]
  result = alg.evaluate(state, test, None, train)
  assert [e["examples"] for e in result] == list(test_sizes)
  assert sum(e["correct"] for e in result) / sum(test_sizes) > 0.8


# --- Misbehaving clients: a diverged client contributes nothing; malformed uploads are dropped ---


def nan_data(seed, n):
  x, y = client_data(seed, n)
  x[0, 0] = np.nan  # one NaN feature: the loss and the latent weights are NaN
  return x, y


def test_a_diverged_client_is_dropped_from_the_round(process):
  latent = process.initialize()
  good = [client_data(41, 12), client_data(42, 8)]
  with_bad, metrics = process.next(latent, [dataset(x, y) for x, y in good + [nan_data(43, 8)]])
  without, _ = process.next(latent, [dataset(x, y) for x, y in good])
  assert np.all(np.isfinite(flat(with_bad)))
  np.testing.assert_allclose(flat(with_bad), flat(without), rtol=1e-6, atol=1e-7)
  assert np.abs(flat(without) - flat(latent)).max() > 1e-4  # the round did move the model
  assert [int(m["diverged"]) for m in metrics] == [0, 0, 1]
  assert [int(m["upload_valid"]) for m in metrics] == [1, 1, 1]  # zero bytes of the right size
  bad = metrics[2]
  assert float(bad["examples"]) == 0 and float(bad["loss_sum"]) == 0
  assert float(bad["trained_examples"]) == 8 and int(bad["uplink_bits"]) == 56
  # Only the diverged client: the global latent weights are unchanged.
  alone, metrics = process.next(latent, [dataset(*nan_data(44, 8))])
  np.testing.assert_array_equal(flat(alone), flat(latent))
  assert int(metrics[0]["diverged"]) == 1


def test_server_rejects_malformed_uploads(process):
  signs = np.where(np.arange(N_WEIGHTS) % 2 == 0, 1.0, -1.0)
  packed = bitpack.pack_bits_np((signs > 0).astype(np.uint8))
  weighted, weight, valid = process.decode_and_validate(packed, np.float32(2))
  assert int(valid) == 1 and float(weight) == 2
  np.testing.assert_allclose(flat(weighted), 2 * signs)
  padding_set = packed.copy()
  padding_set[-1] |= 0x80  # bit 55: past the 55 weights
  for upload, n in ((packed[:-1], 2.0), (np.concatenate([packed, packed[:1]]), 2.0),
                    (np.zeros(0, np.uint8), 2.0), (padding_set, 2.0), (packed, np.nan),
                    (packed, -3.0)):
    weighted, weight = process.decode_upload(upload, np.float32(n))
    assert float(weight) == 0 and not flat(weighted).any()
    _, weight, valid = process.decode_and_validate(upload, np.float32(n))
    assert int(valid) == 0 and float(weight) == 0


def test_wrapper_passes_diverged_and_upload_valid_as_ints(process):
  alg = bnn_fedavg.BnnFedAvg(process, tiny_model, {})
  data = [dataset(*client_data(51, 8)), dataset(*nan_data(52, 8))]
  state, states, metrics = alg.next(process.initialize(), data, None)
  assert states is None
  assert [m["diverged"] for m in metrics] == [0, 1]
  assert [m["upload_valid"] for m in metrics] == [1, 1]
  assert all(type(m["diverged"]) is int and type(m["upload_valid"]) is int for m in metrics)
  assert metrics[1]["examples"] == 0 and metrics[1]["loss_sum"] == 0
  assert metrics[1]["train_flops"] == costs.train_flops(costs.weight_costs(tiny_model()), 8)
  assert all(np.all(np.isfinite(np.asarray(w))) for w in state)
