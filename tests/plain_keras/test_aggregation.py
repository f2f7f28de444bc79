"""Tests of FedMask's aggregation rule (fedmask_tff.masks.aggregation).

Hand cases have their expected values written out as literals; the property
checks compare against a per-element loop written from the rule's definition.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from fedmask_tff.masks.aggregation import aggregate_masks, aggregated_positions, apply_rule, mask_sums

# 3 clients x 6 elements. Columns:
#   0: kept by all three, masks 1,0,1            -> 2/3 for everyone
#   1: kept by clients 0,1 (masks 1,0);
#      client 2 pruned it (its raw mask is 1)    -> 1/2 for clients 0,1; 0 for client 2
#   2: kept by client 1 only (mask 1)            -> client 1 keeps its 1; others 0
#   3: kept by nobody (raw masks all 1)          -> 0 for everyone
#   4: kept by all three, masks all 1            -> 1 for everyone
#   5: kept by client 2 only, mask 0             -> 0 for everyone
MASKS = np.array([[1, 1, 0, 1, 1, 1],
                  [0, 0, 1, 1, 1, 0],
                  [1, 1, 1, 1, 1, 0]], np.float32)
KEEP = np.array([[1, 1, 0, 0, 1, 0],
                 [1, 1, 1, 0, 1, 0],
                 [1, 0, 0, 0, 1, 1]], np.float32)
EXPECTED = np.array([[2 / 3, 0.5, 0.0, 0.0, 1.0, 0.0],
                     [2 / 3, 0.5, 1.0, 0.0, 1.0, 0.0],
                     [2 / 3, 0.0, 0.0, 0.0, 1.0, 0.0]])


def loop_reference(masks, keep, min_shared=2):
  """The rule element by element, straight from its definition."""
  masks = np.asarray(masks, np.float64)
  keep = np.asarray(keep, np.float64)
  out = np.zeros_like(masks)
  clients = masks.shape[0]
  for idx in np.ndindex(*masks.shape[1:]):
    keepers = [c for c in range(clients) if keep[(c,) + idx] == 1]
    if len(keepers) >= min_shared:
      mean = sum(masks[(c,) + idx] for c in keepers) / len(keepers)
      for c in keepers:
        out[(c,) + idx] = mean
    else:
      for c in keepers:
        out[(c,) + idx] = masks[(c,) + idx]
  return out


def random_case(rng, shape, keep_frac=0.6):
  masks = (rng.random(shape) < 0.5).astype(np.float32)
  keep = (rng.random(shape) < keep_frac).astype(np.float32)
  return masks, keep


# ------------------------------------------------------------- hand cases ---

def test_hand_case():
  out = aggregate_masks(MASKS, KEEP)
  assert out.dtype == np.float64
  assert out.shape == (3, 6)
  np.testing.assert_allclose(out, EXPECTED, rtol=0, atol=1e-12)


def test_hand_case_sums():
  total, count = mask_sums(MASKS, KEEP)
  np.testing.assert_array_equal(total, [2, 1, 1, 0, 3, 0])
  np.testing.assert_array_equal(count, [3, 2, 1, 0, 3, 1])
  np.testing.assert_array_equal(aggregated_positions(KEEP, count),
                                [[1, 1, 0, 0, 1, 0],
                                 [1, 1, 0, 0, 1, 0],
                                 [1, 0, 0, 0, 1, 0]])


def test_pruned_elements_are_zero_and_raw_mask_of_pruned_ignored():
  # Client 2's raw mask at column 1 is 1, but it pruned it: neither counted nor received.
  out = aggregate_masks(MASKS, KEEP)
  assert np.all(out[KEEP == 0] == 0)
  flipped = MASKS.copy()
  flipped[KEEP == 0] = 1 - flipped[KEEP == 0]  # change every pruned raw value
  np.testing.assert_array_equal(aggregate_masks(flipped, KEEP), out)


def test_two_clients_hand_case():
  masks = np.array([[1, 0, 1, 0], [1, 1, 0, 0]])
  keep = np.array([[1, 1, 1, 0], [1, 1, 0, 1]])
  np.testing.assert_allclose(aggregate_masks(masks, keep),
                             [[1.0, 0.5, 1.0, 0.0],
                              [1.0, 0.5, 0.0, 0.0]])


def test_single_client_is_unchanged():
  masks = np.array([[1, 0, 1, 1]])
  keep = np.array([[1, 1, 0, 1]])
  np.testing.assert_array_equal(aggregate_masks(masks, keep), [[1, 0, 0, 1]])


@pytest.mark.parametrize("min_shared,expected", [
    # min_shared=1: an element kept by one client is its own mean: same as the default here.
    (1, EXPECTED),
    # min_shared=3: only columns 0 and 4 (kept by all three) are averaged;
    # column 1 (kept by two) keeps each client's own value.
    (3, np.array([[2 / 3, 1.0, 0.0, 0.0, 1.0, 0.0],
                  [2 / 3, 0.0, 1.0, 0.0, 1.0, 0.0],
                  [2 / 3, 0.0, 0.0, 0.0, 1.0, 0.0]])),
    # min_shared=4 (more than there are clients): nothing averaged: masks * keep.
    (4, MASKS * KEEP),
])
def test_min_shared(min_shared, expected):
  np.testing.assert_allclose(aggregate_masks(MASKS, KEEP, min_shared=min_shared), expected,
                             rtol=0, atol=1e-12)


def test_multidimensional_shape():
  masks = MASKS.reshape(3, 2, 3)
  keep = KEEP.reshape(3, 2, 3)
  out = aggregate_masks(masks, keep)
  assert out.shape == (3, 2, 3)
  np.testing.assert_allclose(out, EXPECTED.reshape(3, 2, 3), rtol=0, atol=1e-12)


def test_bool_inputs_accepted():
  np.testing.assert_allclose(aggregate_masks(MASKS.astype(bool), KEEP.astype(bool)), EXPECTED,
                             rtol=0, atol=1e-12)


# ------------------------------------------------------- property checks ---

@pytest.mark.parametrize("shape", [(2, 10), (3, 4, 5), (5, 2, 3, 4), (7, 50)])
@pytest.mark.parametrize("min_shared", [1, 2, 3])
def test_matches_loop_reference(shape, min_shared):
  rng = np.random.default_rng(hash((shape, min_shared)) % 2**32)
  masks, keep = random_case(rng, shape)
  out = aggregate_masks(masks, keep, min_shared=min_shared)
  np.testing.assert_allclose(out, loop_reference(masks, keep, min_shared), rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_results_in_unit_interval_and_zero_where_pruned(seed):
  rng = np.random.default_rng(seed)
  masks, keep = random_case(rng, (6, 40))
  out = aggregate_masks(masks, keep)
  assert np.all(out >= 0) and np.all(out <= 1)
  assert np.all(out[keep == 0] == 0)
  # Values are fractions with the element's keeper count as denominator.
  _, count = mask_sums(masks, keep)
  scaled = out * np.maximum(count, 1)
  np.testing.assert_allclose(scaled, np.round(scaled), atol=1e-9)


def test_invariant_to_client_order():
  rng = np.random.default_rng(1)
  masks, keep = random_case(rng, (4, 3, 5))
  out = aggregate_masks(masks, keep)
  for perm in itertools.permutations(range(4)):
    perm = list(perm)
    np.testing.assert_allclose(aggregate_masks(masks[perm], keep[perm]), out[perm], rtol=0,
                               atol=1e-12)
  # And for the hand case.
  perm = [2, 0, 1]
  np.testing.assert_allclose(aggregate_masks(MASKS[perm], KEEP[perm]), EXPECTED[perm], atol=1e-12)


@pytest.mark.parametrize("clients", [2, 3, 5])
def test_plain_mean_when_everyone_keeps_everything(clients):
  rng = np.random.default_rng(clients)
  masks = (rng.random((clients, 4, 6)) < 0.5).astype(np.float32)
  keep = np.ones_like(masks)
  out = aggregate_masks(masks, keep)
  mean = masks.astype(np.float64).mean(axis=0)
  for c in range(clients):
    np.testing.assert_allclose(out[c], mean, rtol=0, atol=1e-12)


def test_mask_sums_apply_rule_composition():
  rng = np.random.default_rng(7)
  masks, keep = random_case(rng, (5, 3, 4))
  total, count = mask_sums(masks, keep)
  np.testing.assert_array_equal(total, (masks * keep).sum(0))
  np.testing.assert_array_equal(count, keep.sum(0))
  # Stacked: one call for all clients.
  np.testing.assert_array_equal(apply_rule(masks, keep, total, count), aggregate_masks(masks, keep))
  # Per client, as each client runs it with its own values and keep.
  for c in range(5):
    np.testing.assert_array_equal(apply_rule(masks[c], keep[c], total, count),
                                  aggregate_masks(masks, keep)[c])
  for ms in (1, 3):
    np.testing.assert_array_equal(apply_rule(masks, keep, total, count, min_shared=ms),
                                  aggregate_masks(masks, keep, min_shared=ms))


def test_sums_are_additive_over_client_groups():
  # The server part is a sum: partial sums over disjoint client groups add up.
  rng = np.random.default_rng(3)
  masks, keep = random_case(rng, (6, 10))
  t_all, c_all = mask_sums(masks, keep)
  t_a, c_a = mask_sums(masks[:2], keep[:2])
  t_b, c_b = mask_sums(masks[2:], keep[2:])
  np.testing.assert_array_equal(t_a + t_b, t_all)
  np.testing.assert_array_equal(c_a + c_b, c_all)


# ----------------------------------------------------------------- errors ---

def test_mismatched_shapes():
  with pytest.raises(ValueError, match="same shape"):
    aggregate_masks(np.ones((3, 6)), np.ones((3, 5)))
  with pytest.raises(ValueError, match="same shape"):
    aggregate_masks(np.ones((2, 6)), np.ones((3, 6)))
  with pytest.raises(ValueError, match="same shape"):
    mask_sums(np.ones((3, 2, 3)), np.ones((3, 6)))


@pytest.mark.parametrize("bad", [0.5, 2.0, -1.0])
@pytest.mark.parametrize("which", ["masks", "keep"])
def test_non_binary_values(bad, which):
  masks, keep = MASKS.copy(), KEEP.copy()
  (masks if which == "masks" else keep)[1, 2] = bad
  with pytest.raises(ValueError, match=f"{which} must contain only 0 and 1"):
    aggregate_masks(masks, keep)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("which", ["masks", "keep"])
def test_non_finite_values(bad, which):
  masks, keep = MASKS.copy(), KEEP.copy()
  (masks if which == "masks" else keep)[0, 0] = bad
  with pytest.raises(ValueError, match="NaN or infinite"):
    aggregate_masks(masks, keep)


def test_non_numeric_and_scalar():
  with pytest.raises(ValueError, match="numeric"):
    aggregate_masks(np.array([["1", "0"]]), np.array([["1", "1"]]))
  with pytest.raises(ValueError, match="leading clients dimension"):
    aggregate_masks(np.float32(1), np.float32(1))


# --- the TF functions the FedMask process runs (one home for the rule) -----------------------

def test_votes_and_received_by_hand():
  from fedmask_tff.masks.aggregation import UNCHANGED, received, votes
  total = np.array([2.0, 1.0, 0.0, 3.0])
  count = np.array([3.0, 1.0, 0.0, 2.0])  # element 3: a debiased total above the count
  v, shared = votes(total, count)
  np.testing.assert_allclose(v.numpy(), [2 / 3, 1.0, 0.0, 1.0])
  np.testing.assert_array_equal(shared.numpy(), [True, False, False, True])
  keep = np.array([1.0, 1.0, 1.0, 0.0])
  np.testing.assert_allclose(received(keep, total, count).numpy(),
                             [2 / 3, UNCHANGED, UNCHANGED, UNCHANGED])
  np.testing.assert_allclose(received(keep, total, count, min_shared=1).numpy(),
                             [2 / 3, 1.0, UNCHANGED, UNCHANGED])


def test_received_in_a_tf_function_matches_apply_rule():
  import tensorflow as tf
  from fedmask_tff.masks.aggregation import received
  rng = np.random.default_rng(7)
  masks = (rng.random((5, 40)) < 0.5).astype(np.float32)
  keep = (rng.random((5, 40)) < 0.6).astype(np.float32)
  total, count = mask_sums(masks, keep)
  graph = tf.function(lambda k, t, c: received(k, t, c))(
      tf.constant(keep[0]), tf.constant(total, tf.float32), tf.constant(count, tf.float32))
  value = graph.numpy()
  expected = apply_rule(masks[0], keep[0], total, count)
  np.testing.assert_allclose(np.where(value >= 0, value, masks[0]) * keep[0], expected, atol=1e-6)
