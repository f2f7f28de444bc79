"""Tests of Per-FedAvg (fedmask_tff.algorithms.per_fedavg).

The step rule is checked against numpy on a linear softmax model (3 inputs,
2 classes, no bias), where the cross-entropy gradient is ``x^T (p - onehot) / n``;
the Hessian-free correction against an exact Hessian-vector product from
nested gradient tapes; evaluation against a manual adapt-then-test in numpy.
The runner-facing wrapper runs on a tiny MLP (width 0.25) and three clients.
"""

from __future__ import annotations

import collections

import numpy as np
import pytest
import tensorflow as tf

from fedmask_tff.models import costs
from fedmask_tff.algorithms import per_fedavg
from fedmask_tff.algorithms.base import BuildContext

LIN_SPEC = collections.OrderedDict(x=tf.TensorSpec([None, 3], tf.float32),
                                   y=tf.TensorSpec([None], tf.int32))
IMG_SPEC = collections.OrderedDict(x=tf.TensorSpec([None, 28, 28, 1], tf.float32),
                                   y=tf.TensorSpec([None], tf.int32))
W0 = np.array([[0.5, -0.3], [0.2, 0.1], [-0.4, 0.6]], np.float32)
ALPHA, BETA = 0.3, 0.2


def linear_model_fn():
  return tf.keras.Sequential([
      tf.keras.Input(shape=(3,)),
      tf.keras.layers.Dense(2, use_bias=False, kernel_initializer=tf.constant_initializer(W0)),
  ])


def np_loss_grad(w, x, y):
  """Mean cross-entropy of softmax(x @ w) and its gradient with respect to w."""
  logits = x.astype(np.float64) @ w.astype(np.float64)
  logits -= logits.max(axis=1, keepdims=True)
  p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
  loss = -np.mean(np.log(p[np.arange(len(y)), y]))
  p[np.arange(len(y)), y] -= 1.0
  return loss, x.T.astype(np.float64) @ p / len(y)


def np_metrics(w, x, y):
  logits = x.astype(np.float64) @ w.astype(np.float64)
  correct = float(np.sum(np.argmax(logits, 1) == y))
  loss, _ = np_loss_grad(w, x, y)
  return correct, float(len(y)), loss * len(y)


def lin_data(seed, n):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n, 3)).astype(np.float32)
  y = rng.integers(0, 2, n).astype(np.int32)
  return x, y


def lin_dataset(x, y, batch):
  return tf.data.Dataset.from_tensor_slices(collections.OrderedDict(x=x, y=y)).batch(batch)


def batch_of(x, y):
  return collections.OrderedDict(x=tf.constant(x), y=tf.constant(y))


# --- The step rule (eager, plain TF) --------------------------------------------------------------


def test_fo_step_matches_hand_computation():
  model = linear_model_fn()
  (x1, y1), (x2, y2) = lin_data(1, 4), lin_data(2, 5)
  new_w, loss_sum, n, passes = per_fedavg.per_fedavg_step(
      model, model.trainable_weights, [tf.constant(W0)], [batch_of(x1, y1), batch_of(x2, y2)],
      ALPHA, BETA, "fo")
  l1, g1 = np_loss_grad(W0, x1, y1)
  w_tmp = W0 - ALPHA * g1
  l2, g2 = np_loss_grad(w_tmp, x2, y2)
  np.testing.assert_allclose(new_w[0].numpy(), W0 - BETA * g2, rtol=1e-5, atol=1e-6)
  assert float(loss_sum) == pytest.approx(4 * l1 + 5 * l2, rel=1e-5)
  assert float(n) == 9 and float(passes) == 9


def exact_hvp(model, w, batch, v):
  """H(w; batch) v by differentiating <grad, v> (second-order tape)."""
  var = model.trainable_weights[0]
  var.assign(w)
  with tf.GradientTape() as outer:
    with tf.GradientTape() as inner:
      loss = per_fedavg.loss_fn(batch["y"], model(batch["x"]))
    g = inner.gradient(loss, var)
    gv = tf.reduce_sum(g * v)
  return outer.gradient(gv, var).numpy()


def test_finite_difference_hvp_matches_exact():
  model = linear_model_fn()
  batch = batch_of(*lin_data(3, 6))
  v = tf.constant(np.random.default_rng(4).standard_normal((3, 2)).astype(np.float32))
  fd = per_fedavg.hessian_vector_product_fd(model, model.trainable_weights, [tf.constant(W0)],
                                            batch, [v], 1e-3)[0].numpy()
  exact = exact_hvp(model, W0, batch, v)
  assert np.abs(exact).max() > 1e-2  # a non-trivial product
  np.testing.assert_allclose(fd, exact, atol=2e-3 * np.abs(exact).max())


def test_hf_step_uses_hessian_correction():
  model = linear_model_fn()
  (x1, y1), (x2, y2), (x3, y3) = lin_data(5, 4), lin_data(6, 4), lin_data(7, 4)
  b3 = batch_of(x3, y3)
  new_w, _, n, passes = per_fedavg.per_fedavg_step(
      model, model.trainable_weights, [tf.constant(W0)], [batch_of(x1, y1), batch_of(x2, y2), b3],
      ALPHA, BETA, "hf", 1e-3)
  _, g1 = np_loss_grad(W0, x1, y1)
  _, g2 = np_loss_grad(W0 - ALPHA * g1, x2, y2)
  hvp = exact_hvp(model, W0, b3, tf.constant(g2.astype(np.float32)))
  expected = W0 - BETA * (g2 - ALPHA * hvp)
  np.testing.assert_allclose(new_w[0].numpy(), expected, atol=1e-5)
  # The correction matters: the FO step lands elsewhere.
  assert np.abs(expected - (W0 - BETA * g2)).max() > 1e-4
  assert float(n) == 8 and float(passes) == 4 + 4 + 2 * 4


def test_group_batches_pairs_consecutive_batches_and_drops_remainder():
  x = np.arange(10, dtype=np.float32).reshape(10, 1)
  ds = tf.data.Dataset.from_tensor_slices(collections.OrderedDict(x=x, y=np.arange(10, dtype=np.int32)))
  groups = list(per_fedavg.group_batches(ds.batch(3), 2))  # batches 3,3,3,1 -> (3,3),(3,1)
  assert len(groups) == 2
  parts = [per_fedavg.split_group(g, 2) for g in groups]
  assert [list(p["y"].numpy()) for p in parts[0]] == [[0, 1, 2], [3, 4, 5]]
  assert [list(p["y"].numpy()) for p in parts[1]] == [[6, 7, 8], [9]]
  assert [list(p["x"].numpy()[:, 0]) for p in parts[1]] == [[6, 7, 8], [9]]


def test_group_batches_incomplete_group_dropped():
  ds = tf.data.Dataset.from_tensor_slices(collections.OrderedDict(
      x=np.zeros((10, 1), np.float32), y=np.zeros(10, np.int32))).batch(4)  # 4, 4, 2
  assert len(list(per_fedavg.group_batches(ds, 2))) == 1
  assert len(list(per_fedavg.group_batches(ds, 3))) == 1
  assert len(list(per_fedavg.group_batches(ds, 4))) == 0


# --- The TFF process ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lin_process(tff_context):
  return per_fedavg.build_per_fedavg_process(linear_model_fn, LIN_SPEC, variant="fo", alpha=ALPHA,
                                             beta=BETA, local_epochs=1, adapt_steps=1)


def test_client_update_runs_the_hand_computed_steps(lin_process):
  # 4 batches of 3 -> two FO steps: (b0, b1), then (b2, b3).
  x, y = lin_data(8, 12)
  weighted, examples, metrics = lin_process.client_update(lin_dataset(x, y, 3), (W0,))
  w = W0.astype(np.float64)
  for s in (0, 6):
    _, g1 = np_loss_grad(w, x[s:s + 3], y[s:s + 3])
    _, g2 = np_loss_grad(w - ALPHA * g1, x[s + 3:s + 6], y[s + 3:s + 6])
    w = w - BETA * g2
  assert float(examples) == 12
  np.testing.assert_allclose(np.asarray(weighted[0]) / 12, w, rtol=1e-5, atol=1e-6)
  assert metrics["example_passes"] == 12
  assert metrics["uplink_bits"] == 32 * 6 and metrics["downlink_bits"] == 32 * 6


def test_next_is_the_example_weighted_mean(lin_process):
  datasets = [lin_dataset(*lin_data(9, 8), 2), lin_dataset(*lin_data(10, 12), 3)]
  trained = []
  for ds in datasets:
    weighted, n, _ = lin_process.client_update(ds, (W0,))
    trained.append((np.asarray(weighted[0]) / float(n), float(n)))
  assert [n for _, n in trained] == [8, 12]
  expected = (trained[0][0] * 8 + trained[1][0] * 12) / 20
  state = lin_process.initialize()
  np.testing.assert_allclose(np.asarray(state[0]), W0)
  new_state, metrics = lin_process.next(state, datasets)
  np.testing.assert_allclose(np.asarray(new_state[0]), expected, rtol=1e-5, atol=1e-6)
  assert [m["examples"] for m in metrics] == [8, 12]


def test_round_without_work_keeps_the_model(lin_process):
  # One batch per client: no FO step (two batches needed), zero examples, model unchanged.
  datasets = [lin_dataset(*lin_data(11, 3), 4)]
  state = lin_process.initialize()
  new_state, metrics = lin_process.next(state, datasets)
  np.testing.assert_array_equal(np.asarray(new_state[0]), W0)
  assert metrics[0]["examples"] == 0 and metrics[0]["example_passes"] == 0


@pytest.mark.parametrize("adapt_steps", [1, 2])
def test_evaluation_uses_the_adapted_weights(tff_context, adapt_steps):
  process = per_fedavg.build_per_fedavg_process(linear_model_fn, LIN_SPEC, alpha=ALPHA, beta=BETA,
                                                adapt_steps=adapt_steps)
  (xtr, ytr), (xte, yte) = lin_data(12, 5), lin_data(13, 9)
  # One training batch of 4 (then 1): adapt_steps=2 takes batches b0, b1.
  train = lin_dataset(xtr, ytr, 4)
  w = W0.astype(np.float64)
  for s in range(adapt_steps):
    _, g = np_loss_grad(w, xtr[4 * s:4 * s + 4], ytr[4 * s:4 * s + 4])
    w = w - ALPHA * g
  expected = np_metrics(w, xte, yte)
  state = process.initialize()
  adapted = process.adapt_and_evaluate(state, [lin_dataset(xte, yte, 4)], [train])[0]
  plain = process.evaluate_global(state, [lin_dataset(xte, yte, 4)])[0]
  assert adapted["examples"] == 9
  assert adapted["correct"] == expected[0]
  assert float(adapted["loss_sum"]) == pytest.approx(expected[2], rel=1e-5)
  assert float(plain["loss_sum"]) == pytest.approx(np_metrics(W0, xte, yte)[2], rel=1e-5)
  assert abs(float(adapted["loss_sum"]) - float(plain["loss_sum"])) > 1e-3


# --- The runner's interface -----------------------------------------------------------------------


def context(local_epochs=2, batch=8):
  return BuildContext(input_shape=(28, 28, 1), num_classes=10, model="mlp", model_width=0.25,
                      seed=0, element_spec=IMG_SPEC, eval_element_spec=IMG_SPEC,
                      local_epochs=local_epochs, learning_rate=30.0, batch_size=batch)


def img_datasets(sizes, seed, batch=8):
  rng = np.random.default_rng(seed)
  out = []
  for n in sizes:
    x = rng.standard_normal((n, 28, 28, 1)).astype(np.float32)
    y = rng.integers(0, 10, n).astype(np.int32)
    out.append(tf.data.Dataset.from_tensor_slices(collections.OrderedDict(x=x, y=y)).batch(batch))
  return out


TRAIN_SIZES, TEST_SIZES = (20, 40, 60), (7, 12, 9)
# Batches of 8: 20 -> 8,8,4; 40 -> 5 x 8; 60 -> 7 x 8 + 4. Two epochs are one stream of batches
# (a group may span the epochs' boundary), per round:
#   fo (pairs):   (8,8)(4,8)(8,4) | 5 x (8,8) | 8 pairs, 2 x 60
#                 -> examples = passes = 40, 80, 120
#   hf (triples): (8,8,4)(8,8,4) | 3 x (8,8,8) [8 left] | (8,8,8)(8,8,8)(8,4,8)(8,8,8)(8,8,8) [4 left]
#                 -> examples (D, D') 32, 48, 76; passes + 2 |D''|: 32+16=48 | 48+48=96 | 76+80=156
EXPECTED = {"fo": ([40, 80, 120], [40, 80, 120]), "hf": ([32, 48, 76], [48, 96, 156])}


@pytest.mark.parametrize("variant", ["fo", "hf"])
def test_wrapper_two_rounds_bits_flops_and_evaluation(tff_context, variant):
  ctx = context(local_epochs=2)
  alg = per_fedavg.build_per_fedavg(ctx, variant=variant)
  model = ctx.dense_model_fn()()
  params = sum(int(np.prod(v.shape)) for v in model.weights)
  assert alg.model_parameters == params == 784 * 50 + 50 * 50 + 50 * 10
  assert alg.initial_client_state() is None and alg.make_store("/nonexistent") is None
  state = alg.initialize()
  examples, passes = EXPECTED[variant]
  for r in range(2):
    state, client_states, metrics = alg.next(state, img_datasets(TRAIN_SIZES, r), None)
    assert client_states is None and len(metrics) == 3
    for m, n, p in zip(metrics, examples, passes):
      assert m["examples"] == n and m["example_passes"] == p
      assert m["uplink_bits"] == m["downlink_bits"] == 32 * params
      assert m["train_flops"] == costs.train_flops(costs.weight_costs(model), p)
      assert np.isfinite(m["loss_sum"]) and m["loss_sum"] > 0
  out = alg.evaluate(state, img_datasets(TEST_SIZES, 5), None, img_datasets(TRAIN_SIZES, 6))
  assert [m["examples"] for m in out] == list(TEST_SIZES)
  assert all(0 <= m["correct"] <= m["examples"] for m in out)
  extra = alg.evaluate_extra(state, img_datasets(TEST_SIZES, 5), None, img_datasets(TRAIN_SIZES, 6))
  assert [m["examples"] for m in extra["global"]] == list(TEST_SIZES)
  # Adaptation changes the model (loss differs from the unadapted global model).
  assert any(abs(a["loss_sum"] - g["loss_sum"]) > 1e-4 for a, g in zip(out, extra["global"]))
  assert alg.settings["variant"] == variant and alg.settings["hvp"] == "finite_difference"


@pytest.mark.parametrize("kwargs", [dict(variant="so"), dict(alpha=0.0), dict(beta=-1.0),
                                    dict(hf_delta=float("nan")), dict(adapt_steps=-1),
                                    dict(adapt_steps=1.5)])
def test_bad_settings_raise(kwargs):
  with pytest.raises(ValueError):
    per_fedavg.build_per_fedavg(context(), **kwargs)


def test_defaults_are_documented():
  assert per_fedavg.DEFAULT_ALPHA > 0 and per_fedavg.DEFAULT_BETA > 0
  assert per_fedavg.DEFAULT_HF_DELTA == 1e-3


def test_evaluation_with_no_training_data_is_the_global_model(lin_process):
  xte, yte = lin_data(14, 6)
  empty = lin_dataset(np.zeros((0, 3), np.float32), np.zeros(0, np.int32), 4)
  state = lin_process.initialize()
  adapted = lin_process.adapt_and_evaluate(state, [lin_dataset(xte, yte, 4)], [empty])[0]
  assert float(adapted["loss_sum"]) == pytest.approx(np_metrics(W0, xte, yte)[2], rel=1e-5)


def test_hf_client_update_in_tff_matches_the_eager_step(tff_context):
  process = per_fedavg.build_per_fedavg_process(linear_model_fn, LIN_SPEC, variant="hf",
                                                alpha=ALPHA, beta=BETA, hf_delta=1e-3)
  x, y = lin_data(15, 11)  # batches 4, 4, 3: one HF step
  weighted, examples, metrics = process.client_update(lin_dataset(x, y, 4), (W0,))
  model = linear_model_fn()
  batches = [batch_of(x[s:s + 4], y[s:s + 4]) for s in (0, 4, 8)]
  want, loss_sum, n, passes = per_fedavg.per_fedavg_step(
      model, model.trainable_weights, [tf.constant(W0)], batches, ALPHA, BETA, "hf", 1e-3)
  assert float(examples) == 8 and metrics["example_passes"] == 8 + 2 * 3
  np.testing.assert_allclose(np.asarray(weighted[0]) / 8, want[0].numpy(), rtol=1e-4, atol=1e-6)
  assert float(metrics["loss_sum"]) == pytest.approx(float(loss_sum), rel=1e-5)


# --- Misbehaving clients: a diverged client contributes nothing; malformed uploads are dropped ---


def nan_data(seed, n):
  x, y = lin_data(seed, n)
  x[0, 0] = np.nan  # one NaN feature: the loss and the new weights are NaN
  return x, y


def test_a_diverged_client_is_dropped_from_the_round(lin_process):
  state = lin_process.initialize()
  good = [lin_dataset(*lin_data(51, 8), 2), lin_dataset(*lin_data(52, 12), 3)]
  bad = lin_dataset(*nan_data(53, 8), 2)
  with_bad, metrics = lin_process.next(state, good + [bad])
  without, _ = lin_process.next(state, good)
  assert np.all(np.isfinite(np.asarray(with_bad[0])))
  np.testing.assert_allclose(np.asarray(with_bad[0]), np.asarray(without[0]), rtol=1e-6,
                             atol=1e-7)
  assert np.abs(np.asarray(without[0]) - W0).max() > 1e-4  # the round did move the model
  assert [int(m["diverged"]) for m in metrics] == [0, 0, 1]
  assert [int(m["upload_valid"]) for m in metrics] == [1, 1, 1]  # zeros are a valid upload
  assert float(metrics[2]["examples"]) == 0 and float(metrics[2]["loss_sum"]) == 0
  assert float(metrics[2]["example_passes"]) == 8  # the work it did is still counted
  assert int(metrics[2]["uplink_bits"]) == 32 * 6
  # Only the diverged client: the global model is unchanged.
  alone, metrics = lin_process.next(state, [bad])
  np.testing.assert_array_equal(np.asarray(alone[0]), W0)
  assert int(metrics[0]["diverged"]) == 1


def test_server_rejects_non_finite_uploads(lin_process):
  good = (np.full((3, 2), 2.0, np.float32),)
  weighted, examples, valid = lin_process.decode_upload(good, np.float32(4))
  assert int(valid) == 1 and float(examples) == 4
  np.testing.assert_array_equal(np.asarray(weighted[0]), good[0])
  inf = (np.where(np.eye(3, 2) > 0, np.inf, 1.0).astype(np.float32),)
  for upload, n in ((inf, 4.0), (good, np.nan), (good, -1.0)):
    weighted, examples, valid = lin_process.decode_upload(upload, np.float32(n))
    assert int(valid) == 0 and float(examples) == 0 and not np.asarray(weighted[0]).any()


def test_wrapper_passes_diverged_and_upload_valid_as_ints(tff_context):
  alg = per_fedavg.build_per_fedavg(context(local_epochs=1))
  data = img_datasets((16, 16), 7)
  rng = np.random.default_rng(8)
  x = rng.standard_normal((16, 28, 28, 1)).astype(np.float32)
  x[3, 0, 0, 0] = np.nan
  y = rng.integers(0, 10, 16).astype(np.int32)
  data.append(tf.data.Dataset.from_tensor_slices(collections.OrderedDict(x=x, y=y)).batch(8))
  state, _, metrics = alg.next(alg.initialize(), data, None)
  assert [m["diverged"] for m in metrics] == [0, 0, 1]
  assert [m["upload_valid"] for m in metrics] == [1, 1, 1]
  assert all(type(m["diverged"]) is int and type(m["upload_valid"]) is int for m in metrics)
  assert metrics[2]["examples"] == 0 and metrics[2]["loss_sum"] == 0
  assert all(np.all(np.isfinite(np.asarray(w))) for w in state)


def test_one_batch_an_epoch_still_steps_across_epochs(tff_context):
  """CIFAR-10's paper partition: 20 training examples, batch 32, one batch an epoch. The pairs
  (D, D') span the epochs, so 2 epochs are 1 FO step (before: none, and a round loss of 0/0)."""
  alg = per_fedavg.build_per_fedavg(context(local_epochs=2, batch=8))
  state = alg.initialize()
  new_state, _, metrics = alg.next(state, img_datasets((6,), 0), None)
  assert metrics[0]["examples"] == 12 and metrics[0]["example_passes"] == 12
  assert np.isfinite(metrics[0]["loss_sum"]) and metrics[0]["loss_sum"] > 0
  assert any(not np.array_equal(a, b) for a, b in zip(new_state, state))
