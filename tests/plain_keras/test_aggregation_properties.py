"""Property-based checks of the aggregation rule on random masks (hypothesis)."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedmask_tff.masks.aggregation import aggregate_masks, mask_sums


@st.composite
def masks_and_keep(draw):
  clients = draw(st.integers(1, 6))
  shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, max_side=5))
  bits = hnp.arrays(np.int8, (clients, *shape), elements=st.integers(0, 1))
  return draw(bits), draw(bits)


@settings(max_examples=150, deadline=None)
@given(masks_and_keep())
def test_results_in_unit_interval_and_pruned_are_zero(mk):
  masks, keep = mk
  out = aggregate_masks(masks, keep)
  assert out.shape == masks.shape
  assert np.all((out >= 0) & (out <= 1))
  assert np.all(out[keep == 0] == 0)


@settings(max_examples=150, deadline=None)
@given(masks_and_keep(), st.randoms(use_true_random=False))
def test_client_order_does_not_matter(mk, rnd):
  masks, keep = mk
  order = list(range(masks.shape[0]))
  rnd.shuffle(order)
  np.testing.assert_array_equal(aggregate_masks(masks[order], keep[order]),
                                aggregate_masks(masks, keep)[order])


@settings(max_examples=150, deadline=None)
@given(masks_and_keep())
def test_elements_kept_by_fewer_than_two_are_unchanged(mk):
  masks, keep = mk
  _, count = mask_sums(masks, keep)
  out = aggregate_masks(masks, keep)
  lonely = (keep > 0) & (count < 2)
  np.testing.assert_array_equal(out[lonely], masks[lonely])


@settings(max_examples=150, deadline=None)
@given(masks_and_keep())
def test_plain_mean_when_everyone_keeps_everything(mk):
  masks, _ = mk
  if masks.shape[0] < 2:
    return
  out = aggregate_masks(masks, np.ones_like(masks))
  expected = np.broadcast_to(masks.mean(axis=0), masks.shape)
  np.testing.assert_allclose(out, expected)


@settings(max_examples=150, deadline=None)
@given(masks_and_keep())
def test_shared_elements_get_the_mean_over_keepers(mk):
  masks, keep = mk
  total, count = mask_sums(masks, keep)
  out = aggregate_masks(masks, keep)
  shared = (keep > 0) & (count >= 2)
  means = np.broadcast_to(total / np.maximum(count, 1), masks.shape)
  np.testing.assert_allclose(out[shared], means[shared])
