"""Standalone and FedAvg (TFF's own) under the shared algorithm interface, and the shared store."""

import collections

import numpy as np
import pytest
import tensorflow as tf

from fedmask_tff.models import costs
from fedmask_tff.algorithms import evaluation
from fedmask_tff.algorithms.base import BuildContext
from fedmask_tff.wire.client_state import ArrayStateStore, ClientStateError

SPEC = collections.OrderedDict(x=tf.TensorSpec([None, 28, 28, 1], tf.float32),
                               y=tf.TensorSpec([None], tf.int32))


def context(local_epochs=2, lr=0.05):
  return BuildContext(input_shape=(28, 28, 1), num_classes=3, model="mlp", model_width=0.1, seed=3,
                      element_spec=SPEC, eval_element_spec=SPEC, local_epochs=local_epochs,
                      learning_rate=lr, batch_size=8)


def client_data(n, seed):
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 3, n).astype(np.int32)
  x = rng.random((n, 28, 28, 1)).astype(np.float32) * 0.2
  x[np.arange(n), y * 5 + 3, :, 0] = 1.0  # easy: class c lights row 5c+3
  return tf.data.Dataset.from_tensor_slices(collections.OrderedDict(x=x, y=y)).batch(8)


def test_standalone_sends_nothing_and_matches_fedmask_budget(tff_context):
  from fedmask_tff.algorithms.standalone import build_standalone
  alg = build_standalone(context(local_epochs=2))
  server = alg.initialize()
  data = [client_data(20, 0), client_data(12, 1)]
  states = [alg.initial_client_state(), alg.initial_client_state()]
  server, states1, m1 = alg.next(server, data, states)
  assert [m["uplink_bits"] for m in m1] == [0, 0] and [m["downlink_bits"] for m in m1] == [0, 0]
  # First round: local_epochs + 1 (FedMask's pruning epoch); afterwards local_epochs.
  assert [m["examples"] for m in m1] == [60.0, 36.0]
  server, states2, m2 = alg.next(server, data, states1)
  assert [m["examples"] for m in m2] == [40.0, 24.0]
  assert int(states2[0]["rounds"]) == 2
  # The second round started from the client's own first-round model: retraining from the
  # initial state gives different weights.
  _, fresh, _ = alg.next(server, data, states)
  assert not np.allclose(states2[0]["weights"][0], fresh[0]["weights"][0])
  # Clients do not share models.
  assert not np.allclose(states1[0]["weights"][0], states1[1]["weights"][0])
  wc = costs.weight_costs(alg.model_fn())
  assert m2[0]["train_flops"] == costs.train_flops(wc, 40)
  ev = alg.evaluate(server, [client_data(9, 5), client_data(7, 6)], states2, data)
  assert [e["examples"] for e in ev] == [9.0, 7.0]


def test_fedavg_is_tffs_and_counts_bits_from_its_weights(tff_context):
  from fedmask_tff.algorithms.fedavg import build_fedavg
  alg = build_fedavg(context(local_epochs=1, lr=0.1))
  server = alg.initialize()
  params = alg.model_parameters
  assert params == sum(int(np.prod(w.shape)) for w in alg.model_fn().trainable_weights)
  data = [client_data(16, 0), client_data(24, 1)]
  before = [np.array(w) for w in alg.global_weights(server)]
  server, states, m = alg.next(server, data, None)
  assert states is None
  assert [x["downlink_bits"] for x in m] == [32 * params] * 2
  assert [x["uplink_bits"] for x in m] == [32 * params + 32] * 2
  assert [x["examples"] for x in m] == [16.0, 24.0]
  after = alg.global_weights(server)
  assert not np.allclose(before[0], after[0])
  # Evaluation is the global model on each client's own data: check against Keras directly.
  test = [client_data(10, 7), client_data(5, 8)]
  ev = alg.evaluate(server, test, None, data)
  model = alg.model_fn()
  for v, w in zip(evaluation.model_weights(model), after):
    v.assign(w)
  for e, d in zip(ev, test):
    correct = sum(int(np.sum(np.argmax(model(b["x"]).numpy(), -1) == b["y"].numpy())) for b in d)
    assert e["correct"] == correct and e["examples"] == sum(int(b["y"].shape[0]) for b in d)


def test_fedavg_learns_the_easy_task(tff_context):
  from fedmask_tff.algorithms.fedavg import build_fedavg
  alg = build_fedavg(context(local_epochs=2, lr=0.1))
  server = alg.initialize()
  data = [client_data(40, i) for i in range(3)]
  for _ in range(4):
    server, _, m = alg.next(server, data, None)
  ev = alg.evaluate(server, [client_data(30, 9)], None, data)
  assert ev[0]["correct"] / ev[0]["examples"] > 0.6  # chance is 1/3


def test_array_state_store_round_trip_and_corruption(tmp_path):
  init = lambda: collections.OrderedDict(weights=(np.zeros((2, 3), np.float32), np.ones(4, np.float32)),  # noqa: E731
                                         rounds=np.int32(0))
  store = ArrayStateStore(str(tmp_path), init)
  assert store.get("a")["rounds"] == 0
  state = collections.OrderedDict(weights=(np.arange(6, dtype=np.float32).reshape(2, 3),
                                           np.full(4, 2.5, np.float32)), rounds=np.int32(3))
  store.put("a", state)
  got = store.get("a")
  np.testing.assert_array_equal(got["weights"][0], state["weights"][0])
  assert int(got["rounds"]) == 3 and store.client_ids() == ["a"]
  with pytest.raises(ValueError, match="shape"):
    store.put("b", collections.OrderedDict(weights=(np.zeros(3, np.float32), np.ones(4, np.float32)),
                                           rounds=np.int32(0)))
  with pytest.raises(ValueError, match="non-finite"):
    store.put("b", collections.OrderedDict(weights=(np.full((2, 3), np.nan, np.float32),
                                                    np.ones(4, np.float32)), rounds=np.int32(0)))
  path = store.path("a")
  with np.load(path) as f:  # An edited value with the old checksum fails the check.
    arrays = {k: f[k] for k in f.files}
  arrays["leaf_1"] = arrays["leaf_1"] + 1
  np.savez(path, **arrays)
  with pytest.raises(ClientStateError, match="checksum"):
    store.get("a")
  raw = open(path, "rb").read()
  open(path, "wb").write(raw[: len(raw) // 2])  # truncated
  with pytest.raises(ClientStateError, match="unreadable"):
    store.get("a")


def test_dropout_share_is_exact_never_all_and_independent_of_sampling():
  from fedmask_tff.simulation.runner import _dropped_clients
  clients = [f"c{i}" for i in range(10)]
  assert _dropped_clients(clients, 0.0, 0, 1) == set()
  d = _dropped_clients(clients, 0.3, 0, 1)
  assert len(d) == 3 and d <= set(clients)
  assert d == _dropped_clients(clients, 0.3, 0, 1)  # deterministic
  assert d != _dropped_clients(clients, 0.3, 0, 2) or d != _dropped_clients(clients, 0.3, 0, 3)
  assert len(_dropped_clients(clients, 0.99, 0, 1)) == 9  # never every client
  assert _dropped_clients(["a"], 0.9, 0, 1) == set()
