"""A device choosing how much of theta to take (``--choose_personal``,
:mod:`fedmask_tff.algorithms.sampled_masks.start_choice`): the held-out split by content, the
winner of the nested candidates by hand, and the choice inside FedMask's round."""

import collections
import math

import numpy as np
import pytest
import tensorflow as tf

from fedmask_tff.algorithms.sampled_masks import algorithm as sampled
from fedmask_tff.algorithms.sampled_masks import start_choice
from fedmask_tff.algorithms.sampled_masks.config import SampledMaskConfig, fixed_theta_layers
from helpers import sampled_mlp_context

CONTEXT = sampled_mlp_context(width=0.05)


def _examples(n, seed=0):
  rng = np.random.default_rng(seed)
  return collections.OrderedDict(x=rng.random((n, 6)).astype(np.float32),
                                 y=rng.integers(0, 3, n).astype(np.int32))


def _flags(examples, fraction=0.1, seed=0):
  weights = start_choice.hash_weights(6, seed)
  return start_choice.choice_flags(examples, weights, fraction, seed).numpy()


def test_pick_by_hand():
  # most correct first (1 and 2 tie at 5), then the lower loss (2)
  assert int(start_choice.pick([3.0, 5.0, 5.0, 2.0], [1.0, 2.0, 1.5, 0.0], fixed=1)) == 2
  # a full tie (no held-out example): the fixed setting
  assert int(start_choice.pick([0.0, 0.0, 0.0], [0.0, 0.0, 0.0], fixed=1)) == 1
  # a tie the fixed setting is not in: the larger c (more of theta)
  assert int(start_choice.pick([5.0, 5.0, 1.0], [1.0, 1.0, 0.0], fixed=2)) == 1
  # a NaN loss counts as infinite
  assert int(start_choice.pick([4.0, 4.0], [float("nan"), 3.0], fixed=0)) == 1


def test_held_out_examples_are_chosen_by_content_not_by_batch():
  ex = _examples(5000)
  flags = _flags(ex)
  assert abs(flags.mean() - 0.1) < 0.015
  order = np.random.default_rng(1).permutation(5000)
  shuffled = collections.OrderedDict((k, v[order]) for k, v in ex.items())
  np.testing.assert_array_equal(_flags(shuffled), flags[order])  # same examples, any order
  np.testing.assert_array_equal(_flags(collections.OrderedDict((k, v[:7]) for k, v in ex.items())),
                                flags[:7])  # any batch
  assert (_flags(ex, seed=1) != flags).mean() > 0.1  # another seed, another set
  relabelled = collections.OrderedDict(x=ex["x"], y=(ex["y"] + 1) % 3)
  assert (_flags(relabelled) != flags).mean() > 0.1  # the label is part of the content
  assert _flags(ex, fraction=0.5).mean() == pytest.approx(0.5, abs=0.03)


def test_split_is_a_partition_and_drops_empty_batches():
  ex = _examples(203, seed=3)
  ds = tf.data.Dataset.from_tensor_slices(ex).shuffle(203, seed=4).batch(4)
  train, held = start_choice.split(ds, 0.25, seed=0)
  got_train = [b["y"].numpy() for b in train]
  got_held = [b["y"].numpy() for b in held]
  assert all(b.size > 0 for b in got_train + got_held)
  flags = _flags(ex, 0.25)
  assert sum(b.size for b in got_held) == flags.sum()
  assert sum(b.size for b in got_train) == 203 - flags.sum()
  held_x = np.concatenate([b["x"].numpy() for b in held])
  assert sorted(map(tuple, held_x)) == sorted(map(tuple, ex["x"][flags]))


class _TwoScoreModel:
  """logits = [0, s0 + s1] for every example: class 1 wins when s0 + s1 > 0."""

  def __init__(self):
    self.scores = [tf.Variable([0.0]), tf.Variable([0.0])]

  def __call__(self, x, training=False):
    z = tf.reduce_sum(tf.stack([s[0] for s in self.scores]))
    return tf.stack([tf.zeros([tf.shape(x)[0]]), tf.fill([tf.shape(x)[0]], z)], axis=1)


@pytest.mark.parametrize("own, expected", [
    # own [-3, -3]: c=0 -> -6, c=1 -> 1 - 3 = -2 (both predict 0), c=2 -> 2: all of theta
    ((-3.0, -3.0), 2),
    # own [5, -1]: c=0 -> 4 and c=2 -> 2 both right, c=1 -> 0 (a tie, argmax 0: wrong);
    # c=0's loss log(1 + e^-4) < c=2's log(1 + e^-2): all its own
    ((5.0, -1.0), 0),
])
def test_choose_takes_the_best_nested_candidate_in_a_graph(own, expected):
  model = _TwoScoreModel()
  held = tf.data.Dataset.from_tensor_slices(collections.OrderedDict(
      x=np.zeros((5, 1), np.float32), y=np.ones(5, np.int32))).batch(2)
  theta = [tf.constant([1.0]), tf.constant([1.0])]
  own_t = [tf.constant([own[0]]), tf.constant([own[1]])]

  @tf.function
  def run():
    return start_choice.choose(model, model.scores, theta, own_t, held, fixed=1)
  starts, c, correct = run()
  assert int(c) == expected
  sums = [own[0] + own[1], 1.0 + own[1], 2.0]
  np.testing.assert_array_equal(correct.numpy(), [5.0 * (s > 0) for s in sums])
  want = [theta[i] if i < expected else own_t[i] for i in range(2)]
  for s, w in zip(starts, want):
    np.testing.assert_array_equal(s.numpy(), w.numpy())


def _data(seed, n=40):
  return tf.data.Dataset.from_tensor_slices(_examples(n, seed)).batch(8)


@pytest.mark.parametrize("fraction", [0.3, 1e-9])
def test_fedmask_round_holds_out_and_reports_the_choice(fraction):
  config = SampledMaskConfig(local_epochs=1, prune_last_layers=1, choose_personal=True,
                             choice_fraction=fraction)
  fedmask = sampled.SampledFedMask(CONTEXT, config)
  plan = fedmask.plan
  fixed = fixed_theta_layers(plan)
  assert fixed == len(plan) - 1  # the head is personal in the fixed setting
  server = fedmask.initialize()
  states = [fedmask.initial_client_state() for _ in range(2)]
  _, new, metrics = fedmask.next(server, [_data(1), _data(2)], states)
  for seed, m in zip((1, 2), metrics):
    held = int(_flags(_examples(40, seed), fraction).sum())
    assert m["held_out_examples"] == held
    assert m["trained_examples"] == 2 * (40 - held)  # the pruning epoch, then one epoch
    assert 0 <= m["theta_layers"] <= len(plan)
    if held == 0:
      assert m["theta_layers"] == fixed  # nothing to choose on: the fixed setting
    # theta goes down for every weight, the pruned head at the device's kept positions (round 1:
    # all of them, before pruning)
    assert m["downlink_bits"] == sum(8 * math.ceil(2 * s.size / 8) for s in plan)
  # round 2, on a real choice: theta_layers is an integer candidate
  _, _, metrics2 = fedmask.next(server, [_data(1), _data(2)], new)
  assert all(float(m["theta_layers"]).is_integer() for m in metrics2)


def test_choice_fraction_is_checked():
  with pytest.raises(ValueError, match="choice_fraction"):
    SampledMaskConfig(choice_fraction=1.0).validate(3)


def test_personal_offset_starts_from_theta_plus_the_kept_deviation_and_uploads_progress():
  """lambda 0.5, a kept offset of -20 on the shared weights, theta 1 (clipped to 0.99), lr 1e-6:
  the device starts at log(99) - 20 (its personalized mask all off), uploads samples of
  sigmoid(m_r + 20) = 0.99 (almost all ones) and keeps 0.5 x (m_r - log(99)) = -10."""
  from fedmask_tff.wire import bitpack
  config = SampledMaskConfig(local_epochs=1, learning_rate=1e-6, prune_last_layers=1,
                             personal_offset=0.5)
  fedmask = sampled.SampledFedMask(CONTEXT, config)
  plan = fedmask.plan
  server = fedmask.initialize()
  server["theta"] = tuple(np.full(s.shape, 1.0, np.float32) for s in plan)
  state = fedmask.initial_client_state()
  assert set(state) == {"scores", "keep", "pruned", "offset"}
  state["offset"] = tuple(np.full(s.shape, -20.0, np.float32) for s in plan)
  upload, new, _ = fedmask.computations.client_update(_data(1), server, state)
  bits, _ = upload
  start = math.log(99) - 20
  for i, spec in enumerate(plan[:-1]):  # the shared (unpruned) weights
    np.testing.assert_allclose(new["scores"][i], start, atol=1e-3)
    np.testing.assert_allclose(new["offset"][i], -10.0, atol=1e-3)
    sent = bitpack.unpack_bits_np(np.asarray(bits[i]), (spec.size,))
    assert sent.mean() > 0.95
  np.testing.assert_array_equal(new["offset"][-1], 0.0)  # the pruned head: no offset
  with pytest.raises(ValueError, match="personal_offset"):
    SampledMaskConfig(personal_offset=1.5).validate(3)
  with pytest.raises(ValueError, match="use one"):
    SampledMaskConfig(personal_offset=0.5, choose_personal=True).validate(3)
  from fedmask_tff.simulation.run_config import ConfigError, RunConfig
  with pytest.raises(ConfigError, match="use one"):
    RunConfig(personal_offset=0.5, choose_personal=True).validate()
