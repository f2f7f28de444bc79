"""Tests of fedmask_tff.data.registry (dispatch, defaults, describe), on files written here."""

import os

import numpy as np
import pytest

from fedmask_tff.data import DataError
from fedmask_tff.data import registry


def test_unknown_name_lists_valid_ones():
  with pytest.raises(DataError, match='valid names: fashion_mnist, emnist'):
    registry.load_federated('mnist', '/nonexistent')
  with pytest.raises(DataError, match='cifar10'):
    registry.describe('mnist')


def test_describe():
  assert registry.describe('cifar10') == dict(kind='image', input_shape=(32, 32, 3), num_classes=10)
  assert registry.describe('emnist')['num_classes'] == 62
  assert registry.describe('emnist', only_digits=True)['num_classes'] == 10
  assert registry.describe('har') == dict(kind='sequence', input_shape=(128, 9), num_classes=6)
  d = registry.describe('shakespeare_leaf', seq_len=40)
  assert d['kind'] == 'chars' and d['input_shape'] == (40,) and d['vocab_size'] == 90
  assert set(registry.DATASETS) == set(registry.DEFAULT_FOLDERS)


def test_default_search_uses_env_and_reports_missing(tmp_path, monkeypatch):
  monkeypatch.setenv('FEDMASK_DATA_DIR', str(tmp_path))
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))
  dirs = registry.candidate_dirs('har')
  assert dirs[0] == os.path.join(str(tmp_path), 'har_inertial')
  d = tmp_path / 'har_inertial'
  d.mkdir()
  rng = np.random.default_rng(0)
  for s in (1, 2):
    np.savez(d / f'subject_{s:02d}.npz', x=rng.normal(size=(6, 128, 9)).astype(np.float32),
             y=np.arange(6) % 6)
  split = registry.load_federated('har', num_clients=1, test_fraction=0.5)
  assert split.client_ids == ['subject_01']
  with pytest.raises(DataError, match='unknown option.*bogus'):
    registry.load_federated('har', bogus=1)


def test_missing_data_message(tmp_path, monkeypatch):
  monkeypatch.setenv('FEDMASK_DATA_DIR', str(tmp_path))
  monkeypatch.setattr(registry, 'candidate_dirs', lambda name: [str(tmp_path / 'x')])
  with pytest.raises(DataError, match='shakespeare_train.h5'):
    registry.load_federated('shakespeare_h5')


def test_dispatch_tff_sqlite_missing_file(tmp_path):
  with pytest.raises(DataError, match='emnist_all.sqlite'):
    registry.load_federated('emnist', tmp_path)
