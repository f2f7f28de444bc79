"""Partition files: a run's exact split, saved and reused."""

import json

import numpy as np
import pytest

from fedmask_tff.data import DataError
from fedmask_tff.data import partition_file
from fedmask_tff.data.federated import build_federated_split, split_from_partition_file
from fedmask_tff.data.partition import pathological_partition


def _split(seed=0):
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(4), 30)
  images = rng.random((labels.size, 4, 4, 1)).astype(np.float32)
  parts = pathological_partition(labels, 6, 2, seed)
  return images, labels, build_federated_split(images, labels, parts, seed=seed, num_classes=4)


def test_round_trip_gives_the_identical_split(tmp_path):
  images, labels, split = _split()
  path = str(tmp_path / "partition.json")
  partition_file.save_partition(path, split, "toy", "positions in the toy array", labels.size)
  again = split_from_partition_file(path, images, labels, 4, dataset="toy")
  assert again.client_ids == split.client_ids
  for cid in split.client_ids:
    np.testing.assert_array_equal(again.train_indices[cid], split.train_indices[cid])
    np.testing.assert_array_equal(again.test_indices[cid], split.test_indices[cid])
    a = [int(e["y"]) for e in again.test.create_tf_dataset_for_client(cid)]
    b = [int(e["y"]) for e in split.test.create_tf_dataset_for_client(cid)]
    assert a == b
  # Indices are positions in the source: each client's test labels match them.
  cid = split.client_ids[0]
  np.testing.assert_array_equal(labels[split.test_indices[cid]],
                                [int(e["y"]) for e in split.test.create_tf_dataset_for_client(cid)])


def test_a_different_seed_gives_a_different_split_unless_the_file_is_used(tmp_path):
  images, labels, split = _split(seed=0)
  _, _, other = _split(seed=1)
  assert any(not np.array_equal(split.train_indices[c], other.train_indices[c]) for c in split.client_ids)


@pytest.mark.parametrize("mutate, message", [
    (lambda p: p.update(format="other"), "is not a"),
    (lambda p: p.update(dataset="cifar10"), "is for data set"),
    (lambda p: p.update(num_source_examples=7), "source examples"),
    (lambda p: p["clients"]["client_0000"].update(test=[]), "non-empty"),
    (lambda p: p["clients"]["client_0000"].update(train=[10 ** 6]), "outside"),
    (lambda p: p["clients"]["client_0001"].update(
        train=p["clients"]["client_0000"]["train"]), "reuses"),
    (lambda p: p["clients"]["client_0000"].update(train=["a"]), "integer"),
])
def test_bad_files_are_named(tmp_path, mutate, message):
  images, labels, split = _split()
  path = str(tmp_path / "partition.json")
  partition_file.save_partition(path, split, "toy", "src", labels.size)
  payload = json.load(open(path))
  mutate(payload)
  json.dump(payload, open(path, "w"))
  with pytest.raises(DataError, match=message):
    split_from_partition_file(path, images, labels, 4, dataset="toy")


def test_missing_and_truncated_files(tmp_path):
  images, labels, split = _split()
  with pytest.raises(DataError, match="does not exist"):
    partition_file.load_partition(str(tmp_path / "nope.json"))
  path = str(tmp_path / "partition.json")
  partition_file.save_partition(path, split, "toy", "src", labels.size)
  text = open(path).read()
  open(path, "w").write(text[: len(text) // 2])
  with pytest.raises(DataError, match="not readable JSON"):
    partition_file.load_partition(path)
