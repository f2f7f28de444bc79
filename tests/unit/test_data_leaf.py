"""Tests of fedmask_tff.data.leaf (LEAF JSON written here) and client-id sanitizing."""

import gzip
import json
import os
import re

import numpy as np
import pytest

from fedmask_tff.data import _clients
from fedmask_tff.data import DataError
from fedmask_tff.data import leaf
from fedmask_tff.data import shakespeare as sh

ID_RE = re.compile(r'^[A-Za-z0-9_.\-]+$')


def write_shard(path, user_data, num_samples=None, compress=None):
  users = list(user_data)
  payload = {
      'users': users,
      'num_samples': num_samples or [len(user_data[u]['y']) for u in users],
      'user_data': user_data,
  }
  raw = json.dumps(payload).encode()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  if compress is None:
    compress = str(path).endswith('.gz')
  with open(path, 'wb') as f:
    f.write(gzip.compress(raw) if compress else raw)


def femnist_user(rng, n, label_offset=0):
  x = rng.integers(0, 256, size=(n, 784)) / 255.0
  y = [int((i + label_offset) % 62) for i in range(n)]
  return {'x': x.round(4).tolist(), 'y': y}


@pytest.fixture
def femnist_dir(tmp_path):
  rng = np.random.default_rng(0)
  d = tmp_path / 'femnist'
  a = {'f0001_01': femnist_user(rng, 6), 'f0002_02': femnist_user(rng, 5, 10),
       'writer 3/é': femnist_user(rng, 4, 20)}
  a_test = {'f0001_01': femnist_user(rng, 2), 'f0002_02': femnist_user(rng, 2, 10),
            'writer 3/é': femnist_user(rng, 1, 20)}
  # A second sample: f0001_01 again (different copy), a train-only writer.
  b = {'f0001_01': femnist_user(rng, 7, 5), 'f0009_09': femnist_user(rng, 3)}
  b_test = {'f0001_01': femnist_user(rng, 3, 5), 'f0004_04': femnist_user(rng, 2)}
  write_shard(d / 'train' / 'a__all_data_0_niid_05_keep_0_train_9.json.gz', a)
  write_shard(d / 'test' / 'a__all_data_0_niid_05_keep_0_test_9.json.gz', a_test)
  write_shard(d / 'train' / 'b__all_data_0_niid_05_keep_0_train_9.json', b)
  write_shard(d / 'test' / 'b__all_data_0_niid_05_keep_0_test_9.json', b_test)
  return d, {'a': (a, a_test), 'b': (b, b_test)}


def test_femnist_leaf(femnist_dir):
  d, samples = femnist_dir
  split = leaf.load_femnist_leaf(d)
  a, a_test = samples['a']
  assert split.num_classes == 62
  assert split.client_ids == ['f0001_01', 'f0002_02', 'writer_3__']
  assert split.original_ids['writer_3__'] == 'writer 3/é'
  info = split.info
  assert info['dropped_train_only_clients'] == 1  # f0009_09
  assert info['dropped_test_only_clients'] == 1   # f0004_04
  assert info['duplicate_users'] == 1 and info['dropped_duplicate_occurrences'] == 2
  assert info['unpaired_users'] == 0
  # f0001_01 comes from sample a (first paired file), train and test alike.
  for data, source in ((split.train, a), (split.test, a_test)):
    got = list(data.create_tf_dataset_for_client('f0001_01').as_numpy_iterator())
    assert len(got) == len(source['f0001_01']['y'])
    e = got[0]
    assert e['x'].shape == (28, 28, 1) and e['x'].dtype == np.float32
    assert e['y'].dtype == np.int32
    np.testing.assert_allclose(
        e['x'].reshape(-1), np.float32(source['f0001_01']['x'][0]), rtol=1e-6)
    assert [int(g['y']) for g in got] == source['f0001_01']['y']
  for i, cid in enumerate(split.client_ids):
    assert ID_RE.match(cid)
    assert split.train_label_counts[i].sum() > 0 and split.test_label_counts[i].sum() > 0
    np.testing.assert_array_equal(
        split.train_indices[cid], np.arange(split.train_label_counts[i].sum()))
  assert split.summary()['total_train_examples'] == 6 + 5 + 4


def test_femnist_invert_and_max_clients(femnist_dir):
  d, samples = femnist_dir
  split = leaf.load_femnist_leaf(d, max_clients=2, invert=True)
  assert split.client_ids == ['f0001_01', 'f0002_02']
  e = next(iter(split.train.create_tf_dataset_for_client('f0002_02')))
  np.testing.assert_allclose(
      e['x'].numpy().reshape(-1), 1 - np.float32(samples['a'][0]['f0002_02']['x'][0]),
      atol=1e-6)


def test_leaf_truncated_gzip_names_file(femnist_dir):
  d, _ = femnist_dir
  path = d / 'train' / 'a__all_data_0_niid_05_keep_0_train_9.json.gz'
  raw = path.read_bytes()
  path.write_bytes(raw[: len(raw) // 2])
  with pytest.raises(DataError, match=re.escape(str(path))):
    leaf.load_femnist_leaf(d)


def test_leaf_invalid_json_names_file(femnist_dir):
  d, _ = femnist_dir
  path = d / 'test' / 'b__all_data_0_niid_05_keep_0_test_9.json'
  path.write_text('{"users": ["x"], "user_data": {')
  with pytest.raises(DataError, match=re.escape(str(path)) + '.*JSON'):
    leaf.load_femnist_leaf(d)


@pytest.mark.parametrize('bad, message', [
    ({'x': [[0.5] * 783], 'y': [1]}, '784'),
    ({'x': [[1.5] * 784], 'y': [1]}, r'\[0, 1\]'),
    ({'x': [[0.5] * 784], 'y': [62]}, r'0\.\.61'),
    ({'x': [[0.5] * 784], 'y': [1, 2]}, '1 x but 2 y'),
])
def test_femnist_bad_user_data(tmp_path, bad, message):
  path = tmp_path / 'train' / 's_train.json'
  write_shard(path, {'u1': bad}, num_samples=[1])
  write_shard(tmp_path / 'test' / 's_test.json', {'u1': {'x': [[0.5] * 784], 'y': [1]}})
  with pytest.raises(DataError, match=re.escape(str(path)) + '.*' + message):
    leaf.load_femnist_leaf(tmp_path)


def test_leaf_missing_folder(tmp_path):
  (tmp_path / 'train').mkdir()
  with pytest.raises(DataError, match='test'):
    leaf.load_femnist_leaf(tmp_path)
  (tmp_path / 'test').mkdir()
  with pytest.raises(DataError, match='no \\*.json'):
    leaf.load_femnist_leaf(tmp_path)


def test_shakespeare_leaf(tmp_path):
  text = 'Now is the winter of our discontent made glorious summer by this sun of York.'
  def pairs(start, n):
    return {'x': [text[i:i + 20] for i in range(start, start + n)],
            'y': [text[i + 20] for i in range(start, start + n)]}
  train = {'PLAY_A': pairs(0, 6), 'PLAY_B': pairs(10, 4)}
  test = {'PLAY_A': pairs(30, 2), 'PLAY_B': pairs(40, 3)}
  write_shard(tmp_path / 'train' / 'all_data_train_9.json', train)
  # LEAF's known defect: num_samples larger than len(x).
  write_shard(tmp_path / 'test' / 'all_data_test_9.json', test, num_samples=[81, 82])
  split = leaf.load_shakespeare_leaf(tmp_path, seq_len=20)
  assert split.num_classes == sh.VOCAB_SIZE
  assert split.info['num_samples_mismatches'] == 2
  assert split.summary()['total_test_examples'] == 5
  got = list(split.train.create_tf_dataset_for_client('PLAY_B').as_numpy_iterator())
  assert len(got) == 4
  assert got[0]['x'].shape == (20,) and got[0]['x'].dtype == np.int32
  assert sh.decode(got[0]['x']) == text[10:30]
  assert sh.decode([got[0]['y']]) == text[30]
  # A longer seq_len left-pads.
  split = leaf.load_shakespeare_leaf(tmp_path, seq_len=25)
  e = next(split.test.create_tf_dataset_for_client('PLAY_A').as_numpy_iterator())
  assert e['x'][:5].tolist() == [sh.PAD] * 5 and sh.decode(e['x']) == text[30:50]


def test_shakespeare_leaf_bad_target(tmp_path):
  path = tmp_path / 'train' / 't_train.json'
  write_shard(path, {'R': {'x': ['abc'], 'y': ['de']}})
  write_shard(tmp_path / 'test' / 't_test.json', {'R': {'x': ['abc'], 'y': ['d']}})
  with pytest.raises(DataError, match=re.escape(str(path)) + '.*one character'):
    leaf.load_shakespeare_leaf(tmp_path)


def test_sanitize_client_ids():
  originals = ['a b', 'a_b', 'a/b', '..', '.hidden', '', 'ok-1.2', 'x' * 300, 7]
  ids, mapping = _clients.sanitize_client_ids(originals)
  assert len(set(ids)) == len(ids)
  assert all(ID_RE.match(i) for i in ids)
  assert all(not i.startswith('.') for i in ids)
  assert ids[1] == 'a_b' and ids[6] == 'ok-1.2'  # valid ids are kept
  assert ids[0] == 'a_b-2' and ids[2] == 'a_b-3'
  assert len(ids[7]) <= _clients.MAX_CLIENT_ID_LENGTH
  assert [mapping[i] for i in ids] == originals
  with pytest.raises(DataError, match='duplicate'):
    _clients.sanitize_client_ids(['a', 'a'])


def test_select_clients():
  ids = ['c', 'a', 'b', 'd']
  assert _clients.select_clients(ids, 2) == ['a', 'b']
  assert _clients.select_clients(ids, None) == ['a', 'b', 'c', 'd']
  r1 = _clients.select_clients(ids, 2, 'random', seed=1)
  assert r1 == _clients.select_clients(ids, 2, 'random', seed=1) and len(r1) == 2
  with pytest.raises(DataError, match='max_clients'):
    _clients.select_clients(ids, 0)
  with pytest.raises(DataError, match='client_order'):
    _clients.select_clients(ids, 1, 'first')
