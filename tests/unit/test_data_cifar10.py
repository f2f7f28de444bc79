"""Tests of fedmask_tff.data.cifar10 on pickle batches and JPEG tarballs written here."""

import io
import os
import pickle
import re
import tarfile

import numpy as np
import pytest

from fedmask_tff.data import cifar10
from fedmask_tff.data import DataError

PER_BATCH = 20  # 2 per class


def write_pickle_dir(root, seed=0, protocol=2):
  """Writes cifar-10-batches-py/ with tiny batches; returns pooled (data, labels)."""
  d = os.path.join(root, 'cifar-10-batches-py')
  os.makedirs(d, exist_ok=True)
  rng = np.random.default_rng(seed)
  datas, labels = [], []
  for name in cifar10.TRAIN_BATCHES + (cifar10.TEST_BATCH,):
    data = rng.integers(0, 256, size=(PER_BATCH, 3072), dtype=np.uint8)
    lab = [int(i % 10) for i in range(PER_BATCH)]
    with open(os.path.join(d, name), 'wb') as f:
      pickle.dump({b'batch_label': name.encode(), b'labels': lab, b'data': data,
                   b'filenames': [b'x.png'] * PER_BATCH}, f, protocol=protocol)
    datas.append(data)
    labels.extend(lab)
  with open(os.path.join(d, 'batches.meta'), 'wb') as f:
    pickle.dump({b'label_names': [n.encode() for n in cifar10.CLASS_NAMES],
                 b'num_cases_per_batch': PER_BATCH, b'num_vis': 3072}, f, protocol=protocol)
  return d, np.concatenate(datas), np.array(labels)


@pytest.mark.parametrize('protocol', [2, 4, 5])
def test_pickle_layout(tmp_path, protocol):
  _, data, labels = write_pickle_dir(tmp_path, protocol=protocol)
  split = cifar10.load_cifar10(tmp_path, num_clients=5, classes_per_client=2,
                               test_fraction=0.3, seed=2)
  assert split.num_classes == 10 and split.info['format'] == 'python_pickle'
  assert split.client_ids == [f'client_{i:04d}' for i in range(5)]
  images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1) / 255.0
  all_idx = []
  for i, cid in enumerate(split.client_ids):
    tr, te = split.train_indices[cid], split.test_indices[cid]
    assert tr.size and te.size and not set(tr) & set(te)
    assert len(set(labels[np.concatenate([tr, te])])) == 2
    got = list(split.train.create_tf_dataset_for_client(cid).as_numpy_iterator())
    x = np.stack([g['x'] for g in got])
    assert x.shape[1:] == (32, 32, 3) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    np.testing.assert_allclose(x, images[tr], rtol=1e-6)
    np.testing.assert_array_equal([g['y'] for g in got], labels[tr])
    all_idx.extend(tr.tolist() + te.tolist())
  assert len(all_idx) == len(set(all_idx)) == labels.size


def test_examples_per_client_cap(tmp_path):
  _, _, labels = write_pickle_dir(tmp_path)
  split = cifar10.load_cifar10(tmp_path, num_clients=5, examples_per_client=6, seed=0)
  for i, cid in enumerate(split.client_ids):
    idx = np.concatenate([split.train_indices[cid], split.test_indices[cid]])
    assert idx.size == 6
    assert np.bincount(labels[idx]).max() == 3  # balanced over its 2 classes
  again = cifar10.load_cifar10(tmp_path, num_clients=5, examples_per_client=6, seed=0)
  for cid in split.client_ids:
    np.testing.assert_array_equal(split.train_indices[cid], again.train_indices[cid])
  with pytest.raises(DataError, match='examples_per_client'):
    cifar10.load_cifar10(tmp_path, num_clients=5, examples_per_client=1)


def test_cap_client_examples_uneven():
  labels = np.array([0] * 2 + [1] * 20)
  out = cifar10.cap_client_examples([np.arange(22)], labels, 10, seed=0)
  assert out[0].size == 10 and np.bincount(labels[out[0]]).tolist() == [2, 8]


class _Evil:
  def __reduce__(self):
    return (print, ('this must not run',))


def test_pickle_rejects_other_globals(tmp_path, capsys):
  d, _, _ = write_pickle_dir(tmp_path)
  path = os.path.join(d, 'data_batch_3')
  with open(path, 'wb') as f:
    pickle.dump({b'data': _Evil(), b'labels': [1]}, f)
  with pytest.raises(DataError, match=re.escape(path) + '.*builtins.print is not allowed'):
    cifar10.load_cifar10(tmp_path, num_clients=5)
  assert 'must not run' not in capsys.readouterr().out


@pytest.mark.parametrize('content, message', [
    (None, 'not a valid CIFAR-10 python batch'),  # random bytes
    ({b'data': np.zeros((2, 100), np.uint8), b'labels': [0, 1]}, r'uint8 \[N, 3072\]'),
    ({b'data': np.zeros((2, 3072), np.uint8), b'labels': [0]}, '2 images but 1 labels'),
    ({b'data': np.zeros((2, 3072), np.uint8), b'labels': [0, 10]}, r'0\.\.9'),
    ([1, 2, 3], 'expected a dict'),
])
def test_bad_batches_name_file(tmp_path, content, message):
  d, _, _ = write_pickle_dir(tmp_path)
  path = os.path.join(d, 'test_batch')
  with open(path, 'wb') as f:
    if content is None:
      f.write(np.random.default_rng(0).bytes(1000))
    else:
      pickle.dump(content, f)
  with pytest.raises(DataError, match=re.escape(path) + '.*' + message):
    cifar10.load_cifar10(tmp_path, num_clients=5)


def test_truncated_batch(tmp_path):
  d, _, _ = write_pickle_dir(tmp_path)
  path = os.path.join(d, 'data_batch_1')
  raw = open(path, 'rb').read()
  open(path, 'wb').write(raw[: len(raw) // 2])
  with pytest.raises(DataError, match=re.escape(path)):
    cifar10.load_cifar10(tmp_path, num_clients=5)


def write_jpeg_dir(root, per_class=2):
  import tensorflow as tf
  colors = {}
  for split in ('train', 'test'):
    path = os.path.join(root, cifar10.JPEG_ARCHIVES[split])
    with tarfile.open(path, 'w:gz') as tar:
      for c, name in enumerate(cifar10.CLASS_NAMES):
        for n in range(per_class):
          value = 20 * c + 5 * n + (3 if split == 'test' else 0)
          image = np.full((32, 32, 3), value, np.uint8)
          data = tf.io.encode_jpeg(image, quality=95).numpy()
          info = tarfile.TarInfo(f'{split}/{name}/{n:04d}.jpg')
          info.size = len(data)
          tar.addfile(info, io.BytesIO(data))
          colors[(split, c, n)] = value
  return colors


def test_jpeg_layout(tmp_path):
  colors = write_jpeg_dir(tmp_path, per_class=3)
  split = cifar10.load_cifar10(tmp_path, num_clients=5, classes_per_client=2)
  assert split.info['format'] == 'jpeg_tar'
  # Source order: train sorted by (class, n), then test.
  for cid in split.client_ids:
    got = list(split.train.create_tf_dataset_for_client(cid).as_numpy_iterator())
    for idx, g in zip(split.train_indices[cid], got):
      s, r = ('train', idx) if idx < 30 else ('test', idx - 30)
      c, n = divmod(int(r), 3)
      assert g['y'] == c
      assert abs(float(g['x'].mean()) * 255 - colors[(s, c, n)]) < 2.0


def test_jpeg_corrupt_archive_and_member(tmp_path):
  write_jpeg_dir(tmp_path)
  path = os.path.join(tmp_path, cifar10.JPEG_ARCHIVES['test'])
  raw = open(path, 'rb').read()
  open(path, 'wb').write(raw[: len(raw) // 2])
  with pytest.raises(DataError, match=re.escape(path)):
    cifar10.load_cifar10(tmp_path, num_clients=5)
  with tarfile.open(path, 'w:gz') as tar:
    info = tarfile.TarInfo('test/cat/0000.jpg')
    info.size = 10
    tar.addfile(info, io.BytesIO(b'not a jpeg'))
  with pytest.raises(DataError, match=re.escape(path) + '.*test/cat/0000.jpg'):
    cifar10.load_cifar10(tmp_path, num_clients=5)


def test_missing(tmp_path):
  with pytest.raises(DataError, match='cifar-10-batches-py'):
    cifar10.load_cifar10(tmp_path)
  write_pickle_dir(tmp_path)
  os.remove(os.path.join(tmp_path, 'cifar-10-batches-py', 'data_batch_4'))
  with pytest.raises(DataError, match='lacks data_batch_4'):
    cifar10.load_cifar10(tmp_path)
