"""A run's partition as a JSON file: client id -> indices of its train and test examples.

Every run writes ``<output_dir>/partition.json``; ``--partition_file=PATH``
rebuilds exactly that split, so runs of other algorithms (or other libraries)
can be compared on the identical clients. Format (``format`` is checked)::

    {"format": "fedmask_tff.partition/v1",
     "dataset": "fashion_mnist",
     "source": "positions in the pooled data: 60,000 train images, then 10,000 t10k",
     "num_source_examples": 70000,
     "clients": {"client_0000": {"train": [int, ...], "test": [int, ...]}, ...}}

Indices are positions in the data set's source order (see ``source``).
"""

from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np

from fedmask_tff.data.errors import DataError

FORMAT = "fedmask_tff.partition/v1"


def save_partition(path: str, split, dataset: str, source: str, num_source_examples: int) -> None:
  """Writes ``split.train_indices`` / ``split.test_indices`` to ``path`` (atomically)."""
  if split.train_indices is None or split.test_indices is None:
    raise ValueError("this split does not record its example indices")
  payload = {"format": FORMAT, "dataset": dataset, "source": source,
             "num_source_examples": int(num_source_examples),
             "clients": {cid: {"train": [int(i) for i in split.train_indices[cid]],
                               "test": [int(i) for i in split.test_indices[cid]]}
                         for cid in split.client_ids}}
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(payload, f, separators=(",", ":"))
    f.write("\n")
  os.replace(tmp, path)


def load_partition(path: str, dataset: Optional[str] = None,
                   num_source_examples: Optional[int] = None) -> tuple[list, list]:
  """Reads a partition file; returns ``(client_ids, [(train_idx, test_idx), ...])``.

  Raises:
    DataError: missing or unreadable file, wrong format or data set, indices
      that are not integers, out of range, or used twice.
  """
  if not os.path.isfile(path):
    raise DataError(f"partition file {path} does not exist")
  try:
    with open(path) as f:
      payload = json.load(f)
  except (OSError, ValueError) as e:
    raise DataError(f"partition file {path} is not readable JSON: {e}") from None
  if not isinstance(payload, dict) or payload.get("format") != FORMAT:
    raise DataError(f"partition file {path} is not a {FORMAT} file")
  if dataset is not None and payload.get("dataset") != dataset:
    raise DataError(f"partition file {path} is for data set {payload.get('dataset')!r}, "
                    f"this run uses {dataset!r}")
  n = num_source_examples
  if n is not None and payload.get("num_source_examples") != n:
    raise DataError(f"partition file {path} was made for {payload.get('num_source_examples')} "
                    f"source examples; the data found here has {n}")
  clients = payload.get("clients")
  if not isinstance(clients, dict) or not clients:
    raise DataError(f"partition file {path} has no clients")
  ids, splits, seen = [], [], set()
  for cid, parts in clients.items():
    try:
      train = np.asarray(parts["train"], np.int64)
      test = np.asarray(parts["test"], np.int64)
    except (KeyError, TypeError, ValueError):
      raise DataError(f"partition file {path}: client {cid!r} needs integer lists "
                      f"'train' and 'test'") from None
    if train.ndim != 1 or test.ndim != 1 or train.size == 0 or test.size == 0:
      raise DataError(f"partition file {path}: client {cid!r} needs non-empty train and test")
    both = np.concatenate([train, test])
    if n is not None and (both.min() < 0 or both.max() >= n):
      raise DataError(f"partition file {path}: client {cid!r} has indices outside 0..{n - 1}")
    if len(set(both.tolist()) & seen) or len(set(both.tolist())) != both.size:
      raise DataError(f"partition file {path}: client {cid!r} reuses an example")
    seen.update(both.tolist())
    ids.append(str(cid))
    splits.append((train, test))
  return ids, splits


def source_description(dataset: str, split) -> tuple[str, int]:
  """What a partition file's indices point into, and how many source examples there are
  (-1 when the loader does not say)."""
  n = split.num_source_examples if split.num_source_examples is not None else -1
  if dataset == "fashion_mnist":
    return ("positions in the pooled Fashion-MNIST: the train images, then the t10k images", n)
  return (f"positions in the {dataset} loader's source order", n)


def save_split_partition(path: str, split, dataset: str) -> None:
  """Writes ``split``'s clients (their train/test example indices) to ``path``."""
  source, n = source_description(dataset, split)
  save_partition(path, split, dataset, source, n)
