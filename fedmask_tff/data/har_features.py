"""UCI HAR's 561 engineered features (the paper's HAR input), one client per subject.

Elements: `OrderedDict(x=float32 [561], y=int32)`, x the feature row UCI HAR
computes from a 2.56 s window (time and frequency statistics, normalized to
[-1, 1] by UCI), y in 0..5 (`har.LABELS`). Client ids are `subject_NN`
(`subject_01` .. `subject_30`), the same ids as `har` gives for the raw windows.

Two layouts are read (`load_har_features` detects which):

(a) UCI's published layout (the folder `UCI HAR Dataset/`, or the folder that
    holds its `train/` and `test/`): `<split>/X_<split>.txt` (n rows of 561
    floats), `<split>/y_<split>.txt` (labels 1..6, mapped to 0..5) and
    `<split>/subject_<split>.txt` (subjects 1..30), for each split present
    (`train`, `test`, or both: all 30 subjects with the full download). The
    `Inertial Signals/` folder is not needed. Source order: UCI's train
    rows, then its test rows.
(b) Per-subject arrays `subject_NN.npz` with `x` float (n, 561) and `y` int
    (n,) in 0..5 (loaded with `allow_pickle=False`), as in the project's
    shared `har_features/` folder (UCI's 21 train subjects). Source order: the
    files in sorted order, rows in file order.

Split: every subject's rows are pooled and split per label with
`split_client_examples(test_fraction, seed=[seed, i])`, i the subject's rank
among the sorted ids, exactly as `har` splits the raw windows (so a subject's
test rows follow its own training distribution, the paper's set-up).
"""

from __future__ import annotations

import collections
import os
import re
import time
from typing import Optional

import numpy as np

from fedmask_tff.data import har
from fedmask_tff.data.errors import DataError

NUM_FEATURES = 561
NUM_CLASSES = har.NUM_CLASSES
NUM_SUBJECTS = 30  # UCI HAR's volunteers, numbered 1..30
INPUT_SHAPE = (NUM_FEATURES,)
SPLITS = ('train', 'test')
_NPZ_NAME = re.compile(r'^subject_(\d+)\.npz$')


def find_uci_root(data_dir: str) -> Optional[str]:
  """The folder with UCI's `train/X_train.txt` or `test/X_test.txt` (data_dir or its
  `UCI HAR Dataset/`), or None."""
  for root in (data_dir, os.path.join(data_dir, 'UCI HAR Dataset')):
    if any(os.path.isfile(os.path.join(root, s, f'X_{s}.txt')) for s in SPLITS):
      return root
  return None


def holds_data(data_dir: str) -> bool:
  """Whether `data_dir` holds either layout (for the registry's folder search)."""
  if not os.path.isdir(data_dir):
    return False
  if find_uci_root(data_dir) is not None:
    return True
  return any(_NPZ_NAME.match(n) for n in os.listdir(data_dir))


def _check_range(values, low: int, high: int, path: str, what: str) -> None:
  """DataError naming the first line of `path` whose value is outside low..high."""
  bad = (values < low) | (values > high)
  if bad.any():
    line = int(np.argmax(bad)) + 1
    raise DataError(f'HAR file {path}: line {line}: {what} {int(values[line - 1])} outside '
                    f'{low}..{high}')


def read_uci_features(root: str, split: str):
  """One split of UCI's layout.

  Returns:
    `(x, y, subjects)`: x float32 [n, 561], y int64 [n] in 0..5 (the file's
    label minus 1), subjects int64 [n] in 1..30.

  Raises:
    DataError: naming the file and line of a wrong column count, a
      non-numeric value, a label outside 1..6 or a subject outside 1..30, or
      files whose row counts differ.
  """
  folder = os.path.join(root, split)
  paths = {k: os.path.join(folder, f'{k}_{split}.txt') for k in ('X', 'y', 'subject')}
  y = har.read_text_matrix(paths['y'], None, integer=True)
  subjects = har.read_text_matrix(paths['subject'], None, integer=True)
  _check_range(y, 1, NUM_CLASSES, paths['y'], 'label')
  _check_range(subjects, 1, NUM_SUBJECTS, paths['subject'], 'subject')
  x = har.read_text_matrix(paths['X'], NUM_FEATURES)
  for key, rows in (('subject', subjects.shape[0]), ('X', x.shape[0])):
    if rows != y.shape[0]:
      raise DataError(f'HAR file {paths[key]} has {rows} rows but {paths["y"]} has '
                      f'{y.shape[0]}')
  return x, y - 1, subjects


def read_feature_npz_dir(data_dir: str):
  """Reads every `subject_NN.npz` of `data_dir`; returns (x, y, subject) pooled in file order."""
  names = sorted(n for n in os.listdir(data_dir) if _NPZ_NAME.match(n))
  if not names:
    raise DataError(f'HAR folder {data_dir}: no subject_NN.npz file')
  xs, ys, ss, seen = [], [], [], {}
  for name in names:
    subject = int(_NPZ_NAME.match(name).group(1))
    if not 1 <= subject <= NUM_SUBJECTS:
      raise DataError(f'HAR file {os.path.join(data_dir, name)}: subject {subject} outside '
                      f'1..{NUM_SUBJECTS}')
    if subject in seen:
      raise DataError(f'HAR folder {data_dir}: {name} and {seen[subject]} are the same subject')
    seen[subject] = name
    x, y = har.read_subject_npz(os.path.join(data_dir, name), INPUT_SHAPE)
    xs.append(x)
    ys.append(y)
    ss.append(np.full(y.shape, subject, np.int64))
  return np.concatenate(xs), np.concatenate(ys), np.concatenate(ss)


def _read_source(data_dir: str, info: dict):
  """`(x, y, subject)` pooled from either layout; records the layout in `info`."""
  root = find_uci_root(data_dir)
  if root is None:
    info['format'] = 'per_subject_npz'
    info['source_order'] = 'subject_NN.npz files in sorted order'
    return read_feature_npz_dir(data_dir)
  present = [s for s in SPLITS if os.path.isfile(os.path.join(root, s, f'X_{s}.txt'))]
  parts = [read_uci_features(root, s) for s in present]
  info['format'] = 'uci_har_features_text'
  info['uci_splits'] = present
  info['source_order'] = ', then '.join(f'UCI {s} rows' for s in present)
  return tuple(np.concatenate([p[k] for p in parts]) for k in range(3))


def load_har_features(
    data_dir,
    test_fraction: float = 0.2,
    seed: int = 0,
    max_clients: Optional[int] = None,
    client_order: str = 'sorted',
):
  """Loads UCI HAR's 561 features, one client per subject (see the module doc).

  Args:
    data_dir: a folder in layout (a) (UCI's, or holding `UCI HAR Dataset/`)
      or (b) (`subject_NN.npz` files).
    test_fraction: per-subject, per-label fraction of rows held out.
    seed: seed of the per-subject split (and of 'random' client choice).
    max_clients: keep only this many subjects (first by id, or random).
    client_order: 'sorted' or 'random'.

  Returns:
    A `FederatedSplit` with `x` float32 [561], `y` int32 in 0..5, ids
    `subject_NN`; `train_indices`/`test_indices` index the pooled source order.
  """
  start = time.time()
  data_dir = os.path.expanduser(os.fspath(data_dir))
  if not os.path.isdir(data_dir):
    raise DataError(f'HAR folder {data_dir} does not exist')
  info = collections.OrderedDict(source=data_dir)
  x, y, subj = _read_source(data_dir, info)
  subjects = sorted(set(subj.tolist()))
  info['features'] = NUM_FEATURES
  info['subjects_found'] = len(subjects)
  return har.subject_split(x, y, subj, subjects, info, test_fraction=test_fraction, seed=seed,
                           max_clients=max_clients, client_order=client_order, start=start)
