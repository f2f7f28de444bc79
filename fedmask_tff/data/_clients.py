"""Helpers shared by the dataset loaders: client ids and `FederatedSplit` assembly.

Client ids become file names (per-client state files, partition files), so
every loader passes the ids of its source through `sanitize_client_ids`, which
guarantees ids matching `CLIENT_ID_PATTERN`, unique, and never `.`/`..`-like.
The mapping back to the source's ids is kept in `FederatedSplit.original_ids`
(sanitized id -> original id, for every client).

Importing this module does not import TensorFlow or TFF.
"""

from __future__ import annotations

import collections
import hashlib
import re
from typing import Any, Iterable, Mapping, Optional

import numpy as np

from fedmask_tff.data.errors import DataError

CLIENT_ID_PATTERN = re.compile(r'^[A-Za-z0-9_.\-]+$')
_BAD_CHARS = re.compile(r'[^A-Za-z0-9_.\-]')
# Longer ids are cut and given a hash suffix (file names are limited to 255
# bytes, and the ids are combined with prefixes and suffixes).
MAX_CLIENT_ID_LENGTH = 100


def sanitize_client_id(original: str) -> str:
  """Returns a file-name-safe version of one id (uniqueness not guaranteed).

  Rules: the id is converted to `str`; every character outside
  `[A-Za-z0-9_.-]` becomes `_`; a leading `.` becomes `_` (no hidden files,
  no `.`/`..`); an empty id becomes `_`; an id longer than
  `MAX_CLIENT_ID_LENGTH` is cut and ends in `-` + 8 hex digits of the SHA-1 of
  the original. Ids that already match the pattern and are short are kept as
  they are.
  """
  original = str(original)
  out = _BAD_CHARS.sub('_', original)
  if out.startswith('.'):
    out = '_' + out[1:]
  if not out:
    out = '_'
  if len(out) > MAX_CLIENT_ID_LENGTH:
    digest = hashlib.sha1(original.encode('utf-8')).hexdigest()[:8]
    out = out[: MAX_CLIENT_ID_LENGTH - 9] + '-' + digest
  return out


def sanitize_client_ids(originals: Iterable[Any]) -> tuple[list[str], dict]:
  """Sanitizes ids (see `sanitize_client_id`) and makes them unique.

  When two ids sanitize to the same string, the later one (in the given
  order) gets the suffix `-2`, `-3`, ... (the first free one).

  Args:
    originals: the source's ids, distinct.

  Returns:
    `(ids, original_ids)`: the new ids in the given order, and the dict
    new id -> original id.

  Raises:
    DataError: if `originals` has duplicates.
  """
  originals = list(originals)
  if len(set(originals)) != len(originals):
    dup = [k for k, v in collections.Counter(originals).items() if v > 1]
    raise DataError(f'duplicate client ids: {dup[:5]}')
  used = set()
  ids, mapping = [], {}
  # Ids already valid keep their name; the others are placed afterwards, so a
  # valid id is never renamed because of a clash with a sanitized one.
  order = sorted(
      range(len(originals)),
      key=lambda i: sanitize_client_id(originals[i]) != str(originals[i]),
  )
  new = [None] * len(originals)
  for i in order:
    base = sanitize_client_id(originals[i])
    candidate, k = base, 2
    while candidate in used:
      candidate = f'{base}-{k}'
      k += 1
    used.add(candidate)
    new[i] = candidate
  for i, cid in enumerate(new):
    ids.append(cid)
    mapping[cid] = originals[i]
  return ids, mapping


def check_max_clients(max_clients) -> Optional[int]:
  if max_clients is None:
    return None
  if isinstance(max_clients, bool) or not isinstance(
      max_clients, (int, np.integer)
  ):
    raise DataError(f'max_clients must be an int or None, got {max_clients!r}')
  if max_clients < 1:
    raise DataError(f'max_clients must be >= 1, got {max_clients}')
  return int(max_clients)


CLIENT_ORDERS = ('sorted', 'random')


def select_clients(
    ids: list, max_clients=None, client_order: str = 'sorted', seed=0
) -> list:
  """Returns the clients to keep, in sorted order.

  `client_order='sorted'`: the first `max_clients` ids in sorted order;
  `'random'`: `max_clients` ids drawn without replacement with
  `np.random.default_rng(seed)`. All ids (sorted) when `max_clients` is None
  or at least their number.
  """
  max_clients = check_max_clients(max_clients)
  if client_order not in CLIENT_ORDERS:
    raise DataError(
        f'unknown client_order {client_order!r}; valid: '
        + ', '.join(CLIENT_ORDERS)
    )
  ids = sorted(ids)
  if max_clients is None or max_clients >= len(ids):
    return ids
  if client_order == 'sorted':
    return ids[:max_clients]
  rng = np.random.default_rng(seed)
  pick = np.sort(rng.choice(len(ids), size=max_clients, replace=False))
  return [ids[i] for i in pick]


def attach(split, original_ids: Optional[dict] = None, info=None):
  """Stores `original_ids` and `info` on a `FederatedSplit`.

  Uses the dataclass fields of those names when `FederatedSplit` has them,
  otherwise plain attributes (so the loaders work before and after the fields
  are added).
  """
  for name, value in (('original_ids', original_ids), ('info', info)):
    if value is not None:
      setattr(split, name, value)
  return split


def make_split(
    train: Mapping[str, Mapping[str, np.ndarray]],
    test: Mapping[str, Mapping[str, np.ndarray]],
    num_classes: int,
    train_indices: Optional[dict] = None,
    test_indices: Optional[dict] = None,
    original_ids: Optional[dict] = None,
    info: Optional[dict] = None,
):
  """Builds a `FederatedSplit` from in-memory per-client arrays.

  Args:
    train: client id -> {'x': array [n, ...], 'y': int array [n]}, every
      client non-empty. The ids must already be sanitized.
    test: the same clients (same keys, same order) with their test examples.
    num_classes: labels must lie in 0..num_classes-1.
    train_indices, test_indices: optional dict client id -> int64 array.
    original_ids: optional dict client id -> source id.
    info: optional dict of plain-Python facts about the load (dropped
      clients, policies used); stored as `split.info`.

  Returns:
    A `FederatedSplit` backed by `TestClientData`, with label counts.

  Raises:
    DataError: on mismatched clients, empty clients, bad ids or labels.
  """
  from fedmask_tff.data.federated import FederatedSplit  # pylint: disable=g-import-not-at-top

  ids = list(train.keys())
  if list(test.keys()) != ids:
    raise DataError('train and test must hold the same clients in the same order')
  if not ids:
    raise DataError('no clients left to build a federated split from')
  for cid in ids:
    if not CLIENT_ID_PATTERN.match(cid):
      raise DataError(f'client id {cid!r} does not match {CLIENT_ID_PATTERN.pattern}')
  train_dict, test_dict = collections.OrderedDict(), collections.OrderedDict()
  train_counts = np.zeros([len(ids), num_classes], np.int64)
  test_counts = np.zeros([len(ids), num_classes], np.int64)
  for i, cid in enumerate(ids):
    for name, source, target, counts in (
        ('train', train, train_dict, train_counts),
        ('test', test, test_dict, test_counts),
    ):
      x = np.asarray(source[cid]['x'])
      y = np.asarray(source[cid]['y'])
      if y.ndim != 1 or x.shape[:1] != y.shape:
        raise DataError(
            f'client {cid} {name}: x {x.shape} and y {y.shape} disagree'
        )
      if y.size == 0:
        raise DataError(f'client {cid} has no {name} examples')
      if y.min() < 0 or y.max() >= num_classes:
        raise DataError(
            f'client {cid} {name}: labels must lie in 0..{num_classes - 1}, '
            f'found {int(y.min())}..{int(y.max())}'
        )
      y = y.astype(np.int32)
      target[cid] = collections.OrderedDict(x=x, y=y)
      counts[i] = np.bincount(y, minlength=num_classes)

  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

  split = FederatedSplit(
      train=tff.simulation.datasets.TestClientData(train_dict),
      test=tff.simulation.datasets.TestClientData(test_dict),
      client_ids=ids,
      num_classes=int(num_classes),
      train_label_counts=train_counts,
      test_label_counts=test_counts,
      train_indices=train_indices,
      test_indices=test_indices,
  )
  return attach(split, original_ids=original_ids, info=info)

