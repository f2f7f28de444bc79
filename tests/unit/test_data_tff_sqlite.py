"""Tests of fedmask_tff.data.tff_sqlite on tiny databases in TFF's schema, written here.

No test may reach the network: `urllib.request.urlopen` is made to fail.
"""

import os
import re
import sqlite3
import urllib.request

import numpy as np
import pytest

from fedmask_tff.data import DataError
from fedmask_tff.data import shakespeare as sh
from fedmask_tff.data import tff_sqlite


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
  def fail(*args, **kwargs):
    raise AssertionError('a test tried to use the network')
  monkeypatch.setattr(urllib.request, 'urlopen', fail)


def write_db(path, rows):
  """rows: list of (split_name, client_id, serialized bytes)."""
  con = sqlite3.connect(path)
  con.execute('CREATE TABLE examples (split_name TEXT NOT NULL, client_id TEXT NOT NULL, '
              'serialized_example_proto BLOB NOT NULL);')
  con.execute('CREATE TABLE client_metadata (client_id TEXT NOT NULL, split_name TEXT NOT '
              'NULL, num_examples INTEGER NOT NULL);')
  counts = {}
  for split, cid, blob in rows:
    con.execute('INSERT INTO examples VALUES (?, ?, ?)', (split, cid, blob))
    counts[(split, cid)] = counts.get((split, cid), 0) + 1
  for (split, cid), n in counts.items():
    con.execute('INSERT INTO client_metadata VALUES (?, ?, ?)', (cid, split, n))
  con.commit()
  con.close()


def emnist_example(pixels, label):
  import tensorflow as tf
  return tf.train.Example(features=tf.train.Features(feature={
      'pixels': tf.train.Feature(float_list=tf.train.FloatList(value=pixels.reshape(-1))),
      'label': tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
  })).SerializeToString()


def snippet_example(text):
  import tensorflow as tf
  return tf.train.Example(features=tf.train.Features(feature={
      'snippets': tf.train.Feature(bytes_list=tf.train.BytesList(value=[text.encode()])),
  })).SerializeToString()


@pytest.fixture
def emnist_db(tmp_path):
  rng = np.random.default_rng(0)
  rows, truth = [], {}
  plan = {('all_train', 'f0001_01'): 5, ('all_test', 'f0001_01'): 2,
          ('all_train', 'f0002_02'): 4, ('all_test', 'f0002_02'): 1,
          ('all_train', 'f0003_03'): 3}  # train only: dropped
  for (split, cid), n in plan.items():
    for k in range(n):
      pixels = rng.random((28, 28)).astype(np.float32)
      label = int((k * 7 + len(cid)) % 62)
      rows.append((split, cid, emnist_example(pixels, label)))
      truth.setdefault((split, cid), []).append((pixels, label))
  write_db(tmp_path / 'emnist_all.sqlite', rows)
  return tmp_path, truth


def test_emnist(emnist_db):
  d, truth = emnist_db
  split = tff_sqlite.load_tff_emnist(d)
  assert split.client_ids == ['f0001_01', 'f0002_02']
  assert split.num_classes == 62
  assert split.info['dropped_train_only_clients'] == 1
  for data, name, counts in ((split.train, 'all_train', split.train_label_counts),
                             (split.test, 'all_test', split.test_label_counts)):
    for i, cid in enumerate(split.client_ids):
      got = list(data.create_tf_dataset_for_client(cid).as_numpy_iterator())
      want = truth[(name, cid)]
      assert len(got) == len(want) > 0
      assert got[0]['x'].shape == (28, 28, 1) and got[0]['x'].dtype == np.float32
      assert got[0]['y'].dtype == np.int32
      np.testing.assert_allclose(np.stack([g['x'][..., 0] for g in got]),
                                 np.stack([w[0] for w in want]))
      assert [int(g['y']) for g in got] == [w[1] for w in want]
      np.testing.assert_array_equal(
          counts[i], np.bincount([w[1] for w in want], minlength=62))
  assert split.summary()['total_train_examples'] == 9
  inv = tff_sqlite.load_tff_emnist(d, invert=True, max_clients=1, count_labels=False)
  assert inv.client_ids == ['f0001_01'] and inv.train_label_counts is None
  e = next(inv.train.create_tf_dataset_for_client('f0001_01').as_numpy_iterator())
  np.testing.assert_allclose(e['x'][..., 0], 1 - truth[('all_train', 'f0001_01')][0][0],
                             atol=1e-6)


def test_emnist_missing_file_names_it_without_downloading(tmp_path):
  target = tmp_path / 'cache'
  with pytest.raises(DataError, match=re.escape(str(target / 'emnist_all.sqlite')) +
                     '.*emnist_all.sqlite.lzma'):
    tff_sqlite.load_tff_emnist(target)
  assert not target.exists()  # TFF was not called (it would create the folder)


def test_corrupt_database_names_file(tmp_path):
  path = tmp_path / 'emnist_all.sqlite'
  path.write_bytes(np.random.default_rng(0).bytes(4096))
  with pytest.raises(DataError, match=re.escape(str(path))):
    tff_sqlite.load_tff_emnist(tmp_path)


def test_wrong_schema_and_bad_proto(tmp_path):
  path = tmp_path / 'emnist_all.sqlite'
  con = sqlite3.connect(path)
  con.execute('CREATE TABLE examples (a TEXT)')
  con.commit()
  con.close()
  with pytest.raises(DataError, match=re.escape(str(path)) + '.*client_metadata'):
    tff_sqlite.load_tff_emnist(tmp_path)
  os.remove(path)
  ok = emnist_example(np.zeros((28, 28), np.float32), 3)
  write_db(path, [('all_train', 'c1', ok), ('all_train', 'c1', b'\xff\x00garbage'),
                  ('all_test', 'c1', ok)])
  with pytest.raises(DataError, match=re.escape(str(path)) + '.*all_train client c1: example 1'):
    tff_sqlite.load_tff_emnist(tmp_path)


def test_shakespeare(tmp_path):
  snippets = {
      ('train', 'PLAY_A'): ['To be, or not to be', 'that is the question'],
      ('test', 'PLAY_A'): ['Whether tis nobler'],
      ('train', 'PLAY B'): ['Friends, Romans'],
      ('test', 'PLAY B'): ['lend me your ears'],
  }
  rows = [(s, c, snippet_example(t)) for (s, c), ts in snippets.items() for t in ts]
  write_db(tmp_path / 'shakespeare.sqlite', rows)
  split = tff_sqlite.load_tff_shakespeare(tmp_path, seq_len=12)
  assert split.client_ids == ['PLAY_B', 'PLAY_A']  # sorted by original id
  assert split.original_ids == {'PLAY_B': 'PLAY B', 'PLAY_A': 'PLAY_A'}
  assert split.num_classes == sh.VOCAB_SIZE
  for data, name in ((split.train, 'train'), (split.test, 'test')):
    for cid in split.client_ids:
      got = list(data.create_tf_dataset_for_client(cid).as_numpy_iterator())
      x, y = sh.snippets_to_examples(snippets[(name, split.original_ids[cid])], 12)
      np.testing.assert_array_equal(np.stack([g['x'] for g in got]), x)
      np.testing.assert_array_equal([g['y'] for g in got], y)
  assert split.train_label_counts.sum() == (19 + 1) + (20 + 1) + (15 + 1)


def test_shakespeare_missing(tmp_path):
  with pytest.raises(DataError, match=re.escape(str(tmp_path / 'shakespeare.sqlite'))):
    tff_sqlite.load_tff_shakespeare(tmp_path)
