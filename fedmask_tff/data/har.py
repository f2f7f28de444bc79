"""UCI HAR (human activity recognition), one client per subject.

Elements: `OrderedDict(x=float32 [128, 9], y=int32)`, x the raw inertial
window (50 Hz, 2.56 s) with channels in `CHANNELS` order (body_acc x/y/z,
body_gyro x/y/z, total_acc x/y/z), y in 0..5 (`LABELS`). Client ids are
`subject_NN` (`subject_01` .. `subject_30`).

Two layouts are read (`load_har` detects which):

(a) UCI's published layout (the folder `UCI HAR Dataset/`, or the folder that
    holds its `train/` and `test/`): `<split>/y_<split>.txt` (labels 1..6,
    mapped to 0..5), `<split>/subject_<split>.txt` and the nine files
    `<split>/Inertial Signals/<channel>_<split>.txt`, n rows of 128 floats
    each. The 561-feature `X_<split>.txt` is not used. Source order (for
    `train_indices`/`test_indices`): UCI's train rows, then its test rows.
(b) Per-subject arrays `subject_NN.npz` with `x` float (n, 128, 9) and `y`
    int (n,) in 0..5 (loaded with `allow_pickle=False`). Source order: the
    files in sorted order, rows in file order.

Split: UCI's subjects are disjoint between its train and test sets (21 and 9
subjects), so UCI's split cannot give every client both a train and a test
set. By default all windows are pooled and every subject's windows are split
per label with `split_client_examples(test_fraction, seed=[seed, i])`. For
UCI's subject-level protocol use `subjects='uci_train'` and
`subjects='uci_test'` (layout (a) only) to load the 21 and the 9 subjects as
two separate federations (e.g. train on the first, adapt/evaluate on the
second).
"""

from __future__ import annotations

import collections
import os
import re
import time
from typing import Optional

import numpy as np

from fedmask_tff.data import _clients
from fedmask_tff.data.errors import DataError
from fedmask_tff.data.federated import split_client_examples

CHANNELS = (
    'body_acc_x', 'body_acc_y', 'body_acc_z',
    'body_gyro_x', 'body_gyro_y', 'body_gyro_z',
    'total_acc_x', 'total_acc_y', 'total_acc_z',
)
LABELS = (
    'WALKING', 'WALKING_UPSTAIRS', 'WALKING_DOWNSTAIRS', 'SITTING', 'STANDING',
    'LAYING',
)
NUM_CLASSES = 6
WINDOW = 128
INPUT_SHAPE = (WINDOW, len(CHANNELS))
SUBJECT_SETS = ('all', 'uci_train', 'uci_test')
_NPZ_NAME = re.compile(r'^subject_(\d+)\.npz$')


def client_id_for_subject(subject: int) -> str:
  return f'subject_{int(subject):02d}'


def _first_bad_line(path, expected_columns, integer):
  """(line number, reason) of the first unparsable line, or None."""
  with open(path, 'r', encoding='utf-8', errors='replace') as f:
    for number, line in enumerate(f, start=1):
      fields = line.split()
      if expected_columns is not None and len(fields) != expected_columns:
        return number, f'{len(fields)} values, expected {expected_columns}'
      for field in fields:
        try:
          value = float(field)
        except ValueError:
          return number, f'non-numeric value {field[:30]!r}'
        if not np.isfinite(value):
          return number, f'non-finite value {field!r}'
        if integer and value != int(value):
          return number, f'non-integer value {field!r}'
  return None


def read_text_matrix(path: str, columns: Optional[int], integer: bool = False):
  """Reads a whitespace-separated numeric text file (one row per line).

  Returns float32 [n, columns] (or int64 [n] when `columns` is None). Raises
  DataError naming the file and the first bad line.
  """
  if not os.path.isfile(path):
    raise DataError(f'HAR file {path}: does not exist')
  try:
    array = np.loadtxt(path, dtype=np.float64, ndmin=2)
    ok = np.isfinite(array).all()
    if columns is not None and array.shape[1] != columns and array.size:
      ok = False
    if columns is None and array.shape[1] != 1 and array.size:
      ok = False
    if integer and ok and not np.all(np.mod(array, 1) == 0):
      ok = False
  except (ValueError, UnicodeDecodeError):
    ok = False
  except OSError as e:
    raise DataError(f'HAR file {path}: unreadable ({e})') from e
  if not ok:
    bad = _first_bad_line(path, columns if columns is not None else 1, integer)
    if bad is None:
      raise DataError(f'HAR file {path}: not a numeric table')
    raise DataError(f'HAR file {path}: line {bad[0]}: {bad[1]}')
  if array.shape[0] == 0:
    raise DataError(f'HAR file {path}: holds no rows')
  if columns is None:
    return array[:, 0].astype(np.int64)
  return array.astype(np.float32)


def find_uci_root(data_dir: str) -> Optional[str]:
  """The folder with UCI's `train/y_train.txt` (data_dir or its `UCI HAR Dataset/`)."""
  for root in (data_dir, os.path.join(data_dir, 'UCI HAR Dataset')):
    if os.path.isfile(os.path.join(root, 'train', 'y_train.txt')) or os.path.isfile(
        os.path.join(root, 'test', 'y_test.txt')
    ):
      return root
  return None


def read_uci_split(root: str, split: str):
  """Returns (x float32 [n,128,9], y int64 [n] in 0..5, subject int64 [n])."""
  folder = os.path.join(root, split)
  y_path = os.path.join(folder, f'y_{split}.txt')
  s_path = os.path.join(folder, f'subject_{split}.txt')
  y = read_text_matrix(y_path, None, integer=True)
  subjects = read_text_matrix(s_path, None, integer=True)
  if subjects.shape[0] != y.shape[0]:
    raise DataError(
        f'HAR file {s_path} has {subjects.shape[0]} rows but {y_path} has '
        f'{y.shape[0]}'
    )
  bad = (y < 1) | (y > NUM_CLASSES)
  if bad.any():
    line = int(np.argmax(bad)) + 1
    raise DataError(
        f'HAR file {y_path}: line {line}: label {int(y[line - 1])} outside '
        f'1..{NUM_CLASSES}'
    )
  if (subjects < 1).any():
    line = int(np.argmax(subjects < 1)) + 1
    raise DataError(f'HAR file {s_path}: line {line}: subject must be >= 1')
  channels = []
  for channel in CHANNELS:
    path = os.path.join(folder, 'Inertial Signals', f'{channel}_{split}.txt')
    values = read_text_matrix(path, WINDOW)
    if values.shape[0] != y.shape[0]:
      raise DataError(
          f'HAR file {path} has {values.shape[0]} rows but {y_path} has '
          f'{y.shape[0]}'
      )
    channels.append(values)
  x = np.stack(channels, axis=-1)
  return x, y - 1, subjects


def read_subject_npz(path: str, row_shape=INPUT_SHAPE):
  """`(x float32 [n, *row_shape], y int64 [n] in 0..5)` of one `subject_NN.npz`, checked.

  Raises DataError naming `path` for a missing array, a wrong shape, non-finite or non-float
  x, non-integer y, no rows, or labels outside 0..5.
  """
  row_shape = tuple(row_shape)
  try:
    with np.load(path, allow_pickle=False) as z:
      if 'x' not in z.files or 'y' not in z.files:
        raise DataError(
            f'HAR file {path}: needs arrays x and y, has {sorted(z.files)}'
        )
      x, y = z['x'], z['y']
  except DataError:
    raise
  except Exception as e:  # zipfile.BadZipFile, ValueError (pickles), OSError
    raise DataError(f'HAR file {path}: not a readable .npz file ({e})') from e
  if x.ndim != 1 + len(row_shape) or x.shape[1:] != row_shape:
    wanted = ', '.join(str(d) for d in row_shape)
    raise DataError(f'HAR file {path}: x must have shape (n, {wanted}), got {x.shape}')
  if not np.issubdtype(x.dtype, np.floating) or not np.isfinite(x).all():
    raise DataError(f'HAR file {path}: x must be finite floats')
  if y.ndim != 1 or y.shape[0] != x.shape[0]:
    raise DataError(
        f'HAR file {path}: y must have shape ({x.shape[0]},), got {y.shape}'
    )
  if not np.issubdtype(y.dtype, np.integer):
    raise DataError(f'HAR file {path}: y must be integers, got {y.dtype}')
  if y.size == 0:
    raise DataError(f'HAR file {path}: holds no windows')
  if y.min() < 0 or y.max() >= NUM_CLASSES:
    first = int(np.argmax((y < 0) | (y >= NUM_CLASSES)))
    raise DataError(
        f'HAR file {path}: labels must lie in 0..{NUM_CLASSES - 1}, found '
        f'{int(y[first])} at row {first}'
    )
  return x.astype(np.float32), y.astype(np.int64)


def read_npz_dir(data_dir: str):
  """Reads all `subject_NN.npz`; returns (x, y, subject) pooled in file order."""
  names = sorted(n for n in os.listdir(data_dir) if _NPZ_NAME.match(n))
  if not names:
    raise DataError(f'HAR folder {data_dir}: no subject_NN.npz file')
  xs, ys, ss = [], [], []
  seen = {}
  for name in names:
    subject = int(_NPZ_NAME.match(name).group(1))
    if subject in seen:
      raise DataError(
          f'HAR folder {data_dir}: {name} and {seen[subject]} are the same '
          'subject'
      )
    seen[subject] = name
    x, y = read_subject_npz(os.path.join(data_dir, name))
    xs.append(x)
    ys.append(y)
    ss.append(np.full(y.shape, subject, np.int64))
  return np.concatenate(xs), np.concatenate(ys), np.concatenate(ss)


def _read_source(data_dir: str, subjects: str, info: dict):
  """Reads all windows of `data_dir` in either layout; records it in `info`.

  Args:
    data_dir: a folder in layout (a) or (b) (module doc).
    subjects: one of `SUBJECT_SETS`; not 'all' needs layout (a).
    info: dict that receives `format`, `source_order` (and, for layout (a),
      `subjects_in_both_uci_splits`).

  Returns:
    `(x, y, subj, keep_set)`: x float32 [n, 128, 9], y int64 [n] in 0..5,
    subj int64 [n] the subject of each window (pooled source order), and
    keep_set the set of subjects to keep, or None for all.

  Raises:
    DataError: on unreadable files, or `subjects` != 'all' with layout (b).
  """
  root = find_uci_root(data_dir)
  if root is not None:
    parts = [read_uci_split(root, s) for s in ('train', 'test')]
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    subj = np.concatenate([p[2] for p in parts])
    info['format'] = 'uci_har_text'
    info['source_order'] = 'UCI train rows, then UCI test rows'
    overlap = set(parts[0][2].tolist()) & set(parts[1][2].tolist())
    info['subjects_in_both_uci_splits'] = len(overlap)
    if subjects != 'all':
      keep_set = set(parts[0 if subjects == 'uci_train' else 1][2].tolist())
    else:
      keep_set = None
  else:
    if subjects != 'all':
      raise DataError(
          f'subjects={subjects!r} needs UCI\'s layout (train/ and test/ '
          f'folders); {data_dir} holds per-subject .npz files'
      )
    x, y, subj = read_npz_dir(data_dir)
    info['format'] = 'per_subject_npz'
    info['source_order'] = 'subject_NN.npz files in sorted order'
    keep_set = None
  return x, y, subj, keep_set


def split_subjects(x, y, subj, chosen, ids_by_subject, test_fraction, seed):
  """Splits each chosen subject's windows into train and test.

  Subject `cid` is split by `split_client_examples` with seed
  `[seed, position]`, position its rank among the sorted ids of all
  candidate subjects (not only the chosen ones), clients in `chosen` order.

  Args:
    x: float32 [n, ...] pooled rows (windows [n, 128, 9], or features [n, 561]).
    y: int64 [n] labels in 0..5.
    subj: int64 [n] subject of each window.
    chosen: client ids to build, in order.
    ids_by_subject: dict client id -> subject number, every candidate.
    test_fraction: per-label fraction of each subject's windows held out.
    seed: seed of the split.

  Returns:
    `(train, test, train_idx, test_idx)`: dicts client id -> `{'x', 'y'}`
    arrays, and client id -> int64 indices into the pooled source order.

  Raises:
    DataError: if a subject has too few windows for a train and a test set.
  """
  train, test, train_idx, test_idx = {}, {}, {}, {}
  position = {cid: i for i, cid in enumerate(sorted(ids_by_subject))}
  for cid in chosen:
    members = np.flatnonzero(subj == ids_by_subject[cid])
    tr, te = split_client_examples(
        members, y, test_fraction, seed=[seed, position[cid]]
    )
    if tr.size == 0 or te.size == 0:
      raise DataError(
          f'HAR {cid} has {members.size} window(s), too few for a train and '
          'a test set'
      )
    train[cid] = {'x': x[tr], 'y': y[tr]}
    test[cid] = {'x': x[te], 'y': y[te]}
    train_idx[cid], test_idx[cid] = tr, te
  return train, test, train_idx, test_idx


def load_har(
    data_dir,
    test_fraction: float = 0.2,
    seed: int = 0,
    max_clients: Optional[int] = None,
    client_order: str = 'sorted',
    subjects: str = 'all',
):
  """Loads UCI HAR, one client per subject (see the module doc).

  Args:
    data_dir: a folder in layout (a) (UCI's, or holding `UCI HAR Dataset/`)
      or (b) (`subject_NN.npz` files).
    test_fraction: per-subject, per-label fraction of windows held out.
    seed: seed of the per-subject split (and of 'random' client choice).
    max_clients: keep only this many subjects (first by id, or random).
    client_order: 'sorted' or 'random'.
    subjects: 'all', or (layout (a) only) 'uci_train'/'uci_test' to keep the
      subjects of UCI's train or test set.

  Returns:
    A `FederatedSplit` with `x` float32 [128, 9], `y` int32 in 0..5, ids
    `subject_NN`; `train_indices`/`test_indices` index the pooled source
    order.
  """
  start = time.time()
  data_dir = os.path.expanduser(os.fspath(data_dir))
  if subjects not in SUBJECT_SETS:
    raise DataError(
        f'unknown subjects {subjects!r}; valid: {", ".join(SUBJECT_SETS)}'
    )
  if not os.path.isdir(data_dir):
    raise DataError(f'HAR folder {data_dir} does not exist')
  info = collections.OrderedDict(source=data_dir)
  x, y, subj, keep_set = _read_source(data_dir, subjects, info)
  all_subjects = sorted(set(subj.tolist()))
  if keep_set is not None:
    all_subjects = [s for s in all_subjects if s in keep_set]
  info['subjects'] = subjects
  return subject_split(x, y, subj, all_subjects, info, test_fraction=test_fraction, seed=seed,
                       max_clients=max_clients, client_order=client_order, start=start)


def subject_split(x, y, subj, subject_numbers, info, test_fraction, seed, max_clients,
                  client_order, start):
  """One client per subject of `subject_numbers`, each split by `split_subjects`.

  Args:
    x: float32 [n, ...] pooled rows; y: int64 [n] labels in 0..5; subj: int64 [n] subjects.
    subject_numbers: the candidate subjects (sorted ints); `max_clients` and
      `client_order` choose among them.
    info: the split's info dict (`index_space`, `test_fraction`, `load_seconds` are added).
    start: `time.time()` when loading began.

  Returns:
    A `FederatedSplit` (ids `subject_NN`) whose indices index the pooled order.
  """
  ids_by_subject = {client_id_for_subject(s): s for s in subject_numbers}
  chosen = _clients.select_clients(list(ids_by_subject), max_clients, client_order, seed)
  info['index_space'] = 'pooled source order'
  info['test_fraction'] = float(test_fraction)
  train, test, train_idx, test_idx = split_subjects(
      x, y, subj, chosen, ids_by_subject, test_fraction, seed
  )
  original = {cid: int(ids_by_subject[cid]) for cid in chosen}
  split = _clients.make_split(train, test, NUM_CLASSES, train_idx, test_idx, original, info)
  split.info['load_seconds'] = round(time.time() - start, 3)
  return split
