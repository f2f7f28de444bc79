"""Per-client train/test splits and TFF `ClientData` for federated training."""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any, Optional, Sequence, TYPE_CHECKING

import numpy as np

from fedmask_tff.data import fashion_mnist
from fedmask_tff.data import partition as partition_lib
from fedmask_tff.data import partition_file as partition_file_lib
from fedmask_tff.data.errors import DataError

if TYPE_CHECKING:
  from tensorflow_federated.python.simulation.datasets.client_data import ClientData

# Names accepted by `load_partitioned_fashion_mnist(partition=...)`.
PARTITIONS = ('pathological', 'dirichlet')


def client_id(i: int) -> str:
  """The id of the i-th client, e.g. `client_0007`."""
  return f'client_{i:04d}'


def split_client_examples(
    indices, labels, test_fraction: float, seed
) -> tuple[np.ndarray, np.ndarray]:
  """Splits one client's examples into train and test with the same label mix.

  For every label with n examples, round(test_fraction * n) of them (rounding
  half up), clipped to 1..n-1 when n >= 2, go to test; a label with a single
  example goes to train. If that leaves the test set empty although the client
  has at least 2 examples (all its labels are singletons), one random example
  is moved to test, so any client with >= 2 examples gets a non-empty train and
  test set.

  Args:
    indices: int array [n_client] of this client's (distinct) example indices.
    labels: int array [N] of the labels of the whole dataset.
    test_fraction: fraction in (0, 1) of each label's examples sent to test.
    seed: anything `np.random.default_rng` accepts (int, sequence of ints,
      SeedSequence).

  Returns:
    `(train_idx, test_idx)`: sorted, disjoint int64 arrays whose union is
    `indices`.

  Raises:
    DataError: if `test_fraction` is not in (0, 1) or `indices` is not a 1-D
      array of distinct valid indices into `labels`.
  """
  try:
    test_fraction = float(test_fraction)
  except (TypeError, ValueError):
    raise DataError(
        f'test_fraction must be a number, got {test_fraction!r}'
    ) from None
  if not (math.isfinite(test_fraction) and 0.0 < test_fraction < 1.0):
    raise DataError(
        f'test_fraction must be strictly between 0 and 1, got {test_fraction}'
    )
  labels = np.asarray(labels)
  indices = np.asarray(indices)
  if indices.ndim != 1 or not (
      indices.size == 0 or np.issubdtype(indices.dtype, np.integer)
  ):
    raise DataError(
        'indices must be a 1-D integer array, got shape '
        f'{indices.shape} dtype {indices.dtype}'
    )
  indices = indices.astype(np.int64)
  if indices.size and (indices.min() < 0 or indices.max() >= labels.shape[0]):
    raise DataError(
        f'indices must lie in 0..{labels.shape[0] - 1}, found '
        f'{int(indices.min())}..{int(indices.max())}'
    )
  if np.unique(indices).size != indices.size:
    raise DataError('indices contains duplicates')

  rng = np.random.default_rng(seed)
  client_labels = labels[indices]
  train_parts, test_parts = [], []
  for label in np.unique(client_labels):
    members = rng.permutation(indices[client_labels == label])
    n = members.size
    n_test = int(math.floor(test_fraction * n + 0.5))
    n_test = min(max(n_test, 1), n - 1) if n >= 2 else 0
    test_parts.append(members[:n_test])
    train_parts.append(members[n_test:])
  train = np.concatenate(train_parts) if train_parts else indices[:0]
  test = np.concatenate(test_parts) if test_parts else indices[:0]
  if test.size == 0 and train.size >= 2:
    pick = int(rng.integers(train.size))
    test = train[pick : pick + 1]
    train = np.delete(train, pick)
  return np.sort(train), np.sort(test)


def _stats(values: np.ndarray, prefix: str) -> dict[str, Any]:
  return {
      f'min_{prefix}': int(np.min(values)),
      f'median_{prefix}': float(np.median(values)),
      f'max_{prefix}': int(np.max(values)),
  }


@dataclasses.dataclass
class FederatedSplit:
  """A federated dataset: the same clients, each with a train and a test set.

  Attributes:
    train: `tff.simulation.datasets.ClientData`; each client's dataset yields
      unbatched `OrderedDict(x=float32 image [H, W, C], y=int32 scalar)`.
    test: the same clients' held-out examples, same element structure.
    client_ids: ids of the clients, `client_0000`, `client_0001`, ...
    num_classes: number of classes; labels lie in 0..num_classes-1.
    train_label_counts: optional int64 [num_clients, num_classes], examples
      per (client, label) in `train`; computed from the datasets if None.
    test_label_counts: the same for `test`.
    train_indices: optional dict client id -> int64 array: the positions of
      the client's train examples in the loader's source order (for
      Fashion-MNIST: the pooled 70,000 images, the 60,000 train images first).
      Saved with a run as its partition file.
    test_indices: the same for the test examples.
    num_source_examples: how many examples the source order has.
    original_ids: optional dict client id -> the data set's own id, where the
      id had to be made safe for file names (LEAF writers, Shakespeare roles).
    info: optional loader facts (dropped users, index space, ...).

  Client datasets yield `OrderedDict(x, y)`: `x` a float32 image [H, W, C],
  a float32 sensor window [128, 9] (HAR) or int32 character ids [seq_len]
  (Shakespeare); `y` an int32 label. Ids come from the data set where it has
  them (writers, subjects, roles), else `client_0000`, ...
  """

  train: ClientData
  test: ClientData
  client_ids: list[str]
  num_classes: int
  train_label_counts: Optional[np.ndarray] = dataclasses.field(
      default=None, repr=False
  )
  test_label_counts: Optional[np.ndarray] = dataclasses.field(
      default=None, repr=False
  )
  train_indices: Optional[dict] = dataclasses.field(default=None, repr=False)
  test_indices: Optional[dict] = dataclasses.field(default=None, repr=False)
  num_source_examples: Optional[int] = None
  original_ids: Optional[dict] = dataclasses.field(default=None, repr=False)
  info: Optional[dict] = dataclasses.field(default=None, repr=False)

  def _label_counts(self, data: ClientData) -> np.ndarray:
    counts = np.zeros([len(self.client_ids), self.num_classes], np.int64)
    for i, cid in enumerate(self.client_ids):
      ys = [int(e['y']) for e in data.create_tf_dataset_for_client(cid)]
      counts[i] = np.bincount(ys, minlength=self.num_classes)
    return counts

  def summary(self) -> dict[str, Any]:
    """Returns plain-Python statistics of the split (JSON-serializable).

    Keys: num_clients, num_classes, total_train_examples,
    total_test_examples, and min_/median_/max_ of train_examples_per_client,
    test_examples_per_client and classes_per_client (distinct labels in a
    client's train and test examples together).
    """
    train_counts = self.train_label_counts
    if train_counts is None:
      train_counts = self._label_counts(self.train)
    test_counts = self.test_label_counts
    if test_counts is None:
      test_counts = self._label_counts(self.test)
    train_per_client = train_counts.sum(axis=1)
    test_per_client = test_counts.sum(axis=1)
    classes_per_client = ((train_counts + test_counts) > 0).sum(axis=1)
    out = {
        'num_clients': len(self.client_ids),
        'num_classes': int(self.num_classes),
        'total_train_examples': int(train_per_client.sum()),
        'total_test_examples': int(test_per_client.sum()),
    }
    out.update(_stats(train_per_client, 'train_examples_per_client'))
    out.update(_stats(test_per_client, 'test_examples_per_client'))
    out.update(_stats(classes_per_client, 'classes_per_client'))
    for key, value in (self.info or {}).items():
      if isinstance(value, (int, float, str, bool)):
        out[f'loader_{key}'] = value
    return out


def _checked_examples(images, labels, num_classes):
  """Checks the pooled examples and casts the images.

  Args:
    images: numeric array [N, ...]; must be finite.
    labels: integer array [N].
    num_classes: number of classes, or None for max(labels) + 1.

  Returns:
    `(images, labels, num_classes)`: images as float32 [N, ...], labels as a
    numpy array (dtype unchanged), num_classes (as given, or the default).

  Raises:
    DataError: on mismatched shapes, empty or non-integer labels, non-numeric
      or non-finite images, or labels outside 0..num_classes-1.
  """
  images = np.asarray(images)
  labels = np.asarray(labels)
  if images.ndim < 1 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
    raise DataError(
        f'images [N, ...] and labels [N] must have the same N, got shapes '
        f'{images.shape} and {labels.shape}'
    )
  if labels.size == 0:
    raise DataError('labels is empty')
  if not np.issubdtype(labels.dtype, np.integer):
    raise DataError(f'labels must be integers, got dtype {labels.dtype}')
  if not (
      np.issubdtype(images.dtype, np.floating)
      or np.issubdtype(images.dtype, np.integer)
  ):
    raise DataError(f'images must be numeric, got dtype {images.dtype}')
  images = images.astype(np.float32, copy=False)
  finite = np.isfinite(images.reshape(images.shape[0], -1)).all(axis=1)
  if not finite.all():
    bad = np.flatnonzero(~finite)
    raise DataError(
        f'images contain NaN or inf values in {bad.size} examples (first: '
        f'index {int(bad[0])})'
    )
  if num_classes is None:
    num_classes = int(labels.max()) + 1
  if labels.min() < 0 or labels.max() >= num_classes:
    raise DataError(
        f'labels must lie in 0..{num_classes - 1}, found '
        f'{int(labels.min())}..{int(labels.max())}'
    )
  return images, labels, num_classes


def _checked_client_splits(
    client_splits: Sequence[tuple], num_examples: int
) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[np.ndarray]]:
  """Casts given per-client `(train_idx, test_idx)` pairs and checks their range.

  Args:
    client_splits: one `(train_idx, test_idx)` pair of index arrays per client.
    num_examples: N, the number of pooled examples the indices refer to.

  Returns:
    `(client_splits, client_indices)`: the pairs as int64 arrays, and per
    client the int64 array train_idx followed by test_idx.

  Raises:
    DataError: if a client with both a train and a test index refers to an
      example outside 0..N-1.
  """
  client_splits = [(np.asarray(a, np.int64), np.asarray(b, np.int64)) for a, b in client_splits]
  client_indices = [np.concatenate([a, b]) for a, b in client_splits]
  for a, b in client_splits:
    if a.size and b.size and (min(a.min(), b.min()) < 0 or max(a.max(), b.max()) >= num_examples):
      raise DataError(f'a client split refers to examples outside 0..{num_examples - 1}')
  return client_splits, client_indices


def _checked_client_ids(client_ids: Optional[Sequence[str]], num_clients: int) -> list[str]:
  """The given client ids as a list, or `client_0000`, ... when None.

  Raises:
    DataError: if there are not `num_clients` ids or they are not unique.
  """
  ids = list(client_ids) if client_ids is not None else [client_id(i) for i in range(num_clients)]
  if len(ids) != num_clients or len(set(ids)) != num_clients:
    raise DataError(f'{len(ids)} client ids for {num_clients} clients, or ids not unique')
  return ids


def _assign_client_examples(
    ids: list[str],
    client_indices: Sequence[np.ndarray],
    labels: np.ndarray,
    test_fraction: float,
    seed: int,
    client_splits: Optional[list[tuple[np.ndarray, np.ndarray]]],
) -> tuple[dict, dict]:
  """Each client's train and test example indices into the pooled examples.

  Client i's examples are taken from `client_splits[i]` when given, else drawn
  by `split_client_examples` with seed `[seed, i]` (clients in order).

  Args:
    ids: the client ids, one per entry of `client_indices`.
    client_indices: per client, a 1-D int array of all its example indices.
    labels: int array [N] of the pooled labels.
    test_fraction: per-label fraction of each client's examples held out.
    seed: seed of the train/test split.
    client_splits: None, or per client an int64 `(train_idx, test_idx)` pair.

  Returns:
    `(train_positions, test_positions)`: dicts client id -> int64 array of
    indices in 0..N-1, in the order of `ids`.

  Raises:
    DataError: for a client without examples or with an empty train or test
      set (the message names it), or an example used by several clients.
  """
  use_count = np.zeros(labels.shape[0], dtype=np.int64)
  train_positions, test_positions = {}, {}
  for i, (cid, indices) in enumerate(zip(ids, client_indices)):
    indices = np.asarray(indices)
    if indices.size == 0:
      raise DataError(f'{cid} has no examples')
    if client_splits is not None:
      train_idx, test_idx = client_splits[i]
    else:
      try:
        train_idx, test_idx = split_client_examples(
            indices, labels, test_fraction, seed=[seed, i]
        )
      except DataError as e:
        raise DataError(f'{cid}: {e}') from None
    if train_idx.size == 0 or test_idx.size == 0:
      raise DataError(
          f'{cid} has {indices.size} example(s), too few for a non-empty '
          'train and test set (needs at least 2)'
      )
    np.add.at(use_count, indices.astype(np.int64), 1)
    train_positions[cid] = np.asarray(train_idx, np.int64)
    test_positions[cid] = np.asarray(test_idx, np.int64)
  if use_count.max() > 1:
    reused = np.flatnonzero(use_count > 1)
    raise DataError(
        f'{reused.size} example(s) are assigned to more than one client '
        f'(first: index {int(reused[0])}); client_indices must be disjoint'
    )
  return train_positions, test_positions


def _client_arrays(
    images: np.ndarray,
    labels: np.ndarray,
    positions: dict,
    counts: np.ndarray,
    num_classes: int,
) -> collections.OrderedDict:
  """Per-client example arrays; fills `counts` in place.

  Args:
    images: float32 [N, ...] pooled images.
    labels: int array [N] of the pooled labels.
    positions: dict client id -> int64 array of indices into the pool.
    counts: int64 [num_clients, num_classes]; row i receives the label counts
      of the i-th client of `positions`.
    num_classes: number of classes.

  Returns:
    OrderedDict client id -> `OrderedDict(x=float32 [n, ...], y=int32 [n])`.
  """
  data = collections.OrderedDict()
  for i, (cid, idx) in enumerate(positions.items()):
    y = labels[idx].astype(np.int32)
    data[cid] = collections.OrderedDict(x=images[idx], y=y)
    counts[i] = np.bincount(y, minlength=num_classes)
  return data


def build_federated_split(
    images,
    labels,
    client_indices: Sequence[np.ndarray],
    test_fraction: float = 0.2,
    seed: int = 0,
    num_classes: Optional[int] = None,
    client_splits: Optional[Sequence[tuple]] = None,
    client_ids: Optional[Sequence[str]] = None,
) -> FederatedSplit:
  """Builds train and test `ClientData` from a partition of a pooled dataset.

  With `client_splits` (one `(train_idx, test_idx)` pair per client, e.g. from
  a saved partition file) the per-client split is taken as given instead of
  drawn; `client_indices` is then ignored (pass None). `client_ids` overrides
  the default ids.

  Client i (id `client_{i:04d}`) gets the examples `client_indices[i]`, split
  by `split_client_examples` with seed `[seed, i]`. The client datasets are
  backed by per-client numpy copies (`tff.simulation.datasets.TestClientData`),
  in ascending index order and unbatched; shuffle and batch them downstream.

  Args:
    images: float array [N, ...] (e.g. [N, 28, 28, 1]), already scaled; cast
      to float32. Must be finite.
    labels: int array [N] with values in 0..num_classes-1; cast to int32.
    client_indices: one 1-D int array of example indices per client (e.g. from
      `pathological_partition`); indices must be distinct across all clients.
    test_fraction: per-label fraction of each client's examples held out.
    seed: seed of the train/test split.
    num_classes: number of classes; default max(labels) + 1.

  Returns:
    A `FederatedSplit` whose datasets yield
    `OrderedDict(x=float32 [...image shape], y=int32 [])`.

  Raises:
    DataError: on mismatched or non-finite inputs, labels out of range, an
      index used twice, or a client whose train or test set would be empty
      (the message names the client).
  """
  images, labels, num_classes = _checked_examples(images, labels, num_classes)
  if client_splits is not None:
    client_splits, client_indices = _checked_client_splits(client_splits, labels.shape[0])
  num_clients = len(client_indices)
  if num_clients == 0:
    raise DataError('client_indices is empty: no clients')
  train_counts = np.zeros([num_clients, num_classes], dtype=np.int64)
  test_counts = np.zeros([num_clients, num_classes], dtype=np.int64)
  ids = _checked_client_ids(client_ids, num_clients)
  train_positions, test_positions = _assign_client_examples(
      ids, client_indices, labels, test_fraction, seed, client_splits
  )
  train_dict = _client_arrays(images, labels, train_positions, train_counts, num_classes)
  test_dict = _client_arrays(images, labels, test_positions, test_counts, num_classes)

  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

  return FederatedSplit(
      train=tff.simulation.datasets.TestClientData(train_dict),
      test=tff.simulation.datasets.TestClientData(test_dict),
      client_ids=ids,
      num_classes=int(num_classes),
      train_label_counts=train_counts,
      test_label_counts=test_counts,
      train_indices=train_positions,
      test_indices=test_positions,
      num_source_examples=int(labels.shape[0]),
  )


def load_partitioned_fashion_mnist(
    data_dir=None,
    num_clients: int = 100,
    partition: str = 'pathological',
    classes_per_client: int = 2,
    dirichlet_alpha: float = 0.5,
    test_fraction: float = 0.2,
    seed: int = 0,
    partition_file: Optional[str] = None,
) -> FederatedSplit:
  """Loads Fashion-MNIST (train + t10k pooled) and splits it over clients.

  With `partition_file` (a run's `partition.json`) the saved client ids and
  per-client train/test indices are used as they are, and the partition
  arguments are ignored.

  Args:
    data_dir: directory of the IDX files, or None to search the defaults.
    num_clients: number of clients.
    partition: one of `PARTITIONS`: 'pathological' (`classes_per_client`
      classes per client) or 'dirichlet' (Dir(`dirichlet_alpha`) label mix).
    classes_per_client: k for the pathological partition.
    dirichlet_alpha: alpha for the Dirichlet partition.
    test_fraction: per-client, per-label fraction held out for test.
    seed: seed of both the partition and the per-client split.

  Returns:
    A `FederatedSplit` with 28x28x1 float32 images and 10 classes.

  Raises:
    DataError: for an unknown partition name (listing the valid ones), missing
      or invalid files, or an impossible partition.
  """
  if partition_file is not None:
    images, labels = fashion_mnist.load_fashion_mnist(data_dir)
    return split_from_partition_file(
        partition_file, images, labels, fashion_mnist.NUM_CLASSES, dataset='fashion_mnist')
  if partition not in PARTITIONS:
    raise DataError(
        f'unknown partition {partition!r}; valid: {", ".join(PARTITIONS)}'
    )
  images, labels = fashion_mnist.load_fashion_mnist(data_dir)
  if partition == 'pathological':
    client_indices = partition_lib.pathological_partition(
        labels, num_clients, classes_per_client, seed
    )
  else:
    client_indices = partition_lib.dirichlet_partition(
        labels, num_clients, dirichlet_alpha, seed
    )
  return build_federated_split(
      images,
      labels,
      client_indices,
      test_fraction=test_fraction,
      seed=seed,
      num_classes=fashion_mnist.NUM_CLASSES,
  )


def split_from_partition_file(path: str, images, labels, num_classes: int, dataset: str):
  """The :class:`FederatedSplit` that partition file ``path`` describes, over pooled
  ``images``/``labels``."""
  ids, splits = partition_file_lib.load_partition(path, dataset=dataset,
                                                  num_source_examples=int(np.shape(labels)[0]))
  return build_federated_split(images, labels, None, num_classes=num_classes,
                               client_splits=splits, client_ids=ids)
