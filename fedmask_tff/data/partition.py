"""Non-IID partitions of a labelled dataset over clients (pure numpy).

Each function takes the labels of the whole (pooled) dataset and returns one
int64 array of example indices per client. The arrays are sorted ascending and
pairwise disjoint, so every example is used at most once. Results depend only
on the arguments: the same `seed` always gives the same partition.
"""

import math

import numpy as np

from fedmask_tff.data.errors import DataError


def _check_labels(labels) -> np.ndarray:
  """Returns `labels` as a non-empty 1-D integer array of non-negative values."""
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise DataError(f'labels must be 1-D, got shape {labels.shape}')
  if labels.size == 0:
    raise DataError('labels is empty: there are no examples to partition')
  if not np.issubdtype(labels.dtype, np.integer):
    raise DataError(f'labels must be integers, got dtype {labels.dtype}')
  if labels.min() < 0:
    raise DataError(f'labels must be >= 0, found {int(labels.min())}')
  return labels


def _check_num_clients(num_clients) -> int:
  if isinstance(num_clients, bool) or not isinstance(
      num_clients, (int, np.integer)
  ):
    raise DataError(f'num_clients must be an int, got {num_clients!r}')
  if num_clients < 1:
    raise DataError(f'num_clients must be >= 1, got {num_clients}')
  return int(num_clients)


def _finish(parts: list[list[np.ndarray]]) -> list[np.ndarray]:
  """Concatenates each client's pieces into one sorted int64 index array."""
  out = []
  for pieces in parts:
    if pieces:
      out.append(np.sort(np.concatenate(pieces)).astype(np.int64))
    else:
      out.append(np.zeros([0], dtype=np.int64))
  return out


def pathological_partition(
    labels, num_clients: int, classes_per_client: int = 2, seed: int = 0
) -> list[np.ndarray]:
  """Gives every client exactly `classes_per_client` distinct classes.

  This is the "pathological non-IID" scheme of the FedMask paper (k classes per
  client, k = 2 by default). Clients are visited in a random order and each
  takes the k classes used least so far (ties broken at random), so every class
  is held by either floor(num_clients * k / C) or ceil(...) clients, where C is
  the number of distinct labels. Each class's examples are shuffled and split
  as evenly as possible among the clients holding that class. If
  num_clients * k >= C every example is assigned; otherwise the classes nobody
  holds are left out.

  Args:
    labels: int array [N], the label of every example (values need not be
      contiguous; the distinct values are the classes).
    num_clients: number of clients, >= 1.
    classes_per_client: k, in 1..C.
    seed: seed of `np.random.default_rng`.

  Returns:
    `num_clients` sorted, pairwise disjoint int64 arrays of indices into
    `labels`; client i's examples cover exactly its k classes.

  Raises:
    DataError: on invalid arguments, or if some class has too few examples to
      give each of its clients at least 2.
  """
  labels = _check_labels(labels)
  num_clients = _check_num_clients(num_clients)
  classes = np.unique(labels)
  num_classes = classes.size
  if isinstance(classes_per_client, bool) or not isinstance(
      classes_per_client, (int, np.integer)
  ):
    raise DataError(
        f'classes_per_client must be an int, got {classes_per_client!r}'
    )
  if not 1 <= classes_per_client <= num_classes:
    raise DataError(
        f'classes_per_client must be in 1..{num_classes} (the number of '
        f'distinct labels), got {classes_per_client}'
    )
  rng = np.random.default_rng(seed)

  # Balanced assignment of k distinct classes to every client.
  usage = np.zeros(num_classes, dtype=np.int64)
  client_classes = [None] * num_clients
  for client in rng.permutation(num_clients):
    tie_break = rng.random(num_classes)
    chosen = np.lexsort((tie_break, usage))[:classes_per_client]
    usage[chosen] += 1
    client_classes[client] = chosen

  holders = [[] for _ in range(num_classes)]
  for client, chosen in enumerate(client_classes):
    for c in chosen:
      holders[c].append(client)

  parts = [[] for _ in range(num_clients)]
  for c, clients in enumerate(holders):
    if not clients:
      continue
    members = np.flatnonzero(labels == classes[c])
    if members.size // len(clients) < 2:
      raise DataError(
          f'pathological_partition: class {int(classes[c])} has '
          f'{members.size} examples but is held by {len(clients)} clients; '
          'each client needs at least 2 examples of each of its classes. Use '
          'fewer clients or a smaller classes_per_client.'
      )
    members = rng.permutation(members)
    for client, chunk in zip(clients, np.array_split(members, len(clients))):
      parts[client].append(chunk)
  return _finish(parts)


def dirichlet_partition(
    labels,
    num_clients: int,
    alpha: float,
    seed: int = 0,
    min_examples_per_client: int = 2,
    max_tries: int = 100,
) -> list[np.ndarray]:
  """Splits each class over the clients with Dir(alpha) proportions.

  For every class, client shares p ~ Dirichlet(alpha * 1) are drawn and the
  class's shuffled examples are cut at round(cumsum(p) * n). Small alpha gives
  very skewed label mixes, large alpha nearly IID ones. The draw is repeated
  (up to `max_tries` times) until every client holds at least
  `min_examples_per_client` examples. Every example is assigned.

  Args:
    labels: int array [N] of example labels.
    num_clients: number of clients, >= 1.
    alpha: concentration, > 0 and finite.
    seed: seed of `np.random.default_rng`.
    min_examples_per_client: minimum examples each client must receive, >= 0.
    max_tries: how many draws to attempt, >= 1.

  Returns:
    `num_clients` sorted, pairwise disjoint int64 index arrays that together
    cover range(N).

  Raises:
    DataError: on invalid arguments, or if no draw within `max_tries` gives
      every client `min_examples_per_client` examples.
  """
  labels = _check_labels(labels)
  num_clients = _check_num_clients(num_clients)
  try:
    alpha = float(alpha)
  except (TypeError, ValueError):
    raise DataError(f'alpha must be a number, got {alpha!r}') from None
  if not (math.isfinite(alpha) and alpha > 0):
    raise DataError(f'alpha must be > 0 and finite, got {alpha}')
  if min_examples_per_client < 0:
    raise DataError(
        f'min_examples_per_client must be >= 0, got {min_examples_per_client}'
    )
  if max_tries < 1:
    raise DataError(f'max_tries must be >= 1, got {max_tries}')
  n = labels.size
  if n < num_clients * min_examples_per_client:
    raise DataError(
        f'dirichlet_partition: {n} examples cannot give each of {num_clients} '
        f'clients at least {min_examples_per_client} examples'
    )

  rng = np.random.default_rng(seed)
  members_by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
  for _ in range(max_tries):
    parts = [[] for _ in range(num_clients)]
    counts = np.zeros(num_clients, dtype=np.int64)
    for members in members_by_class:
      p = rng.dirichlet(np.full(num_clients, alpha))
      if not (np.all(np.isfinite(p)) and p.sum() > 0):
        break  # Degenerate draw (possible for tiny alpha): try again.
      members = rng.permutation(members)
      cuts = np.round(np.cumsum(p / p.sum()) * members.size).astype(np.int64)
      for client, chunk in enumerate(np.split(members, cuts[:-1])):
        parts[client].append(chunk)
        counts[client] += chunk.size
    else:
      if counts.min() >= min_examples_per_client:
        return _finish(parts)
  raise DataError(
      f'dirichlet_partition: no draw in {max_tries} tries gave each of '
      f'{num_clients} clients at least {min_examples_per_client} examples '
      f'({n} examples, alpha={alpha}); increase alpha, or lower num_clients or '
      'min_examples_per_client'
  )
