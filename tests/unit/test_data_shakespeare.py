"""Tests of fedmask_tff.data.shakespeare: vocabulary, examples, HDF5 files written here."""

import os

import numpy as np
import pytest

from fedmask_tff.data import DataError
from fedmask_tff.data import shakespeare as sh


def test_vocabulary_ids():
  assert sh.VOCAB_SIZE == 90 and sh.NUM_CLASSES == 90
  assert (sh.PAD, sh.OOV, sh.BOS, sh.EOS) == (0, 87, 88, 89)
  assert len(set(sh.CHAR_VOCAB)) == 86
  # TFF's baseline ids: char i -> i + 1.
  assert sh.encode('d')[0] == 1 and sh.encode('\r')[0] == 86


def test_vocabulary_round_trips_text():
  text = ''.join(sh.CHAR_VOCAB) + "To be, or not to be: that is the question.\n"
  ids = sh.encode(text)
  assert ids.dtype == np.int32 and ids.shape == (len(text),)
  assert ids.min() >= 1 and ids.max() <= 86
  assert sh.decode(ids) == text
  assert sh.decode(np.concatenate([[sh.BOS, sh.PAD], ids, [sh.EOS]])) == text


def test_out_of_vocabulary_characters():
  ids = sh.encode('a}é\u4e2db')
  assert ids.tolist() == [sh.encode('a')[0], sh.OOV, sh.OOV, sh.OOV, sh.encode('b')[0]]
  assert sh.decode(ids) == 'a' + sh.OOV_CHAR * 3 + 'b'
  with pytest.raises(DataError, match='outside the vocabulary'):
    sh.decode([90])


def test_text_to_examples():
  x, y = sh.text_to_examples('Hello', seq_len=4)
  assert x.dtype == np.int32 and y.dtype == np.int32
  assert x.shape == (6, 4) and y.shape == (6,)
  h, e, l, o = (int(sh.encode(c)[0]) for c in 'Helo')
  assert x[0].tolist() == [0, 0, 0, sh.BOS] and y[0] == h
  assert x[1].tolist() == [0, 0, sh.BOS, h] and y[1] == e
  assert x[5].tolist() == [e, l, l, o] and y[5] == sh.EOS
  xs, ys = sh.text_to_examples('Hello', seq_len=4, stride=2)
  np.testing.assert_array_equal(xs, x[::2])
  np.testing.assert_array_equal(ys, y[::2])
  x0, y0 = sh.text_to_examples('', seq_len=3)
  assert x0.tolist() == [[0, 0, sh.BOS]] and y0.tolist() == [sh.EOS]
  with pytest.raises(DataError, match='seq_len'):
    sh.text_to_examples('a', seq_len=0)


def test_leaf_pair_to_example():
  x, y = sh.leaf_pair_to_example('abc', 'd', seq_len=5)
  assert x.tolist() == [0, 0] + sh.encode('abc').tolist()
  assert y == sh.encode('d')[0]
  x, _ = sh.leaf_pair_to_example('abcdefg', 'h', seq_len=3)
  assert sh.decode(x) == 'efg'
  with pytest.raises(DataError, match='one character'):
    sh.leaf_pair_to_example('abc', 'de')


def test_tf_conversion_matches_numpy():
  import tensorflow as tf
  for text in ['', 'a', 'Hello there,\nfriend }é', 'x' * 200]:
    for stride in (1, 3):
      ds = sh.tf_snippet_to_dataset(tf.constant(text.encode('utf-8')), 8, stride)
      got = list(ds.as_numpy_iterator())
      x, y = sh.text_to_examples(text, 8, stride)
      assert len(got) == len(y)
      np.testing.assert_array_equal(np.array([g['x'] for g in got]).reshape(-1, 8), x)
      np.testing.assert_array_equal(np.array([g['y'] for g in got]), y)


# ---------------------------------------------------------------- HDF5


def write_h5(path, clients):
  import h5py
  with h5py.File(path, 'w') as f:
    group = f.create_group('examples')
    for cid, snippets in clients.items():
      group.create_group(cid).create_dataset(
          'snippets', data=np.array([s.encode('utf-8') for s in snippets], dtype=object),
          dtype=h5py.string_dtype())


TRAIN = {
    'PLAY_ROMEO': ['But soft, what light', 'It is the east.'],
    'PLAY_JULIET': ['O Romeo, Romeo!', 'Wherefore art thou'],
    'PLAY ODD:NAME': ['Odd one.'],
    'ONLY_TRAIN': ['nobody tests me'],
}
TEST = {
    'PLAY_ROMEO': ['and Juliet is the sun.'],
    'PLAY_JULIET': ['Romeo?'],
    'PLAY ODD:NAME': ['Still odd.'],
}


@pytest.fixture
def h5_dir(tmp_path):
  write_h5(tmp_path / 'shakespeare_train.h5', TRAIN)
  write_h5(tmp_path / 'shakespeare_test.h5', TEST)
  return tmp_path


def test_load_h5(h5_dir):
  split = sh.load_shakespeare_h5(h5_dir, seq_len=10)
  assert split.client_ids == ['PLAY_ODD_NAME', 'PLAY_JULIET', 'PLAY_ROMEO']  # original ids' order
  assert split.original_ids['PLAY_ODD_NAME'] == 'PLAY ODD:NAME'
  assert split.info['dropped_train_only_clients'] == 1
  assert split.num_classes == 90
  for data, source, counts, indices in (
      (split.train, TRAIN, split.train_label_counts, split.train_indices),
      (split.test, TEST, split.test_label_counts, split.test_indices)):
    for i, cid in enumerate(split.client_ids):
      got = list(data.create_tf_dataset_for_client(cid).as_numpy_iterator())
      x, y = sh.snippets_to_examples(source[split.original_ids[cid]], 10)
      assert len(got) == len(y) > 0
      assert got[0]['x'].dtype == np.int32 and got[0]['x'].shape == (10,)
      np.testing.assert_array_equal([g['y'] for g in got], y)
      np.testing.assert_array_equal(np.stack([g['x'] for g in got]), x)
      np.testing.assert_array_equal(counts[i], np.bincount(y, minlength=90))
      np.testing.assert_array_equal(indices[cid], np.arange(len(y)))
  summary = split.summary()
  assert summary['num_clients'] == 3


def test_h5_serializable_dataset_fn_in_graph(h5_dir):
  import tensorflow as tf
  split = sh.load_shakespeare_h5(h5_dir, seq_len=10, stride=2)
  fn = split.train.serializable_dataset_fn

  @tf.function
  def count(cid):
    return fn(cid).reduce(np.int64(0), lambda n, _: n + 1)

  for i, cid in enumerate(split.client_ids):
    assert int(count(tf.constant(cid))) == split.train_label_counts[i].sum()
  eager = [e['y'] for e in fn('PLAY_ROMEO').as_numpy_iterator()]
  direct = [e['y'] for e in split.train.create_tf_dataset_for_client(
      'PLAY_ROMEO').as_numpy_iterator()]
  assert eager == direct


def test_h5_max_clients(h5_dir):
  split = sh.load_shakespeare_h5(h5_dir, max_clients=2)
  assert split.client_ids == ['PLAY_ODD_NAME', 'PLAY_JULIET']
  split = sh.load_shakespeare_h5(h5_dir, max_clients=2, client_order='random', seed=3)
  assert len(split.client_ids) == 2


def test_h5_corrupt_file(h5_dir):
  bad = h5_dir / 'shakespeare_test.h5'
  bad.write_bytes(np.random.default_rng(0).bytes(2000))
  with pytest.raises(DataError, match='shakespeare_test.h5'):
    sh.load_shakespeare_h5(h5_dir)


def test_h5_truncated_file(h5_dir):
  path = h5_dir / 'shakespeare_train.h5'
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 3])
  with pytest.raises(DataError, match='shakespeare_train.h5'):
    sh.load_shakespeare_h5(h5_dir)


def test_h5_wrong_layout_and_missing(tmp_path):
  import h5py
  with h5py.File(tmp_path / 'shakespeare_train.h5', 'w') as f:
    f.create_dataset('snippets', data=np.arange(3))
  write_h5(tmp_path / 'shakespeare_test.h5', TEST)
  with pytest.raises(DataError, match='shakespeare_train.h5.*examples'):
    sh.load_shakespeare_h5(tmp_path)
  os.remove(tmp_path / 'shakespeare_test.h5')
  os.remove(tmp_path / 'shakespeare_train.h5')
  with pytest.raises(DataError, match='shakespeare_train.h5: does not exist'):
    sh.load_shakespeare_h5(tmp_path)
