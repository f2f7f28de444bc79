"""Tests of top-k sparsified FedAvg (fedmask_tff.algorithms.topk).

The hand-computed cases use a linear softmax model (8 inputs -> 3 logits, no
bias: 24 weights) and one batch per client, so local training is a single SGD
step whose update is ``delta = -lr * x^T (softmax(x W) - onehot(y)) / B``,
computed here in numpy. Top-k, densification, the example-weighted server mean
and the error-feedback residual are then reproduced in numpy too.
The end-to-end tests run the algorithm built from a :class:`BuildContext` on a
tiny 28x28 task (class 0: left half bright, class 1: right half bright).
"""

from __future__ import annotations

import collections

import numpy as np
import pytest
import tensorflow as tf

from fedmask_tff.models import costs
from fedmask_tff.algorithms import topk
from fedmask_tff.algorithms.base import BuildContext

LR = 0.5
FRACTION = 0.25  # k = round(0.25 * 24) = 6
N_WEIGHTS = 24
K = 6
SPEC = collections.OrderedDict(x=tf.TensorSpec([None, 8], tf.float32),
                               y=tf.TensorSpec([None], tf.int32))


def linear_model():
  return tf.keras.Sequential([
      tf.keras.Input(shape=(8,)),
      tf.keras.layers.Dense(3, use_bias=False,
                            kernel_initializer=tf.keras.initializers.RandomNormal(seed=5),
                            name="fc"),
  ])


def client_data(seed, n):
  rng = np.random.default_rng(seed)
  return rng.standard_normal((n, 8)).astype(np.float32), rng.integers(0, 3, n).astype(np.int32)


def dataset(x, y, batch=16):
  return tf.data.Dataset.from_tensor_slices(collections.OrderedDict(x=x, y=y)).batch(batch)


def numpy_delta(w, x, y, lr=LR):
  """One SGD step on mean cross-entropy of softmax(x @ w), as a flat update (row-major)."""
  logits = x @ w
  p = np.exp(logits - logits.max(axis=1, keepdims=True))
  p /= p.sum(axis=1, keepdims=True)
  p[np.arange(len(y)), y] -= 1.0
  return (-lr * x.T @ p / len(y)).reshape(-1)


def numpy_topk(u, k):
  idx = np.argsort(-np.abs(u), kind="stable")[:k]
  dense = np.zeros_like(u)
  dense[idx] = u[idx]
  return idx, dense


def test_helpers():
  assert topk.topk_count(0.1, 41800) == 4180
  assert topk.topk_count(0.001, 10) == 1  # at least one element
  assert topk.topk_count(1.0, 7) == 7
  for bad in (0.0, -0.1, 1.5):
    with pytest.raises(ValueError):
      topk.check_fraction(bad)
  u = tf.constant([0.1, -3.0, 2.0, -0.5, 0.0, 2.5])
  values, indices = topk.select_topk(u, 3)
  assert indices.dtype == tf.int32 and values.dtype == tf.float32
  np.testing.assert_array_equal(indices.numpy(), [1, 5, 2])
  np.testing.assert_array_equal(values.numpy(), np.float32([-3.0, 2.5, 2.0]))
  np.testing.assert_array_equal(topk.densify(values, indices, 6).numpy(),
                                np.float32([0, -3.0, 2.0, 0, 0, 2.5]))
  bits = topk.tensor_bits(collections.OrderedDict(
      v=tf.zeros([5], tf.float32), i=tf.zeros([5], tf.int32), b=tf.zeros([3], tf.uint8)))
  assert int(bits) == 5 * 32 + 5 * 32 + 3 * 8


@pytest.fixture(scope="module")
def process(tff_context):
  return topk.build_topk_process(linear_model, SPEC, fraction=FRACTION, learning_rate=LR,
                                 local_epochs=1, server_learning_rate=0.5)


@pytest.fixture(scope="module")
def ef_process(tff_context):
  return topk.build_topk_process(linear_model, SPEC, fraction=FRACTION, learning_rate=LR,
                                 local_epochs=1, error_feedback=True)


def test_client_upload_is_the_top_k_of_the_update(process):
  assert process.k == K and process.num_elements == N_WEIGHTS
  (w0,) = process.initialize()
  x, y = client_data(0, 10)
  upload, metrics = process.client_update(dataset(x, y), (w0,))
  values, indices = np.asarray(upload["values"]), np.asarray(upload["indices"])
  assert values.shape == (K,) and values.dtype == np.float32
  assert indices.shape == (K,) and indices.dtype == np.int32
  assert int(metrics["uplink_bits"]) == 64 * K
  assert int(metrics["downlink_bits"]) == 32 * N_WEIGHTS
  assert float(metrics["examples"]) == 10
  delta = numpy_delta(w0, x, y)
  expected_idx, _ = numpy_topk(delta, K)
  assert set(indices.tolist()) == set(expected_idx.tolist())
  np.testing.assert_allclose(values, delta[indices], rtol=1e-4, atol=1e-7)
  # Every element not sent is no larger than the smallest sent.
  rest = np.delete(np.abs(delta), indices)
  assert rest.max() <= np.abs(values).min()


def test_server_applies_the_weighted_mean_of_densified_updates(process):
  (w0,) = process.initialize()
  sizes = (10, 4)
  data = [client_data(s, n) for s, n in zip((1, 2), sizes)]
  (w1,), metrics = process.next((w0,), [dataset(x, y) for x, y in data])
  dense = [numpy_topk(numpy_delta(w0, x, y), K)[1] for x, y in data]
  mean = (sizes[0] * dense[0] + sizes[1] * dense[1]) / sum(sizes)
  np.testing.assert_allclose(w1, w0 + 0.5 * mean.reshape(8, 3), rtol=1e-4, atol=1e-6)
  assert [float(m["examples"]) for m in metrics] == [10.0, 4.0]
  assert [int(m["uplink_bits"]) for m in metrics] == [64 * K, 64 * K]


def test_error_feedback_residual(ef_process):
  (w0,) = ef_process.initialize()
  rng = np.random.default_rng(9)
  residuals = [(rng.standard_normal((8, 3)).astype(np.float32) * 0.05,),
               (np.zeros((8, 3), np.float32),)]
  sizes = (6, 3)
  data = [client_data(s, n) for s, n in zip((3, 4), sizes)]
  (w1,), new_residuals, metrics = ef_process.next((w0,), [dataset(x, y) for x, y in data],
                                                  residuals)
  dense = []
  for (x, y), (r,), (new_r,) in zip(data, residuals, new_residuals):
    u = numpy_delta(w0, x, y) + r.reshape(-1)
    _, sent = numpy_topk(u, K)
    dense.append(sent)
    np.testing.assert_allclose(np.asarray(new_r).reshape(-1), u - sent, rtol=1e-4, atol=1e-6)
    assert np.count_nonzero(np.asarray(new_r)) == N_WEIGHTS - K
  mean = (sizes[0] * dense[0] + sizes[1] * dense[1]) / sum(sizes)
  np.testing.assert_allclose(w1, w0 + mean.reshape(8, 3), rtol=1e-4, atol=1e-6)
  assert [int(m["uplink_bits"]) for m in metrics] == [64 * K, 64 * K]


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


def image_datasets(sizes, seed, batch=8):
  return [dataset(*halves_task(seed + i, n), batch=batch) for i, n in enumerate(sizes)]


def context(local_epochs=1):
  return BuildContext(input_shape=(28, 28, 1), num_classes=2, model="mlp", model_width=0.25,
                      seed=0, element_spec=IMG_SPEC, eval_element_spec=IMG_SPEC,
                      local_epochs=local_epochs, learning_rate=30.0, batch_size=8)


@pytest.mark.parametrize("error_feedback", [False, True])
def test_algorithm_trains_and_evaluates(tff_context, error_feedback):
  alg = topk.build_topk(context(), fraction=0.1, error_feedback=error_feedback)
  assert alg.name == "topk" and alg.settings["error_feedback"] == error_feedback
  n = alg.model_parameters
  assert n == 784 * 50 + 50 * 50 + 50 * 2
  k = topk.topk_count(0.1, n)
  train_sizes, test_sizes = (40, 24, 32), (12, 20, 8)
  train, test = image_datasets(train_sizes, 0), image_datasets(test_sizes, 100)
  if error_feedback:
    states = [alg.initial_client_state() for _ in train_sizes]
    assert [s.shape for s in states[0]] == [(784, 50), (50, 50), (50, 2)]
  else:
    assert alg.initial_client_state() is None and alg.make_store("/nonexistent") is None
    states = None
  state = alg.initialize()
  before = alg.evaluate(state, test, states, train)
  weight_costs = costs.weight_costs(context().dense_model_fn()())
  losses = []
  for _ in range(3):
    state, states, metrics = alg.next(state, train, states)
    assert (states is None) != error_feedback
    assert len(metrics) == 3
    for m, size in zip(metrics, train_sizes):
      assert m["examples"] == size
      assert m["uplink_bits"] == 64 * k
      assert m["downlink_bits"] == 32 * n
      assert m["train_flops"] == costs.train_flops(weight_costs, size)
    losses.append(sum(m["loss_sum"] for m in metrics) / sum(train_sizes))
  assert losses[-1] < losses[0]
  after = alg.evaluate(state, test, states, train)
  assert [e["examples"] for e in after] == list(test_sizes)
  assert set(after[0]) >= {"correct", "examples", "loss_sum"}
  accuracy = sum(e["correct"] for e in after) / sum(test_sizes)
  assert accuracy > 0.8
  assert sum(e["loss_sum"] for e in after) < sum(e["loss_sum"] for e in before)


# --- Misbehaving clients: a diverged client contributes nothing; malformed uploads are dropped ---


def nan_data(seed, n):
  x, y = client_data(seed, n)
  x[0, 0] = np.nan  # one NaN feature: the loss, the gradient and the update are NaN
  return x, y


def test_a_diverged_client_is_dropped_from_the_round(process):
  (w0,) = process.initialize()
  good = [client_data(s, n) for s, n in ((21, 10), (22, 6))]
  (with_bad,), metrics = process.next((w0,), [dataset(x, y) for x, y in good + [nan_data(23, 8)]])
  (without,), metrics_ref = process.next((w0,), [dataset(x, y) for x, y in good])
  assert np.all(np.isfinite(with_bad))
  np.testing.assert_allclose(with_bad, without, rtol=1e-6, atol=1e-7)
  assert np.abs(np.asarray(without) - w0).max() > 1e-4  # the round did move the model
  assert [int(m["diverged"]) for m in metrics] == [0, 0, 1]
  assert [int(m["upload_valid"]) for m in metrics] == [1, 1, 1]  # zeros of the right shapes
  bad = metrics[2]
  assert float(bad["examples"]) == 0 and float(bad["loss_sum"]) == 0
  assert float(bad["trained_examples"]) == 8
  assert int(bad["uplink_bits"]) == 64 * K  # the payload keeps its shapes
  # Only the diverged client: the global model is unchanged (no division by 0).
  (alone,), metrics = process.next((w0,), [dataset(*nan_data(24, 8))])
  np.testing.assert_array_equal(alone, w0)
  assert int(metrics[0]["diverged"]) == 1


def test_a_diverged_client_keeps_its_residual(ef_process):
  (w0,) = ef_process.initialize()
  rng = np.random.default_rng(11)
  residuals = [(rng.standard_normal((8, 3)).astype(np.float32) * 0.05,) for _ in range(3)]
  data = [client_data(31, 6), client_data(32, 9), nan_data(33, 7)]
  (w1,), new_res, metrics = ef_process.next((w0,), [dataset(x, y) for x, y in data], residuals)
  (w_ref,), res_ref, _ = ef_process.next((w0,), [dataset(x, y) for x, y in data[:2]],
                                         residuals[:2])
  np.testing.assert_allclose(w1, w_ref, rtol=1e-6, atol=1e-7)
  for (got,), (want,) in zip(new_res[:2], res_ref):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert np.all(np.isfinite(got))
  np.testing.assert_array_equal(np.asarray(new_res[2][0]), residuals[2][0])  # kept as it was
  assert [int(m["diverged"]) for m in metrics] == [0, 0, 1]


def test_server_rejects_malformed_uploads(process):
  good_idx = np.arange(K, dtype=np.int32) * 3
  values = np.linspace(-1, 1, K).astype(np.float32)
  weighted, weight = process.decode_upload(
      collections.OrderedDict(values=values, indices=good_idx), np.float32(5))
  assert float(weight) == 5
  dense = np.zeros(N_WEIGHTS, np.float32)
  dense[good_idx] = values * 5
  np.testing.assert_allclose(np.asarray(weighted[0]).reshape(-1), dense, rtol=1e-6)
  _, _, valid = process.decode_and_validate(
      collections.OrderedDict(values=values, indices=good_idx), np.float32(5))
  assert int(valid) == 1
  out_of_range = good_idx.copy()
  out_of_range[-1] = N_WEIGHTS  # index n: outside [0, n)
  negative = good_idx.copy()
  negative[0] = -1
  duplicate = good_idx.copy()
  duplicate[1] = duplicate[0]
  nan_values = values.copy()
  nan_values[2] = np.nan
  bad_uploads = [(values, out_of_range, 5.0), (values, negative, 5.0), (values, duplicate, 5.0),
                 (nan_values, good_idx, 5.0), (values, good_idx, np.nan),
                 (values, good_idx, -1.0)]
  for v, i, n in bad_uploads:
    upload = collections.OrderedDict(values=v, indices=i)
    weighted, weight = process.decode_upload(upload, np.float32(n))
    assert float(weight) == 0
    assert not np.asarray(weighted[0]).any()
    _, weight, valid = process.decode_and_validate(upload, np.float32(n))
    assert int(valid) == 0 and float(weight) == 0


def test_wrapper_passes_diverged_and_upload_valid_as_ints(process):
  alg = topk.TopKFedAvg(process, linear_model, {})
  data = [dataset(*client_data(61, 8)), dataset(*nan_data(62, 8))]
  state, states, metrics = alg.next(process.initialize(), data, None)
  assert states is None
  assert [m["diverged"] for m in metrics] == [0, 1]
  assert [m["upload_valid"] for m in metrics] == [1, 1]
  assert all(type(m["diverged"]) is int and type(m["upload_valid"]) is int for m in metrics)
  assert metrics[1]["examples"] == 0 and metrics[1]["loss_sum"] == 0
  # FLOPs count the examples the diverged client did process.
  assert metrics[1]["train_flops"] == costs.train_flops(costs.weight_costs(linear_model()), 8)
  assert all(np.all(np.isfinite(np.asarray(w))) for w in state)
