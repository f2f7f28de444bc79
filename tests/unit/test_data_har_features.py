"""Tests of fedmask_tff.data.har_features (UCI HAR's 561 features) on small files written here."""

import os
import re

import numpy as np
import pytest

from fedmask_tff.data import DataError
from fedmask_tff.data import har_features, registry

N = har_features.NUM_FEATURES


def write_uci_features(root, splits=(('train', (1, 3)), ('test', (2, 30))), rows=6, seed=0):
  """UCI's layout (X, y, subject files only); ``rows`` rows per subject; returns {split: (x, y1, s)}."""
  rng = np.random.default_rng(seed)
  written = {}
  for split, subjects in splits:
    folder = os.path.join(root, split)
    os.makedirs(folder, exist_ok=True)
    s = np.repeat(subjects, rows)
    y1 = np.tile(np.arange(1, 7), len(s))[: len(s)]
    x = rng.uniform(-1, 1, size=(len(s), N)).astype(np.float32)
    np.savetxt(os.path.join(folder, f'X_{split}.txt'), x, fmt='%.7e')
    np.savetxt(os.path.join(folder, f'y_{split}.txt'), y1, fmt='%d')
    np.savetxt(os.path.join(folder, f'subject_{split}.txt'), s, fmt='%d')
    written[split] = (x, y1, s)
  return written


def _replace_line(path, number, text):
  lines = open(path).read().splitlines()
  lines[number - 1] = text
  open(path, 'w').write('\n'.join(lines) + '\n')


def test_uci_layout_pools_both_splits(tmp_path):
  written = write_uci_features(tmp_path / 'UCI HAR Dataset')
  split = har_features.load_har_features(tmp_path, test_fraction=0.5, seed=2)
  assert split.client_ids == ['subject_01', 'subject_02', 'subject_03', 'subject_30']
  assert split.info['format'] == 'uci_har_features_text'
  assert split.info['uci_splits'] == ['train', 'test']
  x = np.concatenate([written['train'][0], written['test'][0]])
  y = np.concatenate([written['train'][1], written['test'][1]]) - 1
  subj = np.concatenate([written['train'][2], written['test'][2]])
  for cid in split.client_ids:
    tr, te = split.train_indices[cid], split.test_indices[cid]
    assert tr.size and te.size and not set(tr) & set(te)
    assert set(np.concatenate([tr, te])) == set(np.flatnonzero(subj == int(cid[-2:])))
    got = list(split.train.create_tf_dataset_for_client(cid).as_numpy_iterator())
    assert got[0]['x'].shape == (N,) and got[0]['x'].dtype == np.float32
    np.testing.assert_allclose(np.stack([g['x'] for g in got]), x[tr], rtol=1e-6)
    np.testing.assert_array_equal([g['y'] for g in got], y[tr])


def test_uci_train_split_alone(tmp_path):
  write_uci_features(tmp_path, splits=(('train', (5, 7)),))
  split = har_features.load_har_features(tmp_path)
  assert split.client_ids == ['subject_05', 'subject_07'] and split.info['uci_splits'] == ['train']


@pytest.mark.parametrize('file, line, text, message', [
    ('X_train.txt', 2, ' '.join(['0.5'] * (N - 1)), f'line 2: {N - 1} values, expected {N}'),
    ('X_test.txt', 3, ' '.join(['0.5'] * (N - 1) + ['x1']), "line 3: non-numeric value 'x1'"),
    ('y_train.txt', 4, '7', 'line 4: label 7 outside 1..6'),
    ('y_test.txt', 1, '0', 'line 1: label 0 outside 1..6'),
    ('subject_train.txt', 5, '31', 'line 5: subject 31 outside 1..30'),
    ('subject_test.txt', 2, '0', 'line 2: subject 0 outside 1..30'),
])
def test_uci_malformed_files_name_file_and_line(tmp_path, file, line, text, message):
  write_uci_features(tmp_path)
  path = os.path.join(tmp_path, file.split('_')[-1][:-4], file)
  _replace_line(path, line, text)
  with pytest.raises(DataError, match=re.escape(path) + ': ' + re.escape(message)):
    har_features.load_har_features(tmp_path)


def test_uci_row_count_mismatch(tmp_path):
  write_uci_features(tmp_path)
  path = os.path.join(tmp_path, 'train', 'X_train.txt')
  lines = open(path).read().splitlines()
  open(path, 'w').write('\n'.join(lines[:-1]) + '\n')
  with pytest.raises(DataError, match=re.escape(path) + ' has 11 rows'):
    har_features.load_har_features(tmp_path)


def _write_npz(d, subject, x, y):
  os.makedirs(d, exist_ok=True)
  path = os.path.join(d, f'subject_{subject:02d}.npz')
  np.savez(path, x=x, y=y)
  return path


def test_npz_layout_and_registry(tmp_path):
  rng = np.random.default_rng(0)
  for s in (1, 3, 8):
    _write_npz(tmp_path, s, rng.normal(size=(12, N)).astype(np.float32), np.arange(12) % 6)
  split = registry.load_federated('har_features', data_dir=tmp_path, num_clients=2)
  assert split.client_ids == ['subject_01', 'subject_03']
  assert split.info['format'] == 'per_subject_npz' and split.info['subjects_found'] == 3
  assert registry.describe('har_features')['input_shape'] == (N,)
  from fedmask_tff import models
  assert models.model_for('har_features') == 'har_mlp'


@pytest.mark.parametrize('x, y, message', [
    (np.zeros((4, 560), np.float32), np.arange(4), r'shape \(n, 561\)'),
    (np.zeros((4, N), np.float32), np.array([0, 1, 6, 2]), 'labels must lie in 0..5, found 6'),
    (np.full((4, N), np.nan, np.float32), np.arange(4), 'finite floats'),
])
def test_npz_malformed(tmp_path, x, y, message):
  path = _write_npz(tmp_path, 2, x, y)
  with pytest.raises(DataError, match=re.escape(path) + '.*' + message):
    har_features.load_har_features(tmp_path)


def test_npz_subject_out_of_range(tmp_path):
  path = _write_npz(tmp_path, 31, np.zeros((4, N), np.float32), np.arange(4))
  with pytest.raises(DataError, match=re.escape(path) + ': subject 31 outside 1..30'):
    har_features.load_har_features(tmp_path)
