"""Tests of the FedMask iterative process on TFF (fedmask_tff.algorithms.fedmask.process).

A tiny model (8 inputs -> 16 -> 12 -> 3, all MaskedDense) and four clients with
16 examples each keep every TFF call well under a second. The aggregation done
inside ``next`` is reproduced independently: ``client_update`` is called per
client, the uploaded binary masks are aggregated with the pure numpy rule
(:func:`fedmask_tff.masks.aggregation.aggregate_masks`) and the restarted scores
compared with what ``next`` returns for the same inputs.
"""

from __future__ import annotations

import collections

import numpy as np
import pytest
import tensorflow as tf

from fedmask_tff.masks import aggregation, pruning
from fedmask_tff.wire import bitpack
from fedmask_tff.algorithms import fedmask
from fedmask_tff.masks.layers import mask_variables
from fedmask_tff.masks.masking import scores_from_mask_values
from helpers import (CONFIG, ELEMENT_SPEC, KEPT, NUM_CLIENTS, PRUNABLE, PRUNE_RATE, SHAPES,
                     fedmask_evaluate, fedmask_next, make_data, model_fn, np_state, to_datasets)


@pytest.fixture(scope="module")
def process(tff_context):
  return fedmask.build_fedmask_process(model_fn, ELEMENT_SPEC, CONFIG)


@pytest.fixture(scope="module")
def data():
  return make_data()


@pytest.fixture(scope="module")
def two_rounds(process, data):
  """Runs two rounds from the initial states; returns everything they produced."""
  datasets = to_datasets(data)
  s0 = process.initialize()
  states0 = [process.initial_client_state() for _ in range(NUM_CLIENTS)]
  s1, states1, metrics1 = fedmask_next(process, s0, datasets, states0)
  s2, states2, metrics2 = fedmask_next(process, s1, datasets, states1)
  return dict(server=[s0, s1, s2], states=[states0, [np_state(s) for s in states1],
                                           [np_state(s) for s in states2]],
              metrics=[None, metrics1, metrics2])


# ----------------------------------------------------------------- set-up ---

def test_specs_and_initial_state(process):
  assert [s.shape for s in process.specs] == SHAPES
  assert [s.prunable for s in process.specs] == PRUNABLE
  assert [s.name for s in process.specs] == ["d1/kernel", "d2/kernel", "d3/kernel"]
  init = process.initial_client_state()
  assert int(init["rounds"]) == 0
  for s, k, p, shape in zip(init["scores"], init["keep"], init["personal"], SHAPES):
    assert s.shape == k.shape == p.shape == shape
    assert np.all(s == np.float32(0.05)) and np.all(k == 1) and np.all(p == 1)


def test_server_state_counts_rounds(two_rounds):
  assert [int(s) for s in two_rounds["server"]] == [0, 1, 2]


# ------------------------------------------------------------- first round ---

def test_first_round_prunes_exactly_k(two_rounds):
  for state in two_rounds["states"][1]:
    assert int(state["rounds"]) == 1
    for keep, shape, prunable, kept in zip(state["keep"], SHAPES, PRUNABLE, KEPT):
      assert keep.shape == shape
      assert set(np.unique(keep)) <= {0.0, 1.0}
      n = int(np.prod(shape))
      assert int(keep.sum()) == kept
      if prunable:
        assert kept == pruning.kept_count(n, PRUNE_RATE) < n
      else:
        assert np.all(keep == 1)
  # Different data, different pruning: the clients do not all keep the same elements.
  keeps = np.stack([s["keep"][1] for s in two_rounds["states"][1]])
  assert not np.all(keeps == keeps[0])


def test_pruning_is_for_good(two_rounds):
  for s1, s2 in zip(two_rounds["states"][1], two_rounds["states"][2]):
    assert int(s2["rounds"]) == 2
    for k1, k2, p2 in zip(s1["keep"], s2["keep"], s2["personal"]):
      np.testing.assert_array_equal(k1, k2)
      assert np.all(p2[k2 == 0] == 0)  # a pruned element's mask stays 0


def test_pruned_metric(two_rounds):
  assert [int(m["train"]["pruned"]) for m in two_rounds["metrics"][1]] == [1] * NUM_CLIENTS
  assert [int(m["train"]["pruned"]) for m in two_rounds["metrics"][2]] == [0] * NUM_CLIENTS


def test_examples_and_loss_metrics(two_rounds):
  # Round 1: the pruning epoch plus one local epoch; round 2: one epoch.
  assert [float(m["train"]["examples"]) for m in two_rounds["metrics"][1]] == [32.0] * NUM_CLIENTS
  assert [float(m["train"]["examples"]) for m in two_rounds["metrics"][2]] == [16.0] * NUM_CLIENTS
  for r in (1, 2):
    for m, state in zip(two_rounds["metrics"][r], two_rounds["states"][r]):
      assert np.isfinite(float(m["train"]["loss_sum"])) and float(m["train"]["loss_sum"]) > 0
      assert float(m["train"]["mask_kept"]) == sum(KEPT)
      assert float(m["train"]["mask_ones"]) == sum(float(p.sum()) for p in state["personal"])


# --------------------------------------------------------- communication ---

def test_uplink_bits(two_rounds):
  masks_bits = sum(8 * ((int(np.prod(s)) + 7) // 8) for s in SHAPES)
  keep_bits = sum(8 * ((int(np.prod(s)) + 7) // 8) for s, p in zip(SHAPES, PRUNABLE) if p)
  assert (masks_bits, keep_bits) == (128 + 192 + 40, 192 + 40)
  assert [int(m["train"]["uplink_bits"]) for m in two_rounds["metrics"][1]] == \
      [masks_bits + keep_bits] * NUM_CLIENTS == [592] * NUM_CLIENTS
  assert [int(m["train"]["uplink_bits"]) for m in two_rounds["metrics"][2]] == \
      [masks_bits] * NUM_CLIENTS == [360] * NUM_CLIENTS


def test_downlink_bits(two_rounds):
  for r in (1, 2):
    for m, state in zip(two_rounds["metrics"][r], two_rounds["states"][r]):
      kept = sum(int(k.sum()) for k in state["keep"])
      assert int(m["downlink_bits"]) == 32 * kept == 32 * 197


# ------------------------------------------ aggregation matches the pure rule ---

@pytest.mark.parametrize("round_index", [0, 1])
def test_next_matches_pure_aggregation_rule(process, data, two_rounds, round_index):
  """Round 1 (keep uploaded) and round 2 (server's cached keep) from the same states."""
  datasets = to_datasets(data)
  states_in = two_rounds["states"][round_index]

  trained = []
  for c in range(NUM_CLIENTS):
    new_state, upload, metrics = process.client_update(datasets[c], states_in[c])
    new_state = np_state(new_state)
    trained.append(new_state)
    # The upload is the packed binary mask 1[score >= 0] * keep (tau = 0.5).
    for j, shape in enumerate(SHAPES):
      mask = (new_state["scores"][j] >= 0).astype(np.float32) * new_state["keep"][j]
      np.testing.assert_array_equal(new_state["personal"][j], mask)
      np.testing.assert_array_equal(np.asarray(upload["mask"][j]), bitpack.pack_bits_np(mask))
    prunable_keeps = [k for k, p in zip(new_state["keep"], PRUNABLE) if p]
    assert len(upload["keep"]) == 2
    for sent, keep in zip(upload["keep"], prunable_keeps):
      if round_index == 0:
        np.testing.assert_array_equal(np.asarray(sent), bitpack.pack_bits_np(keep))
      else:
        assert np.asarray(sent).size == 0
    assert int(metrics["pruned"]) == (1 if round_index == 0 else 0)

  server_state = two_rounds["server"][round_index]
  _, states_out, _ = fedmask_next(process, server_state, datasets, states_in)
  states_out = [np_state(s) for s in states_out]

  some_fractional = some_unshared = False
  for j in range(len(SHAPES)):
    masks = np.stack([t["personal"][j] for t in trained])
    keeps = np.stack([t["keep"][j] for t in trained])
    values = aggregation.aggregate_masks(masks, keeps)
    _, count = aggregation.mask_sums(masks, keeps)
    positions = aggregation.aggregated_positions(keeps, count) > 0
    some_fractional |= bool(np.any(positions & (values > 0) & (values < 1)))
    some_unshared |= bool(np.any((keeps > 0) & ~positions))
    for c in range(NUM_CLIENTS):
      own = trained[c]["scores"][j]
      out = states_out[c]["scores"][j]
      kept = keeps[c] > 0
      agg = positions[c]
      np.testing.assert_allclose(out[agg], scores_from_mask_values(values[c][agg]),
                                 rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(out[kept & ~agg], own[kept & ~agg], rtol=1e-6, atol=1e-7)
      # The received binary mask is the vote where aggregated, the client's own elsewhere.
      received = process.start_masks(None, states_out[c])[j]
      expected = np.where(agg, values[c] >= 0.5, masks[c]) * keeps[c]
      np.testing.assert_array_equal(received, expected)
  # The case is not degenerate: both branches of the rule are exercised.
  assert some_fractional and some_unshared

  for t, s in zip(trained, states_out):
    assert int(s["rounds"]) == int(t["rounds"]) == round_index + 1
    for a, b in zip(t["keep"] + t["personal"], s["keep"] + s["personal"]):
      np.testing.assert_array_equal(a, b)


def test_scores_actually_trained(two_rounds):
  # Guards the test above against a trivial pass: training moved the scores.
  for state in two_rounds["states"][1]:
    assert not all(np.allclose(s[k > 0], 0.05) for s, k in zip(state["scores"], state["keep"]))


# -------------------------------------------------------------- evaluation ---

def _numpy_metrics(x, y, scores, keep):
  model = model_fn()
  _, score_vars, keep_vars = mask_variables(model)
  for v, s in zip(score_vars, scores):
    v.assign(s)
  for v, k in zip(keep_vars, keep):
    v.assign(k)
  logits = model(x, training=False).numpy().astype(np.float64)
  log_probs = logits - logits.max(1, keepdims=True)
  log_probs -= np.log(np.exp(log_probs).sum(1, keepdims=True))
  return float((logits.argmax(1) == y).sum()), float(-log_probs[np.arange(len(y)), y].sum())


def test_evaluate_matches_keras_model(process, data, two_rounds):
  datasets = to_datasets(data)
  trained = [np_state(process.client_update(datasets[c], two_rounds["states"][1][c])[0])
             for c in range(NUM_CLIENTS)]
  # Held-out data of another size, with a ragged last batch.
  test_data = make_data(seed=1, n=13)
  results = fedmask_evaluate(process, to_datasets(test_data, batch=5), [t["personal"] for t in trained])
  assert len(results) == NUM_CLIENTS
  accuracies = set()
  for (x, y), t, r in zip(test_data, trained, results):
    correct, loss_sum = _numpy_metrics(x, y, t["scores"], t["keep"])
    assert float(r["examples"]) == 13.0
    assert float(r["correct"]) == correct
    np.testing.assert_allclose(float(r["loss_sum"]), loss_sum, rtol=1e-4)
    accuracies.add(correct)
  # The models differ between clients (not one constant prediction).
  assert len(accuracies) > 1 or len({float(r["loss_sum"]) for r in results}) > 1


def test_evaluate_initial_masks(process, data):
  # All-ones masks: the unmasked random network.
  x, y = data[0]
  ones = tuple(np.ones(s, np.float32) for s in SHAPES)
  r = fedmask_evaluate(process, to_datasets(data[:1]), [ones])[0]
  correct, loss_sum = _numpy_metrics(x, y, [np.full(s, 0.05, np.float32) for s in SHAPES], ones)
  assert float(r["correct"]) == correct and float(r["examples"]) == 16.0
  np.testing.assert_allclose(float(r["loss_sum"]), loss_sum, rtol=1e-4)


# --------------------------------------------------------------- soft mode ---

def test_soft_mask_mode_runs(tff_context, data, two_rounds):
  soft = fedmask.build_fedmask_process(lambda: model_fn("soft"), ELEMENT_SPEC, CONFIG)
  datasets = to_datasets(data)
  state, states, metrics = fedmask_next(soft, soft.initialize(), datasets,
                                     [soft.initial_client_state() for _ in range(NUM_CLIENTS)])
  assert int(state) == 1
  for s, m, ste_state in zip(states, metrics, two_rounds["states"][1]):
    s = np_state(s)
    assert int(s["rounds"]) == 1 and int(m["train"]["pruned"]) == 1
    assert [int(k.sum()) for k in s["keep"]] == KEPT
    assert all(np.all(np.isfinite(sc)) for sc in s["scores"])
    assert np.isfinite(float(m["train"]["loss_sum"]))
    assert int(m["train"]["uplink_bits"]) == 592 and int(m["downlink_bits"]) == 32 * 197
    # The soft forward pass trains differently from the straight-through one.
    assert not all(np.allclose(a, b) for a, b in zip(s["scores"], ste_state["scores"]))


# ----------------------------------------------------------- config errors ---

@pytest.mark.parametrize("config,match", [
    (fedmask.FedMaskConfig(prune_last_layers=4), "prune_last_layers"),
    (fedmask.FedMaskConfig(prune_last_layers=-1), "prune_last_layers"),
    (fedmask.FedMaskConfig(prune_rate=0.0), "prune_rate"),
    (fedmask.FedMaskConfig(prune_rate=1.5), "prune_rate"),
    (fedmask.FedMaskConfig(local_epochs=0), "local_epochs"),
    (fedmask.FedMaskConfig(learning_rate=float("nan")), "learning_rate"),
    (fedmask.FedMaskConfig(score_restart="mean"), "restart"),
    (fedmask.FedMaskConfig(min_shared=0), "min_shared"),
])
def test_config_errors(config, match):
  with pytest.raises(ValueError, match=match):
    fedmask.build_fedmask_process(model_fn, ELEMENT_SPEC, config)


def test_model_without_masked_layers():
  def plain():
    return tf.keras.Sequential([tf.keras.Input(shape=(8,)), tf.keras.layers.Dense(3)])
  with pytest.raises(ValueError, match="masked"):
    fedmask.build_fedmask_process(plain, ELEMENT_SPEC, fedmask.FedMaskConfig(prune_last_layers=0))


# --- Misbehaving clients: malformed uploads are dropped, diverged clients upload nothing ----------

def _valid_upload(rng, keep_sent=True):
  masks = [(rng.random(s) < 0.5).astype(np.float32) for s in SHAPES]
  keeps = [np.ones(s, np.float32) for s in SHAPES]
  upload = collections.OrderedDict(
      mask=tuple(bitpack.pack_bits_np(m) for m in masks),
      keep=tuple(bitpack.pack_bits_np(k) if keep_sent else np.zeros([0], np.uint8)
                 for k, p in zip(keeps, PRUNABLE) if p))
  return upload, masks, keeps


def test_a_valid_upload_decodes_to_its_sums(process):
  upload, masks, keeps = _valid_upload(np.random.default_rng(0))
  sums, valid = process.decode_upload(upload, tuple(keeps))
  assert int(valid) == 1
  for got, m in zip(sums["total"], masks):
    np.testing.assert_array_equal(got, m)


@pytest.mark.parametrize("corrupt", ["short_mask", "long_keep", "padding_bit", "bit_outside_keep"])
def test_malformed_uploads_are_dropped_from_the_aggregate(process, corrupt):
  rng = np.random.default_rng(1)
  upload, masks, keeps = _valid_upload(rng)
  mask, keep = list(upload["mask"]), list(upload["keep"])
  if corrupt == "short_mask":
    mask[0] = mask[0][:-1]
  elif corrupt == "long_keep":
    keep[0] = np.concatenate([keep[0], np.zeros(1, np.uint8)])
  elif corrupt == "padding_bit":  # 12 x 3 = 36 elements: bits 36..39 of the last byte are padding
    last = mask[2].copy()
    last[-1] |= 0x80
    mask[2] = last
  elif corrupt == "bit_outside_keep":  # The client claims a 1 where its own pruning mask is 0.
    k = keeps[1].copy()
    k.reshape(-1)[0] = 0
    m = masks[1].copy()
    m.reshape(-1)[0] = 1
    mask[1] = bitpack.pack_bits_np(m)
    keep[0] = bitpack.pack_bits_np(k)
  bad = collections.OrderedDict(mask=tuple(mask), keep=tuple(keep))
  sums, valid = process.decode_upload(bad, tuple(keeps))
  assert int(valid) == 0
  for t, c in zip(sums["total"], sums["count"]):
    assert float(np.sum(t)) == 0 and float(np.sum(c)) == 0


def test_a_diverged_client_keeps_its_state_and_is_dropped(process, data):
  datasets = to_datasets(data)
  state = process.initial_client_state()
  state["scores"] = (np.full(SHAPES[0], np.nan, np.float32),) + tuple(state["scores"][1:])
  server = process.initialize()
  states = [state] + [process.initial_client_state() for _ in range(NUM_CLIENTS - 1)]
  _, new_states, metrics = fedmask_next(process, server, datasets, states)
  assert int(metrics[0]["train"]["diverged"]) == 1 and int(metrics[0]["upload_valid"]) == 0
  assert float(metrics[0]["train"]["examples"]) == 0.0
  assert int(new_states[0]["rounds"]) == 0  # unchanged
  assert [int(m["upload_valid"]) for m in metrics[1:]] == [1] * (NUM_CLIENTS - 1)
  assert all(np.all(np.isfinite(s)) for st in new_states[1:] for s in st["scores"])


def test_secure_aggregation_gives_identical_results(tff_context, data):
  """Sums through tff.federated_secure_sum_bitwidth: the same per-client results as the plain rule."""
  import dataclasses
  secure = fedmask.build_fedmask_process(model_fn, ELEMENT_SPEC,
                                         dataclasses.replace(CONFIG, secure_aggregation=True))
  plain = fedmask.build_fedmask_process(model_fn, ELEMENT_SPEC, CONFIG)
  assert "secure_sum_bitwidth" in str(secure.next.to_building_block())
  assert "secure_sum" not in str(plain.next.to_building_block())
  datasets = to_datasets(data)
  states_a = [plain.initial_client_state() for _ in range(NUM_CLIENTS)]
  states_b = [secure.initial_client_state() for _ in range(NUM_CLIENTS)]
  sa, sb = plain.initialize(), secure.initialize()
  for _ in range(2):
    sa, states_a, ma = fedmask_next(plain, sa, datasets, states_a)
    sb, states_b, mb = fedmask_next(secure, sb, datasets, states_b)
    for a, b in zip(states_a, states_b):
      for key in ("scores", "keep", "personal"):
        for x, y in zip(a[key], b[key]):
          np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert [int(m["downlink_bits"]) for m in ma] == [int(m["downlink_bits"]) for m in mb]


def _run(config, data, rounds=2):
  proc = fedmask.build_fedmask_process(model_fn, ELEMENT_SPEC, config)
  server, states = proc.initialize(), [proc.initial_client_state() for _ in range(NUM_CLIENTS)]
  for _ in range(rounds):
    server, states, metrics = fedmask_next(proc, server, to_datasets(data), states)
  return states, metrics


@pytest.mark.parametrize("bits", [2, 8])
def test_quantized_downlink_counts_its_bits_and_stays_close(tff_context, data, bits):
  import dataclasses
  from fedmask_tff.wire import quantization
  plain_states, plain = _run(CONFIG, data)
  q_states, q = _run(dataclasses.replace(CONFIG, downlink_bits=bits), data)
  for m in q:  # b bits per kept element, whole bytes per masked weight
    assert int(m["downlink_bits"]) == sum(8 * quantization.packed_size_bytes(k, bits) for k in KEPT)
  assert [int(m["downlink_bits"]) for m in plain] == [32 * sum(KEPT)] * NUM_CLIENTS
  # Restarted scores differ at most by the quantization error of the averaged value.
  if bits == 8:
    diffs = [np.max(np.abs(a - b)) for sa, sb in zip(plain_states, q_states)
             for a, b in zip(sa["scores"], sb["scores"])]
    assert max(diffs) < 0.1


def test_ldp_randomizes_the_upload_not_the_personal_mask(tff_context, data):
  import dataclasses
  proc = fedmask.build_fedmask_process(model_fn, ELEMENT_SPEC,
                                       dataclasses.replace(CONFIG, ldp_epsilon=1.0))
  state = proc.initial_client_state()
  new_state, upload, _ = proc.client_update(to_datasets(data)[0], state)
  flipped, total = 0, 0
  for j, shape in enumerate(SHAPES):
    sent = bitpack.unpack_bits_np(np.asarray(upload["mask"][j]), shape)
    personal = np.asarray(new_state["personal"][j])
    keep = np.asarray(new_state["keep"][j])
    assert np.all(sent[keep == 0] == 0)
    flipped += int(np.sum((sent != personal)[keep > 0]))
    total += int(keep.sum())
  p = np.exp(1.0) / (1 + np.exp(1.0))
  assert abs(flipped / total - (1 - p)) < 5 * np.sqrt(p * (1 - p) / total)
  bad = dataclasses.replace(CONFIG, ldp_epsilon=-1.0)
  with pytest.raises(ValueError):
    bad.validate()
