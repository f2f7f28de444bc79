"""LEAF's JSON format: FEMNIST (one client per writer) and Shakespeare (per role).

Layout: a folder with `train/` and `test/` subfolders, each holding one or more
shards `*.json` or `*.json.gz` of the form

    {"users": [u, ...], "num_samples": [n, ...],
     "user_data": {u: {"x": [...], "y": [...]}, ...}}

FEMNIST: `x` is a list of 784 floats in [0, 1] per image, where 1.0 is the
background (white) and 0.0 the ink; `y` an int in 0..61 (0-9 digits, 10-35
upper case, 36-61 lower case). Images are reshaped to float32 [28, 28, 1] and
kept in that convention by default (`invert=False`), the same as TFF's EMNIST
(`tff.simulation.datasets.emnist`, also 1.0 = background, served by our
`emnist` loader unchanged), so models move between the two. `invert=True`
gives 1 - x (0.0 = background, MNIST-like) for both loaders.

Shakespeare: `x` is an 80-character context string and `y` the next
character; both are mapped with the vocabulary of `fedmask_tff.data.shakespeare`
to `x` int32 [seq_len], `y` int32 (see `leaf_pair_to_example`). Examples are
counted as `len(x)`; a `num_samples` entry that disagrees is recorded in
`info['num_samples_mismatches']` and logged, not an error.

Merging policy (a user may appear in several shards or in several LEAF
samples, e.g. the 9 FEMNIST writers in both samples of our real data; the
samples hold differently split copies of the writer's images, so mixing them
could put the same image in train and test):

* Each user is kept once, with its train examples from ONE train file and its
  test examples from ONE test file, never merged across files.
* Files are visited in sorted order of their names. Train and test files are
  paired by name: a train file's partner is the test file whose name equals it
  with the last `train` replaced by `test` (LEAF's `..._train_9.json` /
  `..._test_9.json`). The user's data comes from the first train file (sorted)
  whose partner also holds the user; if none does, from the first train file
  and the first test file holding it (counted in `info['unpaired_users']`).
* Other occurrences are dropped (`info['duplicate_users']`: users seen more
  than once in a split; `info['dropped_duplicate_occurrences']`).
* Users only in train or only in test, or with no example in one of them, are
  dropped and counted (`info['dropped_train_only_clients']`,
  `info['dropped_test_only_clients']`, `info['dropped_empty_clients']`).

Client ids are the users sanitized (`_clients.sanitize_client_ids`),
`split.original_ids` maps back. `max_clients` keeps the first N users in
sorted order of their original ids (`client_order='random'`: N drawn with
`seed`). `train_indices[cid]` / `test_indices[cid]` are the positions of the
examples in the user's `x` list of the file used (all of them, 0..n-1).
"""

from __future__ import annotations

import collections
import gzip
import json
import logging
import os
import time
import zlib
from typing import Callable, Optional

import numpy as np

from fedmask_tff.data import _clients
from fedmask_tff.data import shakespeare
from fedmask_tff.data.errors import DataError

FEMNIST_NUM_CLASSES = 62
FEMNIST_IMAGE_SHAPE = (28, 28, 1)
SPLITS = ('train', 'test')
_GZIP_MAGIC = b'\x1f\x8b'

_log = logging.getLogger(__name__)


def list_shards(directory: str, split: str) -> list[str]:
  """Sorted paths of `directory/split/*.json[.gz]`; DataError if none."""
  folder = os.path.join(directory, split)
  if not os.path.isdir(folder):
    raise DataError(
        f'LEAF folder {folder} does not exist: a LEAF dataset folder needs '
        '`train/` and `test/` subfolders of *.json or *.json.gz shards'
    )
  names = sorted(
      n for n in os.listdir(folder)
      if n.endswith('.json') or n.endswith('.json.gz')
  )
  if not names:
    raise DataError(f'LEAF folder {folder} holds no *.json or *.json.gz file')
  return [os.path.join(folder, n) for n in names]


def read_shard(path: str) -> dict:
  """Parses one LEAF shard (gzip detected by suffix or magic) and checks it."""
  try:
    with open(path, 'rb') as f:
      raw = f.read()
    if path.endswith('.gz') or raw.startswith(_GZIP_MAGIC):
      raw = gzip.decompress(raw)
    data = json.loads(raw)
  except (OSError, EOFError, zlib.error) as e:
    raise DataError(f'LEAF file {path}: unreadable or corrupt gzip ({e})') from e
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise DataError(f'LEAF file {path}: not valid JSON ({e})') from e
  if not isinstance(data, dict) or not isinstance(data.get('user_data'), dict):
    raise DataError(
        f'LEAF file {path}: expected an object with "users", "num_samples" and '
        '"user_data"'
    )
  users = data.get('users', list(data['user_data']))
  if not isinstance(users, list):
    raise DataError(f'LEAF file {path}: "users" must be a list')
  num_samples = data.get('num_samples')
  if num_samples is not None and (
      not isinstance(num_samples, list) or len(num_samples) != len(users)
  ):
    raise DataError(
        f'LEAF file {path}: "num_samples" must be a list as long as "users" '
        f'({len(users)})'
    )
  for u in users:
    entry = data['user_data'].get(u)
    if (
        not isinstance(entry, dict)
        or not isinstance(entry.get('x'), list)
        or not isinstance(entry.get('y'), list)
    ):
      raise DataError(
          f'LEAF file {path}: user {u!r} has no user_data entry with "x" and '
          '"y" lists'
      )
    if len(entry['x']) != len(entry['y']):
      raise DataError(
          f'LEAF file {path}: user {u!r} has {len(entry["x"])} x but '
          f'{len(entry["y"])} y'
      )
  return {
      'users': users,
      'num_samples': num_samples,
      'user_data': data['user_data'],
  }


def femnist_converter(invert: bool = False) -> Callable:
  """Returns `(path, user, x, y) -> (x float32 [n,28,28,1], y int32 [n])`."""

  def convert(path, user, xs, ys):
    where = f'LEAF file {path}: user {user!r}'
    try:
      x = np.asarray(xs, dtype=np.float32)
    except (TypeError, ValueError) as e:
      raise DataError(f'{where}: x is not a list of 784-float lists ({e})') from e
    if x.ndim != 2 or x.shape[1] != 784:
      raise DataError(
          f'{where}: each x must hold 784 floats, got array of shape {x.shape}'
      )
    if not np.isfinite(x).all() or x.min() < 0.0 or x.max() > 1.0:
      raise DataError(f'{where}: pixels must be finite and in [0, 1]')
    try:
      y = np.asarray(ys, dtype=np.float64)
    except (TypeError, ValueError) as e:
      raise DataError(f'{where}: y is not a list of integers ({e})') from e
    if y.ndim != 1 or not np.all(np.mod(y, 1) == 0):
      raise DataError(f'{where}: y must be a list of integers')
    if y.size and (y.min() < 0 or y.max() >= FEMNIST_NUM_CLASSES):
      raise DataError(
          f'{where}: labels must lie in 0..{FEMNIST_NUM_CLASSES - 1}, found '
          f'{int(y.min())}..{int(y.max())}'
      )
    if invert:
      x = 1.0 - x
    return x.reshape((-1,) + FEMNIST_IMAGE_SHAPE), y.astype(np.int32)

  return convert


def shakespeare_converter(seq_len: int = shakespeare.DEFAULT_SEQ_LEN) -> Callable:
  """Returns `(path, user, x, y) -> (x int32 [n, seq_len], y int32 [n])`."""

  def convert(path, user, xs, ys):
    out_x = np.zeros([len(xs), seq_len], np.int32)
    out_y = np.zeros([len(xs)], np.int32)
    for i, (xt, yt) in enumerate(zip(xs, ys)):
      try:
        out_x[i], out_y[i] = shakespeare.leaf_pair_to_example(xt, yt, seq_len)
      except DataError as e:
        raise DataError(
            f'LEAF file {path}: user {user!r} example {i}: {e}'
        ) from None
    return out_x, out_y

  return convert


def _pair_key(name: str, split: str) -> str:
  base = os.path.basename(name)
  i = base.rfind(split)
  return base if i < 0 else base[:i] + '{}' + base[i + len(split):]


def _read_occurrences(
    files: dict, converter: Callable, dataset_name: str
) -> tuple[dict, int]:
  """Reads and converts every user entry of every shard.

  Args:
    files: dict split -> sorted shard paths (see `list_shards`).
    converter: `(path, user, x, y) -> (x [n, ...], y int32 [n])`.
    dataset_name: name used in the log message.

  Returns:
    `(occurrences, mismatches)`: `occurrences[split][user]` is a list of
    `(file index, x, y)` in sorted file order (users as str); `mismatches`
    counts (file, user) entries whose `num_samples` differs from len(x)
    (logged as a warning when non-zero).
  """
  occurrences = {s: collections.defaultdict(list) for s in SPLITS}
  mismatches = 0
  for s in SPLITS:
    for fi, path in enumerate(files[s]):
      shard = read_shard(path)
      for k, user in enumerate(shard['users']):
        entry = shard['user_data'][user]
        n = len(entry['y'])
        if shard['num_samples'] is not None and shard['num_samples'][k] != n:
          mismatches += 1
        x, y = converter(path, user, entry['x'], entry['y'])
        occurrences[s][str(user)].append((fi, x, y))
      del shard
  if mismatches:
    _log.warning(
        '%s: %d (file, user) entries have num_samples different from len(x); '
        'len(x) is used', dataset_name, mismatches
    )
  return occurrences, mismatches


def _initial_info(
    data_dir: str, files: dict, users_seen: int, mismatches: int
) -> collections.OrderedDict:
  """`split.info` before the merge: sources, counts, zeroed drop counters."""
  return collections.OrderedDict(
      source=data_dir,
      format='leaf_json',
      train_files=len(files['train']),
      test_files=len(files['test']),
      users_seen=users_seen,
      num_samples_mismatches=mismatches,
      dropped_train_only_clients=0,
      dropped_test_only_clients=0,
      dropped_empty_clients=0,
      duplicate_users=0,
      dropped_duplicate_occurrences=0,
      unpaired_users=0,
      index_space='per client and split: positions in the user x list of the file used',
  )


def _pick_occurrence(tr: list, te: list, train_files: list[str], test_keys: dict):
  """The `((x_train, y_train), (x_test, y_test))` of a user found in paired files.

  Args:
    tr: the user's train occurrences `(file index, x, y)`, sorted file order.
    te: the same for test.
    train_files: sorted train shard paths.
    test_keys: `_pair_key(test path, 'test')` -> test file index.

  Returns:
    The data of the first train file whose partner test file also holds the
    user, or None if there is none.
  """
  te_by_file = {fi: (x, y) for fi, x, y in te}
  for fi, x, y in tr:
    partner = test_keys.get(_pair_key(train_files[fi], 'train'))
    if partner in te_by_file:
      return ((x, y), te_by_file[partner])
  return None


def _choose_users(occurrences: dict, users: set, files: dict, info: dict) -> dict:
  """Applies the merging policy (module doc); counts its decisions in `info`.

  Args:
    occurrences: `occurrences[split][user]`, see `_read_occurrences`.
    users: every user seen in train or test.
    files: dict split -> sorted shard paths.
    info: the `_initial_info` dict; its drop counters are incremented.

  Returns:
    dict user -> `((x_train, y_train), (x_test, y_test))`, users in sorted
    order, each with a non-empty train and test set.
  """
  test_keys = {
      _pair_key(p, 'test'): fi for fi, p in enumerate(files['test'])
  }
  chosen = {}
  for user in sorted(users):
    tr, te = occurrences['train'].get(user), occurrences['test'].get(user)
    if not tr:
      info['dropped_test_only_clients'] += 1
      continue
    if not te:
      info['dropped_train_only_clients'] += 1
      continue
    if len(tr) > 1 or len(te) > 1:
      info['duplicate_users'] += 1
      info['dropped_duplicate_occurrences'] += len(tr) + len(te) - 2
    pick = _pick_occurrence(tr, te, files['train'], test_keys)
    if pick is None:
      info['unpaired_users'] += 1
      pick = (tr[0][1:], te[0][1:])
    if pick[0][1].size == 0 or pick[1][1].size == 0:
      info['dropped_empty_clients'] += 1
      continue
    chosen[user] = pick
  return chosen


def _client_data(chosen: dict, ids: list[str], original: dict):
  """Per-client datasets and index arrays of the selected users.

  Returns:
    `(train, test, train_idx, test_idx)`: dicts client id -> `{'x', 'y'}`
    arrays, and client id -> int64 positions 0..n-1 in the user's x list.
  """
  train, test, train_idx, test_idx = {}, {}, {}, {}
  for cid in ids:
    (xtr, ytr), (xte, yte) = chosen[original[cid]]
    train[cid] = {'x': xtr, 'y': ytr}
    test[cid] = {'x': xte, 'y': yte}
    train_idx[cid] = np.arange(ytr.size, dtype=np.int64)
    test_idx[cid] = np.arange(yte.size, dtype=np.int64)
  return train, test, train_idx, test_idx


def load_leaf(
    data_dir,
    converter: Callable,
    num_classes: int,
    max_clients: Optional[int] = None,
    client_order: str = 'sorted',
    seed: int = 0,
    dataset_name: str = 'leaf',
):
  """Loads a LEAF dataset folder with `converter` (see the module doc).

  Returns:
    A `FederatedSplit`; `split.original_ids` maps ids to LEAF users and
    `split.info` records files, drops and the merge policy's decisions.
  """
  start = time.time()
  data_dir = os.path.expanduser(os.fspath(data_dir))
  max_clients = _clients.check_max_clients(max_clients)
  files = {s: list_shards(data_dir, s) for s in SPLITS}
  occurrences, mismatches = _read_occurrences(files, converter, dataset_name)
  users = set(occurrences['train']) | set(occurrences['test'])
  info = _initial_info(data_dir, files, len(users), mismatches)
  chosen = _choose_users(occurrences, users, files, info)
  if not chosen:
    raise DataError(
        f'{dataset_name} in {data_dir}: no user has examples in both train/ '
        'and test/'
    )
  selected = _clients.select_clients(list(chosen), max_clients, client_order, seed)
  ids, original = _clients.sanitize_client_ids(selected)
  train, test, train_idx, test_idx = _client_data(chosen, ids, original)
  del occurrences, chosen
  info['clients_kept'] = len(ids)
  split = _clients.make_split(
      train, test, num_classes, train_idx, test_idx, original, info
  )
  split.info['load_seconds'] = round(time.time() - start, 3)
  return split


def load_femnist_leaf(
    data_dir,
    max_clients: Optional[int] = None,
    client_order: str = 'sorted',
    seed: int = 0,
    invert: bool = False,
):
  """Loads FEMNIST in LEAF's JSON format (one client per writer).

  Returns:
    A `FederatedSplit` with float32 [28, 28, 1] images (1.0 = background
    unless `invert`), 62 classes, one client per writer (see the module doc).
  """
  return load_leaf(
      data_dir,
      femnist_converter(invert),
      FEMNIST_NUM_CLASSES,
      max_clients=max_clients,
      client_order=client_order,
      seed=seed,
      dataset_name='FEMNIST (LEAF)',
  )


def load_shakespeare_leaf(
    data_dir,
    max_clients: Optional[int] = None,
    client_order: str = 'sorted',
    seed: int = 0,
    seq_len: int = shakespeare.DEFAULT_SEQ_LEN,
):
  """Loads Shakespeare in LEAF's JSON format (one client per speaking role).

  Returns:
    A `FederatedSplit` with `x` int32 [seq_len], `y` int32 next-character ids,
    `num_classes` = `shakespeare.VOCAB_SIZE` (90).
  """
  seq_len, _ = shakespeare._check_seq_len_stride(seq_len, 1)  # pylint: disable=protected-access
  return load_leaf(
      data_dir,
      shakespeare_converter(seq_len),
      shakespeare.NUM_CLASSES,
      max_clients=max_clients,
      client_order=client_order,
      seed=seed,
      dataset_name='Shakespeare (LEAF)',
  )
