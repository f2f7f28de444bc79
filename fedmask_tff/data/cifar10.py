"""CIFAR-10 in two layouts, partitioned over synthetic clients.

Elements: `OrderedDict(x=float32 [32, 32, 3] in [0, 1], y=int32 in 0..9)`,
labels in CIFAR-10's order `CLASS_NAMES`. The 50,000 train and 10,000 test
images are pooled (train first: that is the source order of
`train_indices`/`test_indices`), partitioned with
`partition.pathological_partition` (`classes_per_client` classes per client;
the FedMask paper uses 400 devices with 2 classes each), optionally capped to
`examples_per_client` examples per client, and each client's examples are
split per label into train and test (`split_client_examples`). Client ids are
`client_0000`, ... as for Fashion-MNIST.

Layouts (`load_cifar10` detects which):

(a) The python version, `cifar-10-batches-py/` (or a folder holding its files
    directly): `data_batch_1`..`data_batch_5`, `test_batch` and
    `batches.meta`, pickled dicts with `b"data"` uint8 [10000, 3072]
    (channel-major: 1024 red, 1024 green, 1024 blue values, rows of 32) and
    `b"labels"` (list of ints). SECURITY: unpickling can run arbitrary code,
    so these files are read with `RestrictedUnpickler`, which allows only the
    numpy array reconstruction functions such pickles reference
    (`numpy.core.multiarray._reconstruct`, `numpy.ndarray`, `numpy.dtype`,
    and their `numpy._core` / `_frombuffer` variants, and a latin-1-only
    stand-in for `_codecs.encode`) and rejects any other global; object arrays are rejected after loading. Still, only read files
    from a source you trust.
(b) JPEG archives `cifar10_train_jpeg.tar.gz` and `cifar10_test_jpeg.tar.gz`
    with members `<split>/<class name>/<n>.jpg`, decoded with
    `tf.io.decode_jpeg`. Within a split, images are ordered by class (in
    `CLASS_NAMES` order) then by the number n.
"""

from __future__ import annotations

import collections
import os
import pickle
import re
import tarfile
import time
import zlib
from typing import Optional

import numpy as np

from fedmask_tff.data import _clients
from fedmask_tff.data import partition as partition_lib
from fedmask_tff.data.errors import DataError
from fedmask_tff.data.federated import client_id as make_client_id
from fedmask_tff.data.federated import split_client_examples

CLASS_NAMES = (
    'airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse',
    'ship', 'truck',
)
NUM_CLASSES = 10
IMAGE_SHAPE = (32, 32, 3)
TRAIN_BATCHES = tuple(f'data_batch_{i}' for i in range(1, 6))
TEST_BATCH = 'test_batch'
META = 'batches.meta'
PICKLE_DIR = 'cifar-10-batches-py'
JPEG_ARCHIVES = {
    'train': 'cifar10_train_jpeg.tar.gz',
    'test': 'cifar10_test_jpeg.tar.gz',
}
_JPEG_MEMBER = re.compile(r'^(?:\./)?(train|test)/([a-z]+)/(\d+)\.jpe?g$')

_ALLOWED_GLOBALS = frozenset({
    ('numpy.core.multiarray', '_reconstruct'),
    ('numpy._core.multiarray', '_reconstruct'),
    ('numpy.core.numeric', '_frombuffer'),
    ('numpy._core.numeric', '_frombuffer'),
    ('numpy', 'ndarray'),
    ('numpy', 'dtype'),
})


def _latin1_encode(text, encoding='latin1'):
  """`_codecs.encode` limited to latin-1, as pickle protocol 2 uses for bytes."""
  if encoding not in ('latin1', 'latin-1'):
    raise pickle.UnpicklingError(
        f'_codecs.encode with encoding {encoding!r} is not allowed'
    )
  return text.encode('latin1')


class RestrictedUnpickler(pickle.Unpickler):
  """An unpickler that resolves only numpy's array reconstruction globals.

  Besides `_ALLOWED_GLOBALS` it accepts `_codecs.encode` (how Python 3 writes
  bytes in protocol-2 pickles), replaced by a latin-1-only function.
  """

  def find_class(self, module, name):
    if (module, name) == ('_codecs', 'encode'):
      return _latin1_encode
    if (module, name) in _ALLOWED_GLOBALS:
      return super().find_class(module, name)
    raise pickle.UnpicklingError(
        f'global {module}.{name} is not allowed in a CIFAR-10 batch file'
    )


def restricted_load(path: str):
  """Unpickles `path` with `RestrictedUnpickler` (encoding='bytes')."""
  try:
    with open(path, 'rb') as f:
      return RestrictedUnpickler(f, encoding='bytes').load()
  except OSError as e:
    raise DataError(f'CIFAR-10 file {path}: unreadable ({e})') from e
  except Exception as e:  # UnpicklingError, EOFError, ValueError, ...
    raise DataError(
        f'CIFAR-10 file {path}: not a valid CIFAR-10 python batch '
        f'({type(e).__name__}: {e})'
    ) from e


def _get(batch: dict, key: str):
  for k in (key.encode(), key):
    if k in batch:
      return batch[k]
  return None


def read_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads one python batch: (uint8 images [n, 32, 32, 3], int64 labels [n])."""
  batch = restricted_load(path)
  if not isinstance(batch, dict):
    raise DataError(
        f'CIFAR-10 file {path}: expected a dict, got {type(batch).__name__}'
    )
  data, labels = _get(batch, 'data'), _get(batch, 'labels')
  if not isinstance(data, np.ndarray) or data is None:
    raise DataError(f'CIFAR-10 file {path}: b"data" must be a numpy array')
  if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
    raise DataError(
        f'CIFAR-10 file {path}: b"data" must be uint8 [N, 3072], got '
        f'{data.dtype} {data.shape}'
    )
  if not isinstance(labels, (list, np.ndarray)):
    raise DataError(f'CIFAR-10 file {path}: b"labels" must be a list of ints')
  labels = np.asarray(labels)
  if labels.ndim != 1 or not (
      labels.size == 0 or np.issubdtype(labels.dtype, np.integer)
  ):
    raise DataError(f'CIFAR-10 file {path}: b"labels" must be a list of ints')
  if labels.shape[0] != data.shape[0]:
    raise DataError(
        f'CIFAR-10 file {path}: {data.shape[0]} images but '
        f'{labels.shape[0]} labels'
    )
  if data.shape[0] == 0:
    raise DataError(f'CIFAR-10 file {path}: holds no images')
  if labels.min() < 0 or labels.max() >= NUM_CLASSES:
    raise DataError(
        f'CIFAR-10 file {path}: labels must lie in 0..9, found '
        f'{int(labels.min())}..{int(labels.max())}'
    )
  images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return np.ascontiguousarray(images), labels.astype(np.int64)


def find_pickle_dir(data_dir: str) -> Optional[str]:
  for d in (os.path.join(data_dir, PICKLE_DIR), data_dir):
    if os.path.isfile(os.path.join(d, TEST_BATCH)) or os.path.isfile(
        os.path.join(d, TRAIN_BATCHES[0])
    ):
      return d
  return None


def read_pickle_dir(directory: str) -> tuple[np.ndarray, np.ndarray]:
  """Pooled (train batches 1-5, then test_batch) uint8 images and labels."""
  missing = [
      n for n in TRAIN_BATCHES + (TEST_BATCH,)
      if not os.path.isfile(os.path.join(directory, n))
  ]
  if missing:
    raise DataError(
        f'CIFAR-10 folder {directory} lacks {", ".join(missing)} (needs '
        f'{", ".join(TRAIN_BATCHES)}, {TEST_BATCH})'
    )
  meta_path = os.path.join(directory, META)
  if os.path.isfile(meta_path):
    meta = restricted_load(meta_path)
    names = _get(meta, 'label_names') if isinstance(meta, dict) else None
    if names is not None:
      names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
      if names != CLASS_NAMES:
        raise DataError(
            f'CIFAR-10 file {meta_path}: label_names {names} differ from '
            f'{CLASS_NAMES}'
        )
  parts = [read_batch(os.path.join(directory, n)) for n in TRAIN_BATCHES + (TEST_BATCH,)]
  return (
      np.concatenate([p[0] for p in parts]),
      np.concatenate([p[1] for p in parts]),
  )


def read_jpeg_archive(path: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads one JPEG tarball: uint8 [n, 32, 32, 3], int64 labels, sorted."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  if not os.path.isfile(path):
    raise DataError(f'CIFAR-10 archive {path}: does not exist')
  entries = []
  try:
    with tarfile.open(path, 'r:*') as tar:
      for member in tar:
        if not member.isfile():
          continue
        m = _JPEG_MEMBER.match(member.name)
        if m is None or m.group(1) != split:
          raise DataError(
              f'CIFAR-10 archive {path}: unexpected member {member.name!r} '
              f'(expected {split}/<class name>/<n>.jpg)'
          )
        if m.group(2) not in CLASS_NAMES:
          raise DataError(
              f'CIFAR-10 archive {path}: unknown class {m.group(2)!r} in '
              f'{member.name!r}'
          )
        content = tar.extractfile(member).read()
        entries.append((CLASS_NAMES.index(m.group(2)), int(m.group(3)), member.name, content))
  except DataError:
    raise
  except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
    raise DataError(
        f'CIFAR-10 archive {path}: corrupt or truncated tar.gz ({e})'
    ) from e
  if not entries:
    raise DataError(f'CIFAR-10 archive {path}: holds no images')
  entries.sort(key=lambda e: (e[0], e[1]))
  images = np.zeros((len(entries),) + IMAGE_SHAPE, np.uint8)
  for i, (_, _, name, content) in enumerate(entries):
    try:
      image = tf.io.decode_jpeg(content, channels=3).numpy()
    except (tf.errors.InvalidArgumentError, tf.errors.OpError) as e:
      raise DataError(
          f'CIFAR-10 archive {path}: member {name}: not a valid JPEG ({e.message})'
      ) from None
    if image.shape != IMAGE_SHAPE:
      raise DataError(
          f'CIFAR-10 archive {path}: member {name}: image of shape '
          f'{image.shape}, expected {IMAGE_SHAPE}'
      )
    images[i] = image
  labels = np.array([e[0] for e in entries], np.int64)
  return images, labels


def read_cifar10(data_dir) -> tuple[np.ndarray, np.ndarray, str]:
  """Pooled uint8 images [60000, 32, 32, 3], int64 labels, and the layout name."""
  data_dir = os.path.expanduser(os.fspath(data_dir))
  if not os.path.isdir(data_dir):
    raise DataError(f'CIFAR-10 folder {data_dir} does not exist')
  pickle_dir = find_pickle_dir(data_dir)
  if pickle_dir is not None:
    images, labels = read_pickle_dir(pickle_dir)
    return images, labels, 'python_pickle'
  if any(os.path.isfile(os.path.join(data_dir, a)) for a in JPEG_ARCHIVES.values()):
    parts = [
        read_jpeg_archive(os.path.join(data_dir, JPEG_ARCHIVES[s]), s)
        for s in ('train', 'test')
    ]
    return (
        np.concatenate([p[0] for p in parts]),
        np.concatenate([p[1] for p in parts]),
        'jpeg_tar',
    )
  raise DataError(
      f'CIFAR-10 not found in {data_dir}: expected {PICKLE_DIR}/ (or its '
      f'files {", ".join(TRAIN_BATCHES)}, {TEST_BATCH}) or '
      f'{JPEG_ARCHIVES["train"]} and {JPEG_ARCHIVES["test"]}'
  )


def cap_client_examples(client_indices, labels, examples_per_client, seed):
  """Subsamples each client to at most `examples_per_client` examples.

  The cap is spread as evenly as possible over the client's classes (a class
  with fewer examples gives its spare share to the others); the kept examples
  are drawn with `np.random.default_rng([seed, i])` for client i. Returns
  sorted int64 arrays.
  """
  if isinstance(examples_per_client, bool) or not isinstance(
      examples_per_client, (int, np.integer)
  ):
    raise DataError(
        f'examples_per_client must be an int or None, got {examples_per_client!r}'
    )
  if examples_per_client < 2:
    raise DataError(
        f'examples_per_client must be >= 2 (a train and a test example), got '
        f'{examples_per_client}'
    )
  out = []
  for i, indices in enumerate(client_indices):
    indices = np.asarray(indices, np.int64)
    if indices.size <= examples_per_client:
      out.append(np.sort(indices))
      continue
    rng = np.random.default_rng([seed, i])
    groups = [indices[labels[indices] == c] for c in np.unique(labels[indices])]
    sizes = np.array([g.size for g in groups])
    take = np.zeros_like(sizes)
    left = examples_per_client
    # Water-filling: give every class an equal share, capped by its size.
    while left > 0:
      open_ = np.flatnonzero(take < sizes)
      share = max(left // open_.size, 1)
      for c in rng.permutation(open_):
        add = min(share, sizes[c] - take[c], left)
        take[c] += add
        left -= add
        if left == 0:
          break
    picked = [rng.choice(g, size=t, replace=False) for g, t in zip(groups, take) if t]
    out.append(np.sort(np.concatenate(picked)).astype(np.int64))
  return out


def load_cifar10(
    data_dir,
    num_clients: int = 400,
    classes_per_client: int = 2,
    examples_per_client: Optional[int] = None,
    test_fraction: float = 0.2,
    seed: int = 0,
):
  """Loads CIFAR-10 (either layout) and partitions it over clients.

  Args:
    data_dir: a folder with `cifar-10-batches-py/` (or its files), or the two
      JPEG archives.
    num_clients: number of clients (the paper: 400).
    classes_per_client: classes per client (the paper: 2).
    examples_per_client: optional cap on each client's examples (train + test
      together), e.g. 25 for the paper's small devices; subsampled
      deterministically from `seed` (`cap_client_examples`).
    test_fraction: per-client, per-label fraction held out for test.
    seed: seed of the partition, the cap and the train/test split.

  Returns:
    A `FederatedSplit` with float32 [32, 32, 3] images in [0, 1], 10 classes,
    ids `client_0000`...; `train_indices`/`test_indices` index the pooled
    60,000 images (train first).
  """
  start = time.time()
  images, labels, layout = read_cifar10(data_dir)
  client_indices = partition_lib.pathological_partition(
      labels, num_clients, classes_per_client, seed
  )
  if examples_per_client is not None:
    client_indices = cap_client_examples(
        client_indices, labels, examples_per_client, seed
    )
  train, test, train_idx, test_idx = {}, {}, {}, {}
  scale = np.float32(1.0 / 255.0)
  for i, indices in enumerate(client_indices):
    cid = make_client_id(i)
    tr, te = split_client_examples(indices, labels, test_fraction, seed=[seed, i])
    if tr.size == 0 or te.size == 0:
      raise DataError(
          f'CIFAR-10 {cid} has {indices.size} example(s), too few for a train '
          'and a test set'
      )
    train[cid] = {'x': images[tr].astype(np.float32) * scale, 'y': labels[tr]}
    test[cid] = {'x': images[te].astype(np.float32) * scale, 'y': labels[te]}
    train_idx[cid], test_idx[cid] = tr, te
  info = collections.OrderedDict(
      source=os.fspath(data_dir),
      format=layout,
      num_clients=num_clients,
      classes_per_client=classes_per_client,
      examples_per_client=examples_per_client,
      test_fraction=float(test_fraction),
      index_space='pooled source order (50000 train images, then 10000 test)',
  )
  original = {cid: cid for cid in train}
  split = _clients.make_split(
      train, test, NUM_CLASSES, train_idx, test_idx, original, info
  )
  split.info['load_seconds'] = round(time.time() - start, 3)
  return split
