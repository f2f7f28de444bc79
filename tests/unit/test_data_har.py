"""Tests of fedmask_tff.data.har on UCI-layout text files and .npz files written here."""

import os
import re

import numpy as np
import pytest

from fedmask_tff.data import DataError
from fedmask_tff.data import har


def write_uci(root, seed=0, splits=(('train', (1, 3, 5)), ('test', (2, 4)))):
  """Writes UCI HAR's layout; 8 windows per subject; returns {split: (x, y1, s)}."""
  rng = np.random.default_rng(seed)
  written = {}
  for split, subjects in splits:
    folder = os.path.join(root, split)
    os.makedirs(os.path.join(folder, 'Inertial Signals'), exist_ok=True)
    s = np.repeat(subjects, 8)
    y1 = np.tile(np.arange(1, 7), len(s))[: len(s)]  # labels 1..6
    x = rng.normal(size=(len(s), 128, 9)).astype(np.float32)
    np.savetxt(os.path.join(folder, f'y_{split}.txt'), y1, fmt='%d')
    np.savetxt(os.path.join(folder, f'subject_{split}.txt'), s, fmt='%d')
    for c, channel in enumerate(har.CHANNELS):
      np.savetxt(os.path.join(folder, 'Inertial Signals', f'{channel}_{split}.txt'),
                 x[:, :, c], fmt='%.7e')
    written[split] = (x, y1, s)
  return written


def test_uci_layout(tmp_path):
  root = tmp_path / 'UCI HAR Dataset'
  written = write_uci(root)
  split = har.load_har(tmp_path, test_fraction=0.25, seed=1)  # finds the subfolder
  assert split.client_ids == [f'subject_{i:02d}' for i in range(1, 6)]
  assert split.num_classes == 6 and split.info['format'] == 'uci_har_text'
  x = np.concatenate([written['train'][0], written['test'][0]])
  y = np.concatenate([written['train'][1], written['test'][1]]) - 1
  subj = np.concatenate([written['train'][2], written['test'][2]])
  for i, cid in enumerate(split.client_ids):
    tr, te = split.train_indices[cid], split.test_indices[cid]
    assert tr.size and te.size and not set(tr) & set(te)
    assert set(np.concatenate([tr, te])) == set(np.flatnonzero(subj == i + 1))
    got = list(split.train.create_tf_dataset_for_client(cid).as_numpy_iterator())
    assert got[0]['x'].shape == (128, 9) and got[0]['x'].dtype == np.float32
    np.testing.assert_allclose(np.stack([g['x'] for g in got]), x[tr], rtol=1e-6)
    np.testing.assert_array_equal([g['y'] for g in got], y[tr])
    assert 0 <= min(g['y'] for g in got) and max(g['y'] for g in got) <= 5
  only_test = har.load_har(root, subjects='uci_test')
  assert only_test.client_ids == ['subject_02', 'subject_04']


def _corrupt_line(path, line_no, new):
  lines = open(path).read().splitlines()
  lines[line_no - 1] = new
  open(path, 'w').write('\n'.join(lines) + '\n')


def test_uci_non_numeric_names_file_and_line(tmp_path):
  write_uci(tmp_path)
  path = os.path.join(tmp_path, 'train', 'Inertial Signals', 'body_gyro_y_train.txt')
  lines = open(path).read().splitlines()
  _corrupt_line(path, 3, lines[2].replace(lines[2].split()[5], 'abc', 1))
  with pytest.raises(DataError, match=re.escape(path) + ': line 3: non-numeric'):
    har.load_har(tmp_path)


def test_uci_short_row(tmp_path):
  write_uci(tmp_path)
  path = os.path.join(tmp_path, 'test', 'Inertial Signals', 'total_acc_z_test.txt')
  lines = open(path).read().splitlines()
  _corrupt_line(path, 2, ' '.join(lines[1].split()[:127]))
  with pytest.raises(DataError, match=re.escape(path) + ': line 2: 127 values'):
    har.load_har(tmp_path)


def test_uci_row_count_mismatch(tmp_path):
  write_uci(tmp_path)
  path = os.path.join(tmp_path, 'train', 'Inertial Signals', 'body_acc_x_train.txt')
  lines = open(path).read().splitlines()
  open(path, 'w').write('\n'.join(lines[:-1]) + '\n')
  with pytest.raises(DataError, match=re.escape(path) + ' has 23 rows'):
    har.load_har(tmp_path)


def test_uci_label_out_of_range(tmp_path):
  write_uci(tmp_path)
  path = os.path.join(tmp_path, 'train', 'y_train.txt')
  _corrupt_line(path, 4, '7')
  with pytest.raises(DataError, match=re.escape(path) + ': line 4: label 7'):
    har.load_har(tmp_path)


def write_npz_dir(d, subjects=(1, 2, 3), n=10, seed=0):
  rng = np.random.default_rng(seed)
  os.makedirs(d, exist_ok=True)
  out = {}
  for s in subjects:
    x = rng.normal(size=(n, 128, 9)).astype(np.float32)
    y = (np.arange(n) % 6).astype(np.int64)
    np.savez(os.path.join(d, f'subject_{s:02d}.npz'), x=x, y=y)
    out[s] = (x, y)
  return out


def test_npz_layout(tmp_path):
  written = write_npz_dir(tmp_path)
  split = har.load_har(tmp_path, max_clients=2)
  assert split.client_ids == ['subject_01', 'subject_02']
  assert split.info['format'] == 'per_subject_npz'
  s = split.summary()
  assert s['total_train_examples'] + s['total_test_examples'] == 20
  cid = 'subject_02'
  got = list(split.test.create_tf_dataset_for_client(cid).as_numpy_iterator())
  # Pooled order: subject_01's 10 windows, then subject_02's.
  idx = split.test_indices[cid] - 10
  np.testing.assert_array_equal(np.stack([g['x'] for g in got]), written[2][0][idx])
  assert not set(split.train_indices[cid]) & set(split.test_indices[cid])


def test_npz_corrupt_and_bad_labels(tmp_path):
  write_npz_dir(tmp_path)
  path = os.path.join(tmp_path, 'subject_02.npz')
  with open(path, 'wb') as f:
    f.write(np.random.default_rng(0).bytes(500))
  with pytest.raises(DataError, match=re.escape(path)):
    har.load_har(tmp_path)
  np.savez(path, x=np.zeros((4, 128, 9), np.float32), y=np.array([0, 1, 6, 2]))
  with pytest.raises(DataError, match=re.escape(path) + '.*labels'):
    har.load_har(tmp_path)
  np.savez(path, x=np.zeros((4, 128, 3), np.float32), y=np.array([0, 1, 1, 2]))
  with pytest.raises(DataError, match=re.escape(path) + '.*shape'):
    har.load_har(tmp_path)


def test_har_errors(tmp_path):
  with pytest.raises(DataError, match='no subject_NN.npz'):
    har.load_har(tmp_path)
  write_npz_dir(tmp_path)
  with pytest.raises(DataError, match='subjects'):
    har.load_har(tmp_path, subjects='uci_train')
  with pytest.raises(DataError, match='unknown subjects'):
    har.load_har(tmp_path, subjects='some')
