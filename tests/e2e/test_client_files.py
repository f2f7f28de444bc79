"""Client datasets built inside the computation (``--client_datasets=workers``,
:mod:`fedmask_tff.data.client_files`): the files, the dataset computation, and a run that
gives exactly the driver-built run's results."""

import collections
import json
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from fedmask_tff.data import client_files
from helpers import run_cli, write_learnable_fashion_dir


def _client_data(n=37):
  rng = np.random.default_rng(0)
  return tff.simulation.datasets.TestClientData({
      "a": collections.OrderedDict(x=rng.standard_normal((n, 3, 2)).astype(np.float32),
                                   y=np.arange(n, dtype=np.int32)),
      "b": collections.OrderedDict(x=rng.standard_normal((5, 3, 2)).astype(np.float32),
                                   y=np.arange(100, 105, dtype=np.int32))})


def test_files_hold_every_example_in_order_and_are_reused(tmp_path):
  data = _client_data()
  files = client_files.write_client_files(str(tmp_path), data, ["a", "b"])
  assert [n for _, n in files.values()] == [37, 5]
  spec = data.element_type_structure
  for cid, (path, _) in files.items():
    records = list(tf.data.TFRecordDataset(path))
    parsed = [tf.io.parse_single_example(r, {k: tf.io.FixedLenFeature([], tf.string) for k in spec})
              for r in records]
    ys = [int(tf.io.parse_tensor(p["y"], tf.int32)) for p in parsed]
    xs = np.stack([tf.io.parse_tensor(p["x"], tf.float32).numpy() for p in parsed])
    want = list(data.create_tf_dataset_for_client(cid))
    assert ys == [int(e["y"]) for e in want]
    np.testing.assert_array_equal(xs, np.stack([e["x"].numpy() for e in want]))
  mtimes = {p: os.stat(p).st_mtime_ns for p, _ in files.values()}
  client_files.write_client_files(str(tmp_path), data, ["a", "b"])  # Same clients: reused.
  assert {p: os.stat(p).st_mtime_ns for p, _ in files.values()} == mtimes
  manifest = json.load(open(tmp_path / client_files.MANIFEST))
  assert manifest["clients"]["a"]["examples"] == 37
  # Other clients (a changed partition): rewritten, and the manifest says so.
  client_files.write_client_files(str(tmp_path), data, ["b", "a"])
  assert json.load(open(tmp_path / client_files.MANIFEST))["clients"]["b"]["file"] == "0.tfrecord"


def test_dataset_computation_gives_the_driver_batches_every_epoch(tff_context, tmp_path):
  """Same examples, same shuffle (seed), and a new order each epoch, as the driver's dataset."""
  tf.keras.utils.set_random_seed(3)  # What the runner does: the global seed is the run's seed.
  data = _client_data()
  files = client_files.write_client_files(str(tmp_path), data, ["a"])
  comp = client_files.dataset_computation(data.element_type_structure, 8, graph_seed=3)
  driver = data.create_tf_dataset_for_client("a").shuffle(
      4096, seed=123, reshuffle_each_iteration=True).batch(8)
  seq_type = tff.SequenceType(tff.types.tensorflow_to_type(driver.element_spec))

  @tff.tensorflow.computation(seq_type)
  def two_epochs(ds):
    @tf.function
    def orders(ds):
      def collect(acc, b):
        return tf.concat([acc, b["y"]], 0)
      return (ds.reduce(tf.zeros([0], tf.int32), collect),
              ds.reduce(tf.zeros([0], tf.int32), collect))
    return orders(ds)

  @tff.federated_computation(tff.FederatedType(seq_type, tff.CLIENTS))
  def per_client(ds):
    return tff.federated_map(two_epochs, ds)

  (want_1, want_2), = per_client([driver])
  composed = tff.simulation.compose_dataset_computation_with_computation(comp, per_client)
  (got_1, got_2), = composed([client_files.source(files["a"][0], 123, files["a"][1])])
  np.testing.assert_array_equal(got_1, want_1)
  np.testing.assert_array_equal(got_2, want_2)
  assert sorted(got_1.tolist()) == list(range(37))
  assert got_1.tolist() != got_2.tolist()  # Reshuffled each epoch, as the driver's dataset is.


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("fmnist_client_files")
  write_learnable_fashion_dir(str(d))
  return str(d)


@pytest.mark.parametrize("algorithm", ["fedmask", "fedavg"])
def test_run_with_datasets_built_in_the_computation_equals_driver_built(data_dir, tmp_path, algorithm):
  common = [f"--data_dir={data_dir}", f"--algorithm={algorithm}", "--model=mlp", "--model_width=0.25",
            "--num_clients=6", "--clients_per_round=3", "--rounds=2", "--local_epochs=2",
            "--batch_size=16", "--progress=false"]
  driver, _ = run_cli(common + [f"--output_dir={tmp_path / 'driver'}"])
  assert driver.returncode == 0, driver.stderr[-3000:]
  inside, _ = run_cli(common + [f"--output_dir={tmp_path / 'inside'}", "--client_datasets=workers"])
  assert inside.returncode == 0, inside.stderr[-3000:]
  a = json.load(open(tmp_path / "driver" / "results.json"))
  b = json.load(open(tmp_path / "inside" / "results.json"))
  assert b["config"]["client_datasets"] == "workers"
  assert os.path.isfile(tmp_path / "inside" / "client_data" / client_files.MANIFEST)
  for key in ("train_loss", "uplink_bits", "train_flops", "sampled_clients"):
    assert [r[key] for r in a["rounds"]] == [r[key] for r in b["rounds"]], key
  assert a["final"]["accuracy_per_client"] == b["final"]["accuracy_per_client"]


def test_client_data_dir_needs_the_flag(tmp_path):
  proc, _ = run_cli([f"--output_dir={tmp_path}", "--client_data_dir=/tmp/x"])
  assert proc.returncode == 2
  assert "--client_datasets=workers" in proc.stderr
