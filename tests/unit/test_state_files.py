"""Client states as files the worker reads and writes (``fedmask_tff.wire.state_files``,
``--client_states=files``): the format round-trips, TF and numpy write the same bytes, bad
files are refused by name, an exchange cleans up after itself, and FedMask's process gives
the same states and metrics with files as with states in TFF's messages, for each way a round
ends (vote and restart, ``score_sign``'s global scores, ``global_mask``, pruning at init)."""

from __future__ import annotations

import collections
import os

import numpy as np
import pytest
import tensorflow as tf

from fedmask_tff.algorithms.fedmask import process as fedmask_process
from fedmask_tff.wire import state_files
from fedmask_tff.wire.client_state import ClientStateError
from helpers import make_data, model_fn, to_datasets

STATE = collections.OrderedDict(
    scores=(np.arange(6, dtype=np.float32).reshape(2, 3), np.array([-1.5], np.float32)),
    keep=(np.array([255], np.uint8), np.array([1], np.uint8)),
    personal=(np.array([5], np.uint8), np.array([0], np.uint8)),
    rounds=np.int32(7))


def _equal(a, b):
  fa, fb = tf.nest.flatten(a), tf.nest.flatten(b)
  return len(fa) == len(fb) and all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(fa, fb))


def test_numpy_round_trip_keeps_every_value_and_dtype():
  assert _equal(state_files.decode_np(state_files.encode_np(STATE), STATE), STATE)


def test_tf_writes_the_bytes_numpy_writes_and_reads_them_back(tmp_path):
  path = str(tmp_path / "0.0")

  @tf.function
  def write_and_read(p, state):
    new_path = state_files.write_next_tf(p, state)
    return new_path, state_files.read_tf(new_path, STATE)

  new_path, back = write_and_read(tf.constant(path), STATE)
  assert new_path.numpy().decode() == path + "+"
  with open(path + "+", "rb") as f:
    assert f.read() == state_files.encode_np(STATE)
  assert _equal(tf.nest.map_structure(np.asarray, back), STATE)


def test_files_of_another_shape_or_garbage_are_refused_by_name():
  other = collections.OrderedDict(STATE, scores=(np.zeros((3, 2), np.float32), STATE["scores"][1]))
  with pytest.raises(ClientStateError, match=r"f.bin: array \d+ is not float32\[2, 3\]"):
    state_files.decode_np(state_files.encode_np(other), STATE, "f.bin")
  fewer = collections.OrderedDict(STATE, personal=(STATE["personal"][0],))
  with pytest.raises(ClientStateError, match="holds 6 arrays, the model's state has 7"):
    state_files.decode_np(state_files.encode_np(fewer), STATE)
  with pytest.raises(ClientStateError, match="is not a client state file"):
    state_files.decode_np(b"\x00garbage", STATE)


def test_an_exchange_writes_reads_and_removes_a_calls_files(tmp_path):
  directory = tmp_path / "exchange"
  directory.mkdir()
  (directory / "stale.0+").write_bytes(b"left by a killed run")
  exchange = state_files.StateExchange(str(directory), STATE)
  assert os.listdir(directory) == []  # an earlier process's files are gone
  states = [STATE, collections.OrderedDict(STATE, rounds=np.int32(8))]
  with exchange.call(states) as (paths, read):
    assert sorted(os.listdir(directory)) == ["0.0", "0.1"]
    for p in paths:  # what a computation would return: the next file
      with open(p + "+", "wb") as f, open(p, "rb") as g:
        f.write(g.read())
    back = read([p.encode() + b"+" for p in paths])
    with pytest.raises(ClientStateError, match="was not written"):
      read([paths[0] + "++"])
    with pytest.raises(ClientStateError, match="outside"):
      read([str(tmp_path / "elsewhere")])
  assert [int(s["rounds"]) for s in back] == [7, 8] and _equal(back[0], STATE)
  assert os.listdir(directory) == []
  with exchange.call(states) as (paths, _):
    assert os.path.basename(paths[0]) == "1.0"  # calls never share names


def test_a_temporary_exchange_is_removed_with_it():
  exchange = state_files.StateExchange(None, STATE)
  directory = exchange.directory
  assert os.path.isdir(directory)
  del exchange
  assert not os.path.exists(directory)


# The vote and restart with its float32 downlink runs with files in the split-round test below;
# here with the 1-bit downlink (prune_at_init), to keep the suite short.
CONFIGS = {
    "score_sign": dict(upload="score_sign"),
    "global_mask": dict(upload="mask", global_mask=True),
    "prune_at_init": dict(upload="mask", prune_at_init=True, downlink_bits=1),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_files_give_what_messages_give(tff_context, name):
  datasets = to_datasets(make_data())
  config = fedmask_process.FedMaskConfig(local_epochs=1, learning_rate=0.5, prune_rate=0.3,
                                         **CONFIGS[name])
  spec = datasets[0].element_spec
  by_messages = fedmask_process.build_fedmask_process(model_fn, spec, config)
  by_files = fedmask_process.build_fedmask_process(model_fn, spec, config, client_states="files")
  initial = by_messages.pack_state(by_messages.initial_client_state())
  exchange = state_files.StateExchange(None, initial)
  states_m = states_f = [initial] * len(datasets)
  if config.prune_at_init:
    states_m, metrics_m = by_messages.prepare(datasets, states_m)
    with exchange.call(states_f) as (paths, read):
      new_paths, metrics_f = by_files.prepare(datasets, paths)
      states_f = read(new_paths)
    assert all(_equal(a, b) for a, b in zip(states_m, states_f)) and str(metrics_m) == str(metrics_f)
  server_m, server_f = by_messages.initialize(), by_files.initialize()
  for _ in range(2):
    server_m, states_m, metrics_m = by_messages.next(server_m, datasets, states_m)
    with exchange.call(states_f) as (paths, read):
      server_f, new_paths, metrics_f = by_files.next(server_f, datasets, paths)
      states_f = read(new_paths)
    assert all(_equal(a, b) for a, b in zip(states_m, states_f))
    assert str(metrics_m) == str(metrics_f)
    assert _equal(tf.nest.map_structure(np.asarray, server_m), tf.nest.map_structure(np.asarray, server_f))
  assert int(states_f[0]["rounds"]) == 2 + config.prune_at_init  # prepare counts as one
  assert os.listdir(exchange.directory) == []


def test_a_round_split_in_two_calls_reads_the_files_the_first_wrote(tff_context):
  # --workers --client_states=files: client_work writes the trained states, aggregate reads them.
  datasets = to_datasets(make_data())
  config = fedmask_process.FedMaskConfig(local_epochs=1, learning_rate=0.5, prune_rate=0.3,
                                         upload="mask")
  process = fedmask_process.build_fedmask_process(model_fn, datasets[0].element_spec, config,
                                                  client_states="files")
  initial = process.pack_state(process.initial_client_state())
  exchange = state_files.StateExchange(None, initial)
  server = process.initialize()
  with exchange.call([initial] * len(datasets)) as (paths, read):
    _, whole, whole_metrics = process.next(server, datasets, paths)
    whole = read(whole)
  with exchange.call([initial] * len(datasets)) as (paths, read):
    trained, upload, metrics = process.client_work(server, datasets, paths)
    assert all(p.endswith(b"+") for p in trained)  # only paths came back
    _, split, split_metrics = process.aggregate(server, trained, upload, metrics)
    split = read(split)
  assert all(_equal(a, b) for a, b in zip(whole, split)) and str(whole_metrics) == str(split_metrics)
