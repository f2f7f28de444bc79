"""FedMask's Algorithm 1 read literally (``global_mask``, ``prune_at_init``), checked by hand:
the server keeps the binary global mask m^T of the last aggregation, a selected client starts
from m^T at its kept positions, its downlink counts one bit per kept element (two while some
have no m^T yet), and every client prunes once before round 1."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fedmask_tff.algorithms import fedmask
from fedmask_tff.masks import masking
from helpers import (CONFIG, ELEMENT_SPEC, KEPT, NUM_CLIENTS, SHAPES, fedmask_next,
                     fedmask_prepare, make_data, model_fn, to_datasets)

LITERAL = dataclasses.replace(CONFIG, upload="mask", global_mask=True, score_restart="scaled_logit")
SIZES = [int(np.prod(s)) for s in SHAPES]


def packed_bits(n):
  return 8 * ((n + 7) // 8)


@pytest.fixture(scope="module")
def literal(tff_context):
  return fedmask.build_fedmask_process(model_fn, ELEMENT_SPEC, LITERAL)


def test_the_server_keeps_m_T_and_no_vote_is_applied_after_a_round(literal):
  data = to_datasets(make_data())
  server0 = literal.initialize()
  assert int(server0["round"]) == 0
  assert all(np.all(np.asarray(m) == -1.0) for m in server0["mask"])  # nothing shared yet
  states0 = [literal.initial_client_state() for _ in range(NUM_CLIENTS)]
  # With no m^T yet, a client starts from its own scores: client_update alone is its round.
  trained = [literal.client_update(ds, st)[0] for ds, st in zip(data, states0)]
  server1, states1, metrics = fedmask_next(literal, server0, data, states0)
  for i in range(len(SHAPES)):
    masks = np.stack([np.asarray(t["personal"][i]) for t in trained])
    keeps = np.stack([np.asarray(t["keep"][i]) for t in trained])
    count = keeps.sum(0)
    vote = np.divide((masks * keeps).sum(0), count, out=np.zeros_like(count), where=count > 0)
    expected = np.where(count >= 2, (vote >= 0.5).astype(np.float32), -1.0)
    np.testing.assert_array_equal(np.asarray(server1["mask"][i]), expected)
    for c in range(NUM_CLIENTS):  # the client keeps its trained scores: no vote after its round
      np.testing.assert_allclose(np.asarray(states1[c]["scores"][i]),
                                 np.asarray(trained[c]["scores"][i]), atol=1e-6)
  assert int(server1["round"]) == 1
  # Round 1: m^T is undefined everywhere, and the client had kept every element: its bit and
  # its "defined" bit for each element of each tensor.
  assert [int(m["downlink_bits"]) for m in metrics] == \
      [sum(2 * packed_bits(n) for n in SIZES)] * NUM_CLIENTS


def test_a_selected_client_starts_from_m_T_at_its_kept_positions(literal):
  """Line 11 with scaled_logit: the score restarts to +-0.1 * logit(0.99) where m^T is defined
  and the client keeps the element; its own score elsewhere."""
  rng = np.random.default_rng(0)
  state = literal.initial_client_state()
  own = tuple(rng.normal(size=s).astype(np.float32) for s in SHAPES)
  keep = tuple((rng.random(s) < 0.5).astype(np.float32) for s in SHAPES)
  m_t = tuple(rng.choice([-1.0, 0.0, 1.0], size=s).astype(np.float32) for s in SHAPES)
  state = dict(state, scores=own, keep=keep)
  out = literal.start_from_mask(m_t, state)
  restart = 0.1 * np.log(0.99 / 0.01)
  for o, s, k, m in zip(out["scores"], own, keep, m_t):
    expected = np.where((k > 0) & (m >= 0), np.where(m > 0, restart, -restart), s)
    np.testing.assert_allclose(np.asarray(o), expected, atol=1e-5)
  # The after-aggregation evaluation uses that start.
  start = literal.start_masks({"mask": m_t}, state)
  for st, o, k in zip(start, out["scores"], keep):
    np.testing.assert_array_equal(st, (np.asarray(o) >= 0) * k)


def test_persistent_rule_moves_a_clients_scores_only_where_m_T_disagrees(tff_context):
  config = dataclasses.replace(LITERAL, score_restart="disagree_shift", restart_scale=0.25)
  process = fedmask.build_fedmask_process(model_fn, ELEMENT_SPEC, config)
  own = tuple(np.full(s, 0.1, np.float32) for s in SHAPES)  # own bit 1 everywhere
  m_t = tuple(np.where(np.arange(n).reshape(s) % 2 == 0, 1.0, 0.0).astype(np.float32)
              for s, n in zip(SHAPES, SIZES))
  state = dict(process.initial_client_state(), scores=own)
  out = process.start_from_mask(m_t, state)
  for o, m in zip(out["scores"], m_t):  # agree: unchanged; disagree (m^T = 0): 0.1 - 0.25
    np.testing.assert_allclose(np.asarray(o), np.where(m > 0, 0.1, -0.15), atol=1e-6)
    np.testing.assert_allclose(np.asarray(o), masking.apply_vote(
        np.full(m.shape, 0.1, np.float32), m, "disagree_shift", 0.25), atol=1e-6)


def test_a_defined_m_T_goes_down_at_one_bit_per_kept_element(literal):
  data = to_datasets(make_data())
  states = [literal.initial_client_state() for _ in range(NUM_CLIENTS)]
  server, states, _ = fedmask_next(literal, literal.initialize(), data, states)
  server2, _, metrics = fedmask_next(literal, server, data, states)
  for c, m in enumerate(metrics):
    bits = 0
    for i, n in enumerate(KEPT):
      kept = np.asarray(states[c]["keep"][i]) > 0
      undefined = np.any(np.asarray(server["mask"][i])[kept] < 0)
      bits += packed_bits(n) * (2 if undefined else 1)
    assert int(m["downlink_bits"]) == bits
  # The unpruned layer is kept by every client, so its m^T is defined: 1 bit per element.
  assert np.all(np.asarray(server["mask"][0]) >= 0)
  assert int(server2["round"]) == 2


def test_prune_at_init_prunes_every_client_once_and_sends_its_pruning_masks(tff_context):
  config = dataclasses.replace(LITERAL, prune_at_init=True)
  process = fedmask.build_fedmask_process(model_fn, ELEMENT_SPEC, config)
  data = to_datasets(make_data())
  states0 = [process.initial_client_state() for _ in range(NUM_CLIENTS)]
  prepared, metrics = fedmask_prepare(process, data, states0)
  keep_bits = sum(packed_bits(n) for n, p in zip(SIZES, [False, True, True]) if p)
  for st, m in zip(prepared, metrics):
    assert [int(np.asarray(k).sum()) for k in st["keep"]] == KEPT
    assert int(st["rounds"]) == 1 and int(m["pruned"]) == 1
    assert int(m["uplink_bits"]) == keep_bits and float(m["train_flops"]) > 0
  # Idempotent: a client that has pruned is left as it is.
  again, metrics2 = fedmask_prepare(process, data, list(prepared))
  for a, b, m in zip(again, prepared, metrics2):
    assert int(m["pruned"]) == 0 and int(m["uplink_bits"]) == 0
    for x, y in zip(a["keep"] + a["scores"], b["keep"] + b["scores"]):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # Its first round does not prune again and sends no pruning mask: the mask bits only.
  _, after, round_metrics = fedmask_next(process, process.initialize(), data, list(prepared))
  for st, m in zip(after, round_metrics):
    assert int(m["train"]["pruned"]) == 0
    assert int(m["train"]["uplink_bits"]) == sum(packed_bits(n) for n in SIZES)
    assert [int(np.asarray(k).sum()) for k in st["keep"]] == KEPT


def test_bad_combinations_are_refused():
  with pytest.raises(ValueError, match="global_mask"):
    dataclasses.replace(LITERAL, upload="score_sign").validate()
  with pytest.raises(ValueError, match="global_mask"):
    dataclasses.replace(LITERAL, downlink_bits=8).validate()
