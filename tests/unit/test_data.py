"""Tests of fedmask_tff.data, on small IDX files written here (no real data)."""

import collections
import gzip
import os

from helpers import IDX_CODES, idx_bytes, write_file

import numpy as np
import pytest

from fedmask_tff import data
from fedmask_tff.data import fashion_mnist
from fedmask_tff.data import DataError


def write_fashion_dir(directory, n_train=30, n_test=10, compress=True,
                      seed=0, image_size=(28, 28), labels=None):
  """Writes the four Fashion-MNIST files; returns (images, labels) written."""
  rng = np.random.default_rng(seed)
  os.makedirs(directory, exist_ok=True)
  suffix = '.gz' if compress else ''
  written = []
  for prefix, n in (('train', n_train), ('t10k', n_test)):
    images = rng.integers(0, 256, size=(n, *image_size), dtype=np.uint8)
    lab = (np.arange(n) % 10).astype(np.uint8) if labels is None else labels
    write_file(os.path.join(directory, f'{prefix}-images-idx3-ubyte{suffix}'),
               idx_bytes(images), compress)
    write_file(os.path.join(directory, f'{prefix}-labels-idx1-ubyte{suffix}'),
               idx_bytes(lab), compress)
    written.append((images, lab))
  return written


# ---------------------------------------------------------------- IDX reader


@pytest.mark.parametrize('compress', [True, False])
@pytest.mark.parametrize('dtype', list(IDX_CODES))
def test_read_idx_round_trip(tmp_path, compress, dtype):
  array = (np.arange(2 * 3 * 4) - 5).reshape(2, 3, 4)
  array = (array % 256 if dtype == np.uint8 else array).astype(dtype)
  path = write_file(tmp_path / ('a.idx' + ('.gz' if compress else '')),
                    idx_bytes(array), compress)
  out = data.read_idx(path)
  assert out.dtype == dtype and out.dtype.isnative
  assert out.shape == (2, 3, 4)
  np.testing.assert_array_equal(out, array)
  out[0, 0, 0] = 1  # writable


def test_read_idx_gzip_detected_without_suffix(tmp_path):
  array = np.arange(5, dtype=np.uint8)
  path = write_file(tmp_path / 'labels', idx_bytes(array), compress=True)
  np.testing.assert_array_equal(data.read_idx(path), array)


@pytest.mark.parametrize('compress', [True, False])
def test_read_idx_truncated(tmp_path, compress):
  payload = idx_bytes(np.zeros((4, 3, 3), np.uint8))[:-5]
  path = write_file(tmp_path / ('t.idx' + ('.gz' if compress else '')),
                    payload, compress)
  with pytest.raises(DataError, match='truncated') as e:
    data.read_idx(path)
  assert path in str(e.value)


def test_read_idx_too_long_and_short_header(tmp_path):
  path = write_file(tmp_path / 'long.idx',
                    idx_bytes(np.zeros(4, np.uint8)) + b'\0', compress=False)
  with pytest.raises(DataError, match='too long') as e:
    data.read_idx(path)
  assert path in str(e.value)
  path = write_file(tmp_path / 'hdr.idx', b'\0\0\x08\x03\0\0\0\x02',
                    compress=False)
  with pytest.raises(DataError, match='truncated header') as e:
    data.read_idx(path)
  assert path in str(e.value)


@pytest.mark.parametrize('magic', [b'\x01\x00\x08\x01', b'\x00\x00\x07\x01',
                                   b'\x00\x00\x08\x00'])
def test_read_idx_wrong_magic(tmp_path, magic):
  path = write_file(tmp_path / 'bad.idx', magic + b'\0\0\0\x01\x05',
                    compress=False)
  with pytest.raises(DataError) as e:
    data.read_idx(path)
  assert path in str(e.value)


def test_read_idx_corrupt_gzip(tmp_path):
  good = gzip.compress(idx_bytes(np.arange(100, dtype=np.uint8)))
  cases = {
      'garbage.gz': b'this is not gzip data at all',
      'cut.gz': good[: len(good) // 2],
      'flipped.gz': good[:20] + bytes([good[20] ^ 0xFF]) + good[21:],
  }
  for name, content in cases.items():
    path = write_file(tmp_path / name, content, compress=False)
    with pytest.raises(DataError) as e:
      data.read_idx(path)
    assert path in str(e.value), name


def test_read_idx_missing_file(tmp_path):
  path = str(tmp_path / 'nope.gz')
  with pytest.raises(DataError, match='does not exist') as e:
    data.read_idx(path)
  assert path in str(e.value)


# --------------------------------------------------------- Fashion-MNIST files


@pytest.mark.parametrize('compress', [True, False])
def test_load_fashion_mnist_pools_splits(tmp_path, compress):
  (tr_x, tr_y), (te_x, te_y) = write_fashion_dir(tmp_path, compress=compress)
  images, labels = data.load_fashion_mnist(str(tmp_path))
  assert images.shape == (40, 28, 28, 1) and images.dtype == np.float32
  assert labels.shape == (40,) and labels.dtype == np.int32
  assert 0.0 <= images.min() and images.max() <= 1.0
  expected = np.concatenate([tr_x, te_x]).astype(np.float32) / 255.0
  np.testing.assert_allclose(images[..., 0], expected)
  np.testing.assert_array_equal(labels, np.concatenate([tr_y, te_y]))


def test_load_fashion_mnist_label_out_of_range(tmp_path):
  write_fashion_dir(tmp_path, n_train=3, n_test=3,
                    labels=np.array([0, 10, 3], np.uint8))
  with pytest.raises(DataError, match='outside 0..9') as e:
    data.load_fashion_mnist(str(tmp_path))
  assert 'train-labels-idx1-ubyte.gz' in str(e.value)


def test_load_fashion_mnist_wrong_image_shape(tmp_path):
  write_fashion_dir(tmp_path, n_train=4, n_test=4, image_size=(28, 27))
  with pytest.raises(DataError, match='size') as e:
    data.load_fashion_mnist(str(tmp_path))
  assert 'train-images-idx3-ubyte.gz' in str(e.value)


def test_load_idx_dataset_validation(tmp_path):
  img4d = write_file(tmp_path / 'img4d', idx_bytes(np.zeros((2, 3, 3, 1),
                                                             np.uint8)), False)
  img = write_file(tmp_path / 'img', idx_bytes(np.zeros((2, 3, 3), np.uint8)),
                   False)
  lab3 = write_file(tmp_path / 'lab3', idx_bytes(np.zeros(3, np.uint8)), False)
  lab2d = write_file(tmp_path / 'lab2d', idx_bytes(np.zeros((2, 1), np.uint8)),
                     False)
  with pytest.raises(DataError, match='3-D') as e:
    data.load_idx_dataset(img4d, lab3, 10)
  assert img4d in str(e.value)
  with pytest.raises(DataError, match='1-D') as e:
    data.load_idx_dataset(img, lab2d, 10)
  assert lab2d in str(e.value)
  with pytest.raises(DataError, match='2 images') as e:
    data.load_idx_dataset(img, lab3, 10)
  assert img in str(e.value) and lab3 in str(e.value)
  x, y = data.load_idx_dataset(img, write_file(
      tmp_path / 'lab', idx_bytes(np.array([1, 2], np.uint8)), False), 3)
  assert x.shape == (2, 3, 3, 1) and y.tolist() == [1, 2]


def test_find_fashion_mnist_dir_with_data_dir(tmp_path):
  write_fashion_dir(tmp_path / 'fm', n_train=2, n_test=2, compress=False)
  assert data.find_fashion_mnist_dir(str(tmp_path / 'fm')) == str(
      tmp_path / 'fm')
  with pytest.raises(DataError, match='does not exist') as e:
    data.find_fashion_mnist_dir(str(tmp_path / 'missing'))
  assert str(tmp_path / 'missing') in str(e.value)
  os.remove(tmp_path / 'fm' / 't10k-labels-idx1-ubyte')
  with pytest.raises(DataError, match='t10k-labels-idx1-ubyte'):
    data.find_fashion_mnist_dir(str(tmp_path / 'fm'))


def test_find_fashion_mnist_dir_defaults(tmp_path, monkeypatch):
  first, second = str(tmp_path / 'deb'), str(tmp_path / 'keras')
  monkeypatch.setattr(fashion_mnist, 'DEFAULT_DIRS', (first, second))
  with pytest.raises(DataError) as e:
    data.find_fashion_mnist_dir()
  assert str(e.value) == (
      f'Fashion-MNIST not found in {first}, {second}. Install Debian\'s '
      'package: `apt-get install dataset-fashion-mnist` (as root; it puts the '
      'files in /usr/share/datasets/fashion-mnist), or pass --data_dir=DIR '
      'pointing at a folder with train-images-idx3-ubyte.gz, '
      'train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, '
      't10k-labels-idx1-ubyte.gz (the Keras cache layout '
      '~/.keras/datasets/fashion-mnist works too).'
  )
  write_fashion_dir(second, n_train=2, n_test=2)
  assert data.find_fashion_mnist_dir() == second
  write_fashion_dir(first, n_train=2, n_test=2, compress=False)
  assert data.find_fashion_mnist_dir() == first


def test_default_dirs():
  assert fashion_mnist.DEFAULT_DIRS == (
      '/usr/share/datasets/fashion-mnist', '~/.keras/datasets/fashion-mnist')


# ----------------------------------------------------------------- partitions


def _check_disjoint(parts, n):
  allidx = np.concatenate(parts)
  assert allidx.dtype == np.int64
  assert np.unique(allidx).size == allidx.size  # disjoint
  assert allidx.min() >= 0 and allidx.max() < n
  return allidx


@pytest.mark.parametrize('num_clients,k', [(20, 2), (7, 3), (10, 1), (3, 10)])
def test_pathological_partition(num_clients, k):
  labels = np.repeat(np.arange(10), 60)
  parts = data.pathological_partition(labels, num_clients, k, seed=1)
  assert len(parts) == num_clients
  allidx = _check_disjoint(parts, labels.size)
  usage = np.zeros(10, int)
  for p in parts:
    assert np.all(np.diff(p) > 0)  # sorted
    classes, counts = np.unique(labels[p], return_counts=True)
    assert classes.size == k
    assert counts.min() >= 2
    usage[classes] += 1
  assert usage.max() - usage.min() <= 1  # classes used about equally
  if num_clients * k >= 10:
    assert allidx.size == labels.size  # full coverage
  again = data.pathological_partition(labels, num_clients, k, seed=1)
  assert all(np.array_equal(a, b) for a, b in zip(parts, again))


def test_pathological_partition_seed_changes_result():
  labels = np.repeat(np.arange(10), 50)
  a = data.pathological_partition(labels, 10, 2, seed=0)
  b = data.pathological_partition(labels, 10, 2, seed=1)
  assert not all(np.array_equal(x, y) for x, y in zip(a, b))


def test_pathological_partition_errors():
  labels = np.repeat(np.arange(10), 5)
  for k in (0, 11):
    with pytest.raises(DataError, match='classes_per_client'):
      data.pathological_partition(labels, 5, k, seed=0)
  with pytest.raises(DataError, match='num_clients'):
    data.pathological_partition(labels, 0, 2, seed=0)
  # 30 clients * 2 classes / 10 classes = 6 holders per class of 5 examples.
  with pytest.raises(DataError, match='5 examples but is held by 6 clients'):
    data.pathological_partition(labels, 30, 2, seed=0)


@pytest.mark.parametrize('alpha', [0.05, 0.5, 100.0])
def test_dirichlet_partition(alpha):
  labels = np.random.default_rng(0).integers(0, 10, size=2000)
  parts = data.dirichlet_partition(labels, 20, alpha, seed=3,
                                   min_examples_per_client=5)
  assert len(parts) == 20
  allidx = _check_disjoint(parts, labels.size)
  assert allidx.size == labels.size
  assert min(p.size for p in parts) >= 5
  again = data.dirichlet_partition(labels, 20, alpha, seed=3,
                                   min_examples_per_client=5)
  assert all(np.array_equal(a, b) for a, b in zip(parts, again))


def test_dirichlet_partition_errors():
  labels = np.repeat(np.arange(10), 10)
  for alpha in (0, -1.0, float('nan'), float('inf'), 'x'):
    with pytest.raises(DataError, match='alpha'):
      data.dirichlet_partition(labels, 5, alpha, seed=0)
  with pytest.raises(DataError, match='at least 30 examples'):
    data.dirichlet_partition(labels, 5, 1.0, seed=0,
                             min_examples_per_client=30)
  with pytest.raises(DataError, match='tries'):
    data.dirichlet_partition(labels, 50, 0.01, seed=0,
                             min_examples_per_client=2, max_tries=5)


# -------------------------------------------------------- per-client splitting


def test_split_client_examples_stratified():
  labels = np.repeat(np.arange(5), [10, 20, 2, 1, 7])
  indices = np.random.default_rng(0).permutation(labels.size)
  train, test = data.split_client_examples(indices, labels, 0.2, seed=0)
  assert np.intersect1d(train, test).size == 0
  np.testing.assert_array_equal(np.sort(np.concatenate([train, test])),
                                np.sort(indices))
  test_counts = np.bincount(labels[test], minlength=5)
  train_counts = np.bincount(labels[train], minlength=5)
  assert test_counts.tolist() == [2, 4, 1, 0, 1]
  assert train_counts.tolist() == [8, 16, 1, 1, 6]
  t2, s2 = data.split_client_examples(indices, labels, 0.2, seed=0)
  assert np.array_equal(train, t2) and np.array_equal(test, s2)


def test_split_client_examples_errors_and_singletons():
  labels = np.arange(4)
  for fraction in (0.0, 1.0, -0.1, float('nan')):
    with pytest.raises(DataError, match='test_fraction'):
      data.split_client_examples(np.arange(4), labels, fraction, seed=0)
  # All labels are singletons: one example still goes to test.
  train, test = data.split_client_examples(np.arange(4), labels, 0.2, seed=0)
  assert train.size == 3 and test.size == 1
  with pytest.raises(DataError, match='duplicates'):
    data.split_client_examples(np.array([1, 1]), labels, 0.2, seed=0)


# ---------------------------------------------------------- ClientData builder


def _toy(n=120, shape=(4, 4, 1)):
  rng = np.random.default_rng(0)
  images = rng.random((n, *shape), dtype=np.float32)
  labels = np.repeat(np.arange(6), n // 6).astype(np.int32)
  return images, labels


def test_build_federated_split():
  images, labels = _toy()
  parts = data.pathological_partition(labels, 6, 2, seed=0)
  split = data.build_federated_split(images, labels, parts, test_fraction=0.2,
                                     seed=0)
  assert split.client_ids == [f'client_{i:04d}' for i in range(6)]
  assert list(split.train.client_ids) == split.client_ids
  assert list(split.test.client_ids) == split.client_ids
  assert split.num_classes == 6
  total = 0
  for cid, idx in zip(split.client_ids, parts):
    tr = list(split.train.create_tf_dataset_for_client(cid))
    te = list(split.test.create_tf_dataset_for_client(cid))
    assert len(tr) + len(te) == idx.size and len(te) == idx.size // 5
    el = tr[0]
    assert isinstance(el, collections.OrderedDict)
    assert list(el) == ['x', 'y']
    assert el['x'].shape == (4, 4, 1) and el['x'].dtype.name == 'float32'
    assert el['y'].shape == () and el['y'].dtype.name == 'int32'
    xs = np.stack([e['x'].numpy() for e in tr + te])
    ys = np.array([int(e['y']) for e in tr + te])
    assert set(ys) == set(labels[idx])
    # The yielded examples are exactly the client's examples.
    expected = images[idx].reshape(idx.size, -1)
    got = xs.reshape(idx.size, -1)
    assert sorted(map(bytes, got)) == sorted(map(bytes, expected))
    total += len(tr) + len(te)
  assert total == labels.size
  summary = split.summary()
  assert summary['num_clients'] == 6
  assert summary['total_train_examples'] + summary[
      'total_test_examples'] == labels.size
  assert summary['min_classes_per_client'] == 2
  assert summary['max_classes_per_client'] == 2
  # The fallback (counting from the datasets) agrees.
  split.train_label_counts = split.test_label_counts = None
  assert split.summary() == summary


def test_build_federated_split_errors():
  images, labels = _toy()
  parts = data.pathological_partition(labels, 6, 2, seed=0)
  bad = images.copy()
  bad[7, 0, 0, 0] = np.nan
  with pytest.raises(DataError, match='NaN or inf'):
    data.build_federated_split(bad, labels, parts)
  bad[7, 0, 0, 0] = np.inf
  with pytest.raises(DataError, match='NaN or inf'):
    data.build_federated_split(bad, labels, parts)
  with pytest.raises(DataError, match='client_0002 has no examples'):
    data.build_federated_split(images, labels,
                               parts[:2] + [np.array([], np.int64)])
  with pytest.raises(DataError, match='client_0001 has 1 example'):
    data.build_federated_split(images, labels, [parts[0], np.array([5])])
  with pytest.raises(DataError, match='more than one client'):
    data.build_federated_split(images, labels, [parts[0], parts[0]])
  with pytest.raises(DataError, match='labels must lie'):
    data.build_federated_split(images, labels, parts, num_classes=3)


def test_load_partitioned_fashion_mnist(tmp_path):
  write_fashion_dir(tmp_path, n_train=100, n_test=20)
  with pytest.raises(DataError, match='pathological, dirichlet'):
    data.load_partitioned_fashion_mnist(str(tmp_path), 4, partition='iid')
  split = data.load_partitioned_fashion_mnist(str(tmp_path), 5,
                                              classes_per_client=2, seed=1)
  s = split.summary()
  assert s['num_clients'] == 5 and s['num_classes'] == 10
  assert s['total_train_examples'] + s['total_test_examples'] == 120
  assert s['min_classes_per_client'] == s['max_classes_per_client'] == 2
  el = next(iter(split.train.create_tf_dataset_for_client('client_0000')))
  assert el['x'].shape == (28, 28, 1)
  split = data.load_partitioned_fashion_mnist(str(tmp_path), 4,
                                              partition='dirichlet',
                                              dirichlet_alpha=1.0)
  assert split.summary()['total_train_examples'] > 0
