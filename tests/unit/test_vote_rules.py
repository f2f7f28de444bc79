"""The rules by which the vote moves a client's scores (fedmask_tff.masks.masking.apply_vote), checked
against numbers computed by hand, and their use inside the FedMask process: persistent rules,
the 1-bit downlink, the random score start, and the local_masks ablation."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import tensorflow as tf

from fedmask_tff.masks import aggregation, masking, vote_rules
from fedmask_tff.algorithms import fedmask

# One client's scores and the vote it received (-1: not averaged, "keep yours").
SCORES = np.array([0.3, -0.2, 0.8, -0.6, 0.1, -0.1], np.float32)
RECEIVED = np.array([1.0, 1.0, 0.25, 0.0, -1.0, 0.5], np.float32)
# Own bits: 1, 0, 1, 0, (1), 0. Vote decisions 1[v >= 0.5]: 1, 1, 0, 0, -, 1.
# Disagreements at positions 1 (own 0, vote 1), 2 (own 1, vote 0) and 5 (own 0, vote 0.5 -> 1).

HAND = {
    # scaled_logit, scale 0.1: 0.1 * logit(clip(v, 0.01, 0.99)); logit(0.99) = 4.59512,
    # logit(0.25) = -1.09861, logit(0.5) = 0; element 4 keeps its own score.
    ("scaled_logit", 0.1): [0.459512, 0.459512, -0.109861, -0.459512, 0.1, 0.0],
    # linear, scale 0.1: 0.4 * (v - 0.5).
    ("linear", 0.1): [0.2, 0.2, -0.1, -0.2, 0.1, 0.0],
    # vote_shift, scale 0.5: s + 0.5 * (2v - 1) wherever averaged (agreement reinforces).
    ("vote_shift", 0.5): [0.8, 0.3, 0.55, -1.1, 0.1, -0.1],
    # disagree_shift, scale 0.5: only at 1, 2, 5: -0.2 + 0.5, 0.8 - 0.25, -0.1 + 0.
    ("disagree_shift", 0.5): [0.3, 0.3, 0.55, -0.6, 0.1, -0.1],
    # disagree_restart, scale 0.1: scaled_logit at 1, 2, 5; own scores elsewhere.
    ("disagree_restart", 0.1): [0.3, 0.459512, -0.109861, -0.6, 0.1, 0.0],
}


@pytest.mark.parametrize("rule,scale", sorted(HAND))
def test_rules_against_hand_computed_values(rule, scale):
  expected = np.array(HAND[(rule, scale)], np.float32)
  out_np = masking.apply_vote(SCORES, RECEIVED, rule, scale)
  np.testing.assert_allclose(out_np, expected, atol=1e-5)
  out_tf = tf.function(lambda s, r: masking.apply_vote(s, r, rule, scale))(
      tf.constant(SCORES), tf.constant(RECEIVED))
  np.testing.assert_allclose(out_tf.numpy(), expected, atol=1e-5)


@pytest.mark.parametrize("rule", vote_rules.PERSISTENT_RULES)
def test_persistent_rules_never_touch_elements_that_were_not_averaged(rule):
  received = np.full_like(SCORES, -1.0)
  np.testing.assert_array_equal(masking.apply_vote(SCORES, received, rule, 0.3), SCORES)


@pytest.mark.parametrize("rule", ["disagree_shift", "disagree_restart"])
def test_a_vote_equal_to_the_clients_own_mask_leaves_its_scores_unchanged(rule):
  own = (SCORES >= 0).astype(np.float32)
  np.testing.assert_array_equal(masking.apply_vote(SCORES, own, rule, 0.7), SCORES)


def test_overwrite_rules_replace_even_an_agreeing_vote():
  own = (SCORES >= 0).astype(np.float32)
  out = masking.apply_vote(SCORES, own, "scaled_logit", 0.1)
  np.testing.assert_allclose(np.abs(out), 0.459512, atol=1e-5)  # the evidence is gone


def test_disagree_restart_takes_the_votes_decision():
  out = masking.apply_vote(SCORES, RECEIVED, "disagree_restart", 0.1)
  averaged = RECEIVED >= 0
  np.testing.assert_array_equal((out >= 0)[averaged], (RECEIVED >= 0.5)[averaged])


@pytest.mark.parametrize("kwargs,match", [(dict(rule="mean"), "rule"), (dict(scale=0.0), "scale"),
                                          (dict(scale=float("inf")), "scale"), (dict(eps=0.5), "eps")])
def test_bad_rule_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    masking.apply_vote(SCORES, RECEIVED, **kwargs)


def test_rule_scale_defaults():
  assert vote_rules.rule_scale("scaled_logit") == 0.1
  assert vote_rules.rule_scale("disagree_shift", 2.0) == 2.0
  with pytest.raises(ValueError, match="rule"):
    vote_rules.rule_scale("nope")


# ------------------------------------------------------------- in the process ---

from helpers import (CONFIG, ELEMENT_SPEC, KEPT, NUM_CLIENTS, fedmask_next,  # noqa: E402
                     model_fn, to_datasets)


@pytest.fixture(scope="module")
def data():
  from helpers import make_data
  return make_data()


def _round(config, data, states=None, process=None):
  process = process or fedmask.build_fedmask_process(model_fn, ELEMENT_SPEC, config)
  states = states or [process.initial_client_state() for _ in range(NUM_CLIENTS)]
  trained = [process.client_update(ds, st) for ds, st in zip(to_datasets(data), states)]
  server, new_states, metrics = fedmask_next(process, process.initialize(), to_datasets(data), states)
  return process, trained, new_states, metrics


@pytest.mark.parametrize("rule", ["disagree_shift", "vote_shift"])
def test_process_applies_the_persistent_rule_to_the_clients_own_trained_scores(tff_context, data, rule):
  config = dataclasses.replace(CONFIG, score_restart=rule, restart_scale=0.25)
  _, trained, new_states, _ = _round(config, data)
  masks = [np.stack([np.asarray(t[0]["personal"][i]) for t in trained]) for i in range(3)]
  keeps = [np.stack([np.asarray(t[0]["keep"][i]) for t in trained]) for i in range(3)]
  for i in range(3):
    total, count = aggregation.mask_sums(masks[i], keeps[i])
    for c in range(NUM_CLIENTS):
      keep = keeps[i][c]
      shared = (keep > 0) & (count >= 2)
      received = np.where(shared, total / np.maximum(count, 1), -1.0).astype(np.float32)
      expected = masking.apply_vote(np.asarray(trained[c][0]["scores"][i]), received, rule, 0.25)
      np.testing.assert_allclose(np.asarray(new_states[c]["scores"][i]), expected, atol=1e-5)
      # Pruned elements stay zero in the personal mask and the scores' mask.
      assert np.all(np.asarray(new_states[c]["personal"][i])[keep == 0] == 0)


def test_one_bit_downlink_sends_one_bit_per_kept_element(tff_context, data):
  config = dataclasses.replace(CONFIG, downlink_bits=1, score_restart="disagree_shift",
                               restart_scale=0.25)
  _, trained, new_states, metrics = _round(config, data)
  for m in metrics:  # packed per masked weight: whole bytes of the kept elements
    assert int(m["downlink_bits"]) == sum(8 * math.ceil(k / 8) for k in KEPT) == 8 * (16 + 8 + 2)
  # The client receives the vote's decision where averaged and its own bit elsewhere.
  masks = [np.stack([np.asarray(t[0]["personal"][i]) for t in trained]) for i in range(3)]
  keeps = [np.stack([np.asarray(t[0]["keep"][i]) for t in trained]) for i in range(3)]
  for i in range(3):
    total, count = aggregation.mask_sums(masks[i], keeps[i])
    for c in range(NUM_CLIENTS):
      keep, own = keeps[i][c], masks[i][c]
      shared = (keep > 0) & (count >= 2)
      decision = np.where(shared, (total / np.maximum(count, 1) >= 0.5), own).astype(np.float32)
      received = np.where(keep > 0, decision, -1.0).astype(np.float32)
      expected = masking.apply_vote(np.asarray(trained[c][0]["scores"][i]), received,
                                    "disagree_shift", 0.25)
      np.testing.assert_allclose(np.asarray(new_states[c]["scores"][i]), expected, atol=1e-5)


def test_one_bit_downlink_refuses_stochastic_rounding():
  with pytest.raises(ValueError, match="downlink_stochastic"):
    dataclasses.replace(CONFIG, downlink_bits=1, downlink_stochastic=True).validate()


def test_score_init_noise_gives_a_seeded_random_start_around_the_threshold(tff_context):
  config = dataclasses.replace(CONFIG, score_init_noise=0.2, seed=3)
  a = fedmask.build_fedmask_process(model_fn, ELEMENT_SPEC, config).initial_client_state()
  b = fedmask.build_fedmask_process(model_fn, ELEMENT_SPEC, config).initial_client_state()
  for sa, sb, p in zip(a["scores"], b["scores"], a["personal"]):
    np.testing.assert_array_equal(sa, sb)  # same seed, same start, for every client
    assert np.all(np.abs(sa - 0.05) <= 0.2 + 1e-6) and np.std(sa) > 0.05
    np.testing.assert_array_equal(p, (sa >= 0).astype(np.float32))
  assert 0.2 < np.mean(np.concatenate([p.ravel() for p in a["personal"]])) < 0.9
  with pytest.raises(ValueError, match="score_init_noise"):
    dataclasses.replace(CONFIG, score_init_noise=-1.0).validate()


def test_score_sign_upload_steps_the_servers_scores_by_the_majority(tff_context, data):
  """upload='score_sign': a client starts from the server's scores G where it keeps the element,
  uploads 1[m_r(after) > m_r(start)] (a fair coin where training did not move it), and the
  server steps G by step * (2v - 1) where at least two clients keep the element; each client
  keeps its own trained scores and mask."""
  config = dataclasses.replace(CONFIG, upload="score_sign", server_score_step=0.1,
                               personal_head=False)
  process = fedmask.build_fedmask_process(model_fn, ELEMENT_SPEC, config)
  server0 = process.initialize()
  assert int(server0["round"]) == 0
  g0 = [np.asarray(g) for g in server0["scores"]]
  assert all(np.all(g == np.float32(0.05)) for g in g0)
  states0 = [process.initial_client_state() for _ in range(NUM_CLIENTS)]
  trained = [process.client_update(ds, st)[0] for ds, st in zip(to_datasets(data), states0)]
  server1, states1, metrics = fedmask_next(process, server0, to_datasets(data), states0)
  assert int(server1["round"]) == 1
  for i in range(3):
    keeps = np.stack([np.asarray(t["keep"][i]) for t in trained])
    ups = np.stack([(np.asarray(t["scores"][i]) > g0[i]) * np.asarray(t["keep"][i]) for t in trained])
    tied = np.stack([(np.asarray(t["scores"][i]) == g0[i]) * np.asarray(t["keep"][i])
                     for t in trained]).sum(0) > 0
    count = keeps.sum(0)
    vote = np.divide(ups.sum(0), count, out=np.zeros_like(count), where=count > 0)
    expected = g0[i] + np.where(count >= 2, 0.1 * (2 * vote - 1), 0.0)
    got = np.asarray(server1["scores"][i])
    np.testing.assert_allclose(got[~tied], expected[~tied], atol=1e-6)  # the coins aside
    assert np.all(np.abs(got - g0[i]) <= 0.1 + 1e-6)
    for c in range(NUM_CLIENTS):  # no restart: the client's own trained scores persist
      np.testing.assert_allclose(np.asarray(states1[c]["scores"][i]),
                                 np.asarray(trained[c]["scores"][i]), atol=1e-6)
  total = sum(int(np.prod(s)) for s in [(8, 16), (16, 12), (12, 3)])
  # Round 1: G for every element (before pruning) as float32; uplink 1 bit per element + keep.
  assert [int(m["downlink_bits"]) for m in metrics] == [32 * total] * NUM_CLIENTS
  assert [int(m["train"]["uplink_bits"]) for m in metrics] == [592] * NUM_CLIENTS
  # Round 2: a client starts from G at its kept positions; G at the kept positions goes down.
  server2, states2, metrics2 = fedmask_next(process, server1, to_datasets(data), states1)
  assert [int(m["downlink_bits"]) for m in metrics2] == [32 * sum(KEPT)] * NUM_CLIENTS
  assert int(server2["round"]) == 2


def test_score_sign_unmoved_elements_send_coins_not_decreases(tff_context, data):
  """An element local training did not move carries no evidence: it must not be voted down.
  (With 1[after > start] every client voted every unmoved element down, the server stepped the
  inactive channels down every round, and newcomers' first layers died: accuracy 0.000.)"""
  config = dataclasses.replace(CONFIG, upload="score_sign", server_score_step=0.1,
                               personal_head=False, learning_rate=1e-12)  # nothing moves
  process = fedmask.build_fedmask_process(model_fn, ELEMENT_SPEC, config)
  server0 = process.initialize()
  states0 = [process.initial_client_state() for _ in range(NUM_CLIENTS)]
  server1, _, _ = fedmask_next(process, server0, to_datasets(data), states0)
  step = np.concatenate([(np.asarray(g1) - np.asarray(g0)).ravel()
                         for g1, g0 in zip(server1["scores"], server0["scores"])])
  # Coins from 4 clients: the steps are 0.1 * (2v - 1), v in {0, 1/4, ..., 1}, averaging ~0;
  # the old rule gave -0.1 everywhere.
  assert abs(float(step.mean())) < 0.03 and float(step.max()) > 0.0


def test_score_sign_refuses_a_one_bit_downlink():
  with pytest.raises(ValueError, match="score_sign"):
    dataclasses.replace(CONFIG, upload="score_sign", downlink_bits=1).validate()
  with pytest.raises(ValueError, match="upload"):
    dataclasses.replace(CONFIG, upload="delta").validate()


@pytest.mark.parametrize("weight,head", [(1.0, False), (0.5, False), (0.5, True)])
def test_start_from_global_mixes_by_weight_at_kept_positions(tff_context, weight, head):
  config = dataclasses.replace(CONFIG, upload="score_sign", global_weight=weight, personal_head=head)
  process = fedmask.build_fedmask_process(model_fn, ELEMENT_SPEC, config)
  state = process.initial_client_state()
  rng = np.random.default_rng(0)
  own = tuple(rng.normal(size=s.shape).astype(np.float32) for s in state["scores"])
  keep = tuple((rng.random(s.shape) < 0.5).astype(np.float32) for s in state["scores"])
  g = tuple(rng.normal(size=s.shape).astype(np.float32) for s in state["scores"])
  state = dict(state, scores=own, keep=keep)
  out = process.start_from_global(g, state)
  for i, prunable in enumerate([False, True, True]):
    if head and prunable:
      expected = own[i]  # the personal head keeps the client's own scores
    else:
      expected = np.where(keep[i] > 0, weight * g[i] + (1 - weight) * own[i], own[i])
    np.testing.assert_allclose(np.asarray(out["scores"][i]), expected, atol=1e-6)
  with pytest.raises(ValueError, match="global_weight"):
    dataclasses.replace(config, global_weight=0.0).validate()


def test_bernoulli_upload_samples_around_the_mask_probability(tff_context, data):
  """upload='bernoulli': bits ~ Bernoulli(sigmoid(m_r)) at kept positions, zero elsewhere; the
  personal mask stays the thresholded one."""
  from fedmask_tff.wire import bitpack
  config = dataclasses.replace(CONFIG, upload="bernoulli", score_init_noise=0.0)
  process = fedmask.build_fedmask_process(model_fn, ELEMENT_SPEC, config)
  ds = to_datasets(data)[0]
  state, upload, _ = process.client_update(ds, process.initial_client_state())
  agree, n = 0, 0
  for i, shape in enumerate([(8, 16), (16, 12), (12, 3)]):
    bits = bitpack.unpack_bits_np(np.asarray(upload["mask"][i]), shape)
    keep = np.asarray(state["keep"][i])
    assert np.all(bits[keep == 0] == 0)
    p = 1 / (1 + np.exp(-np.asarray(state["scores"][i])))
    agree += np.sum((bits == (p >= 0.5))[keep > 0]); n += int(keep.sum())
    np.testing.assert_array_equal(np.asarray(state["personal"][i]), (p >= 0.5) * keep)
  # Scores stay near 0 (p ~ 0.5), so the sample is far from the thresholded mask ...
  assert 0.3 < agree / n < 0.9
  # ... and it is seeded: the same inputs give the same sample.
  _, again, _ = process.client_update(ds, process.initial_client_state())
  for a, b in zip(upload["mask"], again["mask"]):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_score_sign_quantized_downlink_counts_its_bits_and_stays_close(tff_context):
  """downlink_bits=b with score_sign: G at the kept positions as b-bit levels between its min and
  max (two float32 more per tensor); the start differs from the float32 one by at most half a
  level times the span (times global_weight)."""
  config = dataclasses.replace(CONFIG, upload="score_sign", downlink_bits=8, global_weight=1.0,
                               personal_head=False)
  process = fedmask.build_fedmask_process(model_fn, ELEMENT_SPEC, config)
  state = process.initial_client_state()
  rng = np.random.default_rng(1)
  g = tuple(rng.normal(size=s.shape).astype(np.float32) for s in state["scores"])
  keep = tuple((rng.random(s.shape) < 0.5).astype(np.float32) for s in state["scores"])
  state = dict(state, keep=keep)
  out = process.start_from_global(g, state)
  for gi, ki, oi in zip(g, keep, out["scores"]):
    span = gi[ki > 0].max() - gi[ki > 0].min()
    err = np.abs(np.asarray(oi) - gi)[ki > 0]
    assert err.max() <= span / (2 * (2 ** 8 - 2)) + 1e-5 and err.max() > 0
    np.testing.assert_array_equal(np.asarray(oi)[ki == 0], state["scores"][0][0, 0])
  from helpers import make_data
  _, states, metrics = fedmask_next(process, process.initialize(), to_datasets(make_data()),
                                    [process.initial_client_state() for _ in range(NUM_CLIENTS)])
  sizes = [8 * 16, 16 * 12, 12 * 3]  # first round: every element, before pruning
  assert [int(m["downlink_bits"]) for m in metrics] == \
      [sum(8 * ((n * 8 + 7) // 8) + 64 for n in sizes)] * NUM_CLIENTS


def test_runs_differ_only_in_settings_their_algorithm_uses():
  """Resume and compare look only at settings that can change a run's results."""
  from fedmask_tff.simulation.run_config import RunConfig, differing_settings
  import dataclasses as dc
  stored = dc.asdict(RunConfig(personal_head=False, score_restart="linear"))
  assert differing_settings(stored, RunConfig(algorithm="fedavg", personal_head=False,
                                              score_restart="linear")) != []  # algorithm differs
  assert differing_settings(dict(stored, algorithm="fedavg"), RunConfig(algorithm="fedavg")) == []
  # score_sign ignores the vote rule, not its own settings.
  assert differing_settings(stored, RunConfig(score_restart="linear")) == ["personal_head"]
  assert differing_settings(stored, RunConfig(personal_head=False)) == []
  # The mask upload ignores the server-score settings, not the vote rule.
  mask = dict(stored, upload="mask")
  assert differing_settings(mask, RunConfig(upload="mask", score_restart="linear")) == []
  assert differing_settings(mask, RunConfig(upload="mask")) == ["score_restart"]
  # local_masks: the recipe (sampled or the score-threshold one) and the initial scores.
  local = dict(stored, algorithm="local_masks", upload="mask")
  assert differing_settings(local, RunConfig(algorithm="local_masks", upload="mask")) == []
  assert differing_settings(local, RunConfig(algorithm="local_masks")) == ["upload"]
  assert differing_settings(local, RunConfig(algorithm="local_masks", upload="mask",
                                             score_init_noise=0.1)) == \
      ["score_init_noise"]
