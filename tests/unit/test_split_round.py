"""A round run as ``client_work`` then ``aggregate`` (``split_round``, what ``--workers`` uses)
gives exactly what ``next`` gives, for top-k (with and without error feedback), BNN FedAvg,
Per-FedAvg (FO and HF) and LG-FedAvg; ``client_work`` returns only CLIENTS-placed values and
aggregates nothing.

A tiny MLP (width 0.1) and three clients with 12-30 random 28x28x1 examples, not shuffled, so
every call sees the same batches. One round runs first (so that client states are not the
initial ones), then the same next round both ways from the same inputs.
"""

from __future__ import annotations

import collections

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from fedmask_tff.algorithms import bnn_fedavg, lg_fedavg, per_fedavg, topk
from fedmask_tff.algorithms.base import BuildContext

SPEC = collections.OrderedDict(x=tf.TensorSpec([None, 28, 28, 1], tf.float32),
                               y=tf.TensorSpec([None], tf.int32))
SIZES = (12, 30, 20)

BUILDERS = {
    "topk": lambda ctx: topk.build_topk(ctx, fraction=0.1),
    "topk_error_feedback": lambda ctx: topk.build_topk(ctx, fraction=0.1, error_feedback=True),
    "bnn_fedavg": bnn_fedavg.build_bnn_fedavg,
    "per_fedavg": lambda ctx: per_fedavg.build_per_fedavg(ctx, variant="fo"),
    "per_fedavg_hf": lambda ctx: per_fedavg.build_per_fedavg(ctx, variant="hf"),
    "lg_fedavg": lambda ctx: lg_fedavg.build_lg_fedavg(ctx, global_layers=2),
}
AGGREGATIONS = ("federated_sum", "federated_mean", "federated_aggregate",
                "federated_secure_sum", "federated_weighted_mean")


def context():
  return BuildContext(input_shape=(28, 28, 1), num_classes=3, model="mlp", model_width=0.1,
                      seed=1, element_spec=SPEC, eval_element_spec=SPEC, local_epochs=1,
                      learning_rate=0.05, batch_size=8)


def datasets():
  rng = np.random.default_rng(0)
  out = []
  for n in SIZES:
    x = rng.random((n, 28, 28, 1)).astype(np.float32)
    y = rng.integers(0, 3, n).astype(np.int32)
    out.append(tf.data.Dataset.from_tensor_slices(collections.OrderedDict(x=x, y=y)).batch(8))
  return out


def leaves(outputs):
  return [np.asarray(v) for v in tf.nest.flatten(outputs)]


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_split_round_is_next(tff_context, name):
  alg = BUILDERS[name](context())
  assert alg.round_in_two_steps

  work, aggregate = alg.process.client_work, alg.process.aggregate
  result = work.type_signature.result
  assert isinstance(result, tff.StructType) and len(result) >= 2
  for t in result:
    assert isinstance(t, tff.FederatedType) and t.placement is tff.CLIENTS, t
  assert len(aggregate.type_signature.parameter) == 1 + len(result)
  body = work.to_building_block().compact_representation()
  assert not [a for a in AGGREGATIONS if a in body]
  assert "federated_sum" in aggregate.to_building_block().compact_representation()

  data = datasets()
  init = alg.initial_client_state()
  states = None if init is None else [init for _ in SIZES]
  state, states, _ = alg.next(alg.initialize(), data, states)

  alg.split_round = False
  whole = alg.next(state, data, states)
  alg.split_round = True
  calls = []
  alg.process.client_work = lambda *args: calls.append(1) or work(*args)
  split = alg.next(state, data, states)
  assert calls == [1]  # the split round did run as two calls
  tf.nest.assert_same_structure(whole, split)
  for a, b in zip(leaves(whole), leaves(split)):
    assert a.dtype == b.dtype and np.array_equal(a, b)
  assert sum(m["examples"] for m in whole[2]) > 0  # some client trained
