"""Tests of LG-FedAvg (fedmask_tff.algorithms.lg_fedavg).

A tiny MLP (the reference MLP at width 0.25: 784x50, 50x50, 50x10, no
biases) and three clients with 20-60 random 28x28x1 examples. Datasets are
not shuffled, so a TFF client computation called directly sees the same
batches as ``next``.
"""

from __future__ import annotations

import collections

import numpy as np
import pytest
import tensorflow as tf

from fedmask_tff.models import costs
from fedmask_tff.algorithms import lg_fedavg
from fedmask_tff.algorithms.base import BuildContext
from fedmask_tff.wire.client_state import ArrayStateStore
from fedmask_tff.algorithms.evaluation import dataset_metrics

SPEC = collections.OrderedDict(x=tf.TensorSpec([None, 28, 28, 1], tf.float32),
                               y=tf.TensorSpec([None], tf.int32))
SHAPES = [(784, 50), (50, 50), (50, 10)]
TRAIN_SIZES, TEST_SIZES = (20, 40, 60), (7, 12, 9)
LOCAL_EPOCHS = 2


def context(local_epochs=LOCAL_EPOCHS):
  return BuildContext(input_shape=(28, 28, 1), num_classes=10, model="mlp", model_width=0.25,
                      seed=0, element_spec=SPEC, eval_element_spec=SPEC,
                      local_epochs=local_epochs, learning_rate=30.0, batch_size=8)


def datasets(sizes, seed, batch=8):
  rng = np.random.default_rng(seed)
  out = []
  for n in sizes:
    x = rng.standard_normal((n, 28, 28, 1)).astype(np.float32)
    y = rng.integers(0, 10, n).astype(np.int32)
    out.append(tf.data.Dataset.from_tensor_slices(collections.OrderedDict(x=x, y=y)).batch(batch))
  return out


@pytest.fixture(scope="module")
def alg(tff_context):
  return lg_fedavg.build_lg_fedavg(context(), global_layers=2)


def as_np(ws):
  return [np.asarray(w) for w in ws]


def test_layer_split_and_initial_state(alg):
  model = context().dense_model_fn()()
  local, glob = lg_fedavg.split_layers(model, 2)
  assert [tuple(v.shape) for v in local] == SHAPES[:1]
  assert [tuple(v.shape) for v in glob] == SHAPES[1:]
  init = alg.initial_client_state()
  assert isinstance(init, tuple) and len(init) == 1
  np.testing.assert_array_equal(init[0], model.weights[0].numpy())  # seeded: same every call
  np.testing.assert_array_equal(init[0], alg.initial_client_state()[0])
  server = alg.initialize()
  assert [np.asarray(w).shape for w in server] == SHAPES[1:]
  np.testing.assert_array_equal(np.asarray(server[0]), model.weights[1].numpy())
  assert alg.global_parameters == 50 * 50 + 50 * 10
  assert alg.local_parameters == 784 * 50
  assert alg.model_parameters == 784 * 50 + 50 * 50 + 50 * 10


def test_bits_are_global_elements_only(alg, tff_context):
  state = alg.initialize()
  states = [alg.initial_client_state() for _ in TRAIN_SIZES]
  _, _, metrics = alg.next(state, datasets(TRAIN_SIZES, 0), states)
  for m in metrics:
    assert m["uplink_bits"] == m["downlink_bits"] == 32 * (2500 + 500) == 96_000
  one = lg_fedavg.build_lg_fedavg(context(), global_layers=1)
  _, _, metrics = one.next(one.initialize(), datasets(TRAIN_SIZES[:1], 0), [one.initial_client_state()])
  assert metrics[0]["uplink_bits"] == metrics[0]["downlink_bits"] == 32 * 500


def test_global_layers_are_the_example_weighted_mean(alg):
  state = alg.initialize()
  init = alg.initial_client_state()
  data = datasets(TRAIN_SIZES, 1)
  trained, weights = [], []
  for ds in data:
    _, weighted, n, _ = alg.process.client_update(ds, tuple(state), init)
    weights.append(float(n))
    trained.append([np.asarray(w) / float(n) for w in weighted])
  assert weights == [LOCAL_EPOCHS * n for n in TRAIN_SIZES]
  expected = [sum(n * t[i] for n, t in zip(weights, trained)) / sum(weights) for i in range(2)]
  new_state, _, metrics = alg.next(state, data, [init] * 3)
  for got, want in zip(as_np(new_state), expected):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # Not simply the unweighted mean (the clients differ in size and in what they learnt).
  unweighted = sum(t[0] for t in trained) / 3
  assert np.abs(unweighted - expected[0]).max() > 1e-6


def test_local_layers_persist_and_differ_between_clients(alg):
  state0 = alg.initialize()
  init = alg.initial_client_state()
  data1, data2 = datasets(TRAIN_SIZES, 2), datasets(TRAIN_SIZES, 3)
  state1, locals1, _ = alg.next(state0, data1, [init] * 3)
  # After round 1 every client's local layer moved, and differently.
  for s in locals1:
    assert np.abs(s[0] - init[0]).max() > 1e-6
  assert np.abs(locals1[0][0] - locals1[1][0]).max() > 1e-6
  # Round 2 starts from each client's own round-1 layers: the same as client_update from them ...
  state2, locals2, _ = alg.next(state1, data2, locals1)
  for ds, start, got in zip(data2, locals1, locals2):
    from_own, _, _, _ = alg.process.client_update(ds, tuple(state1), start)
    from_init, _, _, _ = alg.process.client_update(ds, tuple(state1), init)
    np.testing.assert_allclose(got[0], np.asarray(from_own[0]), rtol=1e-5, atol=1e-6)
    assert np.abs(got[0] - np.asarray(from_init[0])).max() > 1e-5  # ... not from the initial ones.
  assert [np.asarray(w).shape for w in state2] == SHAPES[1:]


def test_states_round_trip_through_the_store(alg, tmp_path):
  store = alg.make_store(str(tmp_path))
  assert isinstance(store, ArrayStateStore)
  _, locals1, _ = alg.next(alg.initialize(), datasets(TRAIN_SIZES[:1], 4),
                           [alg.initial_client_state()])
  store.put("c0", locals1[0])
  np.testing.assert_array_equal(store.get("c0")[0], locals1[0][0])
  np.testing.assert_array_equal(store.get("never")[0], alg.initial_client_state()[0])


def test_two_rounds_flops_and_personal_evaluation(alg):
  state = alg.initialize()
  states = [alg.initial_client_state() for _ in TRAIN_SIZES]
  model = context().dense_model_fn()()
  for r in range(2):
    state, states, metrics = alg.next(state, datasets(TRAIN_SIZES, 10 + r), states)
    assert len(metrics) == len(states) == 3
    for m, n in zip(metrics, TRAIN_SIZES):
      assert m["examples"] == LOCAL_EPOCHS * n
      assert m["train_flops"] == costs.train_flops(costs.weight_costs(model), LOCAL_EPOCHS * n)
      assert np.isfinite(m["loss_sum"]) and m["loss_sum"] > 0
  test = datasets(TEST_SIZES, 20)
  out = alg.evaluate(state, test, states, datasets(TRAIN_SIZES, 21))
  assert [m["examples"] for m in out] == list(TEST_SIZES)
  # Each client is evaluated with its own local layer plus the global ones (eager Keras check).
  for m, s, ds in zip(out, states, test):
    model.set_weights([s[0]] + as_np(state))
    want = dataset_metrics(model, ds)
    assert m["correct"] == float(want["correct"])
    assert m["loss_sum"] == pytest.approx(float(want["loss_sum"]), rel=1e-5)
  # With another client's local layer the metrics change.
  swapped = alg.evaluate(state, test[:1], [states[1]], None)
  assert swapped[0]["loss_sum"] != pytest.approx(out[0]["loss_sum"], rel=1e-6)


@pytest.mark.parametrize("bad", [0, 4, -1, 2.5, True, "2"])
def test_bad_global_layers_raise(bad):
  with pytest.raises(ValueError, match="global_layers"):
    lg_fedavg.build_lg_fedavg(context(), global_layers=bad)


def test_all_layers_global_is_allowed(tff_context):
  alg = lg_fedavg.build_lg_fedavg(context(local_epochs=1), global_layers=3)
  assert alg.initial_client_state() == ()
  assert alg.settings["global_layers"] == 3 and alg.local_parameters == 0


# --- Misbehaving clients: a diverged client contributes nothing; malformed uploads are dropped ---


def nan_dataset(seed, n, batch=8):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n, 28, 28, 1)).astype(np.float32)
  x[1, 5, 5, 0] = np.nan  # one NaN feature: the loss and the weights are NaN
  y = rng.integers(0, 10, n).astype(np.int32)
  return tf.data.Dataset.from_tensor_slices(collections.OrderedDict(x=x, y=y)).batch(batch)


def test_a_diverged_client_keeps_its_local_layers_and_is_dropped(alg):
  state = alg.initialize()
  init = alg.initial_client_state()
  own = (init[0] + np.float32(0.01),)  # the diverged client's own (non-initial) local layers
  good = datasets(TRAIN_SIZES[:2], 30)
  with_bad, locals_bad, metrics = alg.next(state, good + [nan_dataset(31, 24)], [init, init, own])
  without, locals_ref, _ = alg.next(state, good, [init, init])
  for got, want in zip(as_np(with_bad), as_np(without)):
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  for got, want in zip(locals_bad[:2], locals_ref):
    assert np.all(np.isfinite(got[0]))
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(locals_bad[2][0], own[0])  # kept as it was
  assert [m["diverged"] for m in metrics] == [0, 0, 1]
  assert [m["upload_valid"] for m in metrics] == [1, 1, 1]  # zeros are a valid upload
  assert all(type(m["diverged"]) is int and type(m["upload_valid"]) is int for m in metrics)
  assert metrics[2]["examples"] == 0 and metrics[2]["loss_sum"] == 0
  assert metrics[2]["uplink_bits"] == 96_000
  model = context().dense_model_fn()()
  assert metrics[2]["train_flops"] == costs.train_flops(costs.weight_costs(model), LOCAL_EPOCHS * 24)
  # Only the diverged client: the global layers are unchanged.
  alone, locals_alone, metrics = alg.next(state, [nan_dataset(32, 16)], [init])
  for got, want in zip(as_np(alone), as_np(state)):
    np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(locals_alone[0][0], init[0])
  assert metrics[0]["diverged"] == 1


def test_server_rejects_non_finite_uploads(alg):
  good = tuple(np.ones(s, np.float32) for s in SHAPES[1:])
  weighted, examples, valid = alg.process.decode_upload(good, np.float32(3))
  assert int(valid) == 1 and float(examples) == 3
  bad = (good[0], np.where(np.eye(50, 10) > 0, np.nan, 1.0).astype(np.float32))
  for upload, n in ((bad, 3.0), (good, np.inf), (good, -2.0)):
    weighted, examples, valid = alg.process.decode_upload(upload, np.float32(n))
    assert int(valid) == 0 and float(examples) == 0
    assert not any(np.asarray(w).any() for w in weighted)
