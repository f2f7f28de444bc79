"""TFF's federated EMNIST and Shakespeare, read from their SQLite files offline.

`tff.simulation.datasets.emnist.load_data(cache_dir=D)` and
`tff.simulation.datasets.shakespeare.load_data(cache_dir=D)` read
`D/emnist_all.sqlite` and `D/shakespeare.sqlite` (the decompressed
`https://storage.googleapis.com/tff-datasets-public/<name>.sqlite.lzma`) and
download them only when they are absent. These loaders check that the file is
there and is an SQLite database in TFF's schema BEFORE calling TFF, so they
never touch the network; a missing file gives a `DataError` saying what to put
where.

TFF's schema (`sql_client_data.py`): table `examples(split_name TEXT,
client_id TEXT, serialized_example_proto BLOB)` of serialized
`tf.train.Example`s and table `client_metadata(client_id TEXT, split_name TEXT,
num_examples INTEGER)`. EMNIST's splits are `all_train`/`all_test` (62
classes) and `digits_only_train`/`digits_only_test`; its examples have
features `pixels` (784 floats, 1.0 = background) and `label` (int64).
Shakespeare's splits are `train`/`test`, with one feature `snippets` (bytes).

Conversion to our elements (lazy, in the tf.data pipeline of TFF's
`ClientData`):

* EMNIST: `x` = pixels float32 [28, 28, 1] (unchanged, 1.0 = background, the
  same as `leaf.load_femnist_leaf`; `invert=True` gives 1 - pixels), `y` =
  label int32.
* Shakespeare: each snippet becomes next-character examples with the
  vocabulary of `fedmask_tff.data.shakespeare` (`tf_snippet_to_dataset`).

The train and test `ClientData` are TFF's own train and test splits of each
client. With `count_labels=True` (default) the selected clients' examples are
also read once with `sqlite3` and parsed in Python, which validates every
proto (a bad one is a `DataError` now rather than in the middle of training)
and fills the label counts and `train_indices`/`test_indices` (positions
0..n-1 of a client's examples of that split, in the table's row order).
"""

from __future__ import annotations

import collections
import os
import sqlite3
import time
from typing import Optional

import numpy as np

from fedmask_tff.data import _clients
from fedmask_tff.data import shakespeare
from fedmask_tff.data.errors import DataError

SQLITE_FILES = {'emnist': 'emnist_all.sqlite', 'shakespeare': 'shakespeare.sqlite'}
DOWNLOAD_URLS = {
    name: f'https://storage.googleapis.com/tff-datasets-public/{f}.lzma'
    for name, f in SQLITE_FILES.items()
}
EMNIST_SPLITS = {False: ('all_train', 'all_test'), True: ('digits_only_train', 'digits_only_test')}
SHAKESPEARE_SPLITS = ('train', 'test')
DEFAULT_CACHE_DIR = '~/.tff'  # TFF's own default cache_dir.


def sqlite_path(name: str, data_dir) -> str:
  """Returns `data_dir/<file of name>`; DataError naming it if absent."""
  data_dir = os.path.expanduser(os.fspath(data_dir))
  path = os.path.join(data_dir, SQLITE_FILES[name])
  if not os.path.isfile(path):
    raise DataError(
        f'TFF {name} database not found: put {SQLITE_FILES[name]} at {path} '
        f'(download {DOWNLOAD_URLS[name]} and decompress it with `unxz`). '
        'This loader never downloads: TFF would otherwise fetch it from the '
        'network.'
    )
  return path


def _connect(path: str) -> sqlite3.Connection:
  return sqlite3.connect(f'file:{path}?mode=ro', uri=True)


def check_database(path: str, splits) -> dict:
  """Checks TFF's schema; returns {split: sorted client ids} from metadata."""
  try:
    con = _connect(path)
    try:
      tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
      missing = {'examples', 'client_metadata'} - tables
      if missing:
        raise DataError(
            f'TFF database {path}: missing table(s) {sorted(missing)}; TFF '
            'needs tables examples and client_metadata'
        )
      columns = {r[1] for r in con.execute('PRAGMA table_info(examples)')}
      need = {'split_name', 'client_id', 'serialized_example_proto'}
      if need - columns:
        raise DataError(
            f'TFF database {path}: table examples lacks column(s) '
            f'{sorted(need - columns)}'
        )
      columns = {r[1] for r in con.execute('PRAGMA table_info(client_metadata)')}
      if {'client_id', 'split_name'} - columns:
        raise DataError(
            f'TFF database {path}: table client_metadata needs columns '
            'client_id and split_name'
        )
      out = {}
      for split in splits:
        out[split] = sorted(
            r[0] for r in con.execute(
                'SELECT DISTINCT client_id FROM client_metadata WHERE split_name = ?',
                (split,),
            )
        )
    finally:
      con.close()
  except sqlite3.Error as e:
    raise DataError(
        f'TFF database {path}: not a readable SQLite database ({e})'
    ) from e
  if not any(out.values()):
    raise DataError(
        f'TFF database {path}: no clients in split(s) {", ".join(splits)}'
    )
  return out


def _read_split(path, split, clients, parse):
  """Parses every example of `clients` in `split`; {client: list of values}."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  wanted = set(clients)
  values = {c: [] for c in clients}
  try:
    con = _connect(path)
    try:
      rows = con.execute(
          'SELECT client_id, serialized_example_proto FROM examples WHERE '
          'split_name = ?',
          (split,),
      )
      for cid, blob in rows:
        if cid not in wanted:
          continue
        try:
          example = tf.train.Example.FromString(bytes(blob))
        except Exception as e:  # protobuf's DecodeError
          raise DataError(
              f'TFF database {path}: split {split} client {cid}: example '
              f'{len(values[cid])} is not a serialized tf.train.Example ({e})'
          ) from e
        try:
          values[cid].append(parse(example.features.feature))
        except DataError as e:
          raise DataError(
              f'TFF database {path}: split {split} client {cid}: example '
              f'{len(values[cid])}: {e}'
          ) from None
    finally:
      con.close()
  except sqlite3.Error as e:
    raise DataError(f'TFF database {path}: unreadable ({e})') from e
  return values


def _emnist_label(num_classes):
  def parse(feature):
    if 'label' not in feature or len(feature['label'].int64_list.value) != 1:
      raise DataError('no int64 feature "label" of one value')
    if 'pixels' not in feature or len(feature['pixels'].float_list.value) != 784:
      raise DataError('no float feature "pixels" of 784 values')
    label = int(feature['label'].int64_list.value[0])
    if not 0 <= label < num_classes:
      raise DataError(f'label {label} outside 0..{num_classes - 1}')
    return label

  return parse


def _snippet(feature):
  if 'snippets' not in feature or len(feature['snippets'].bytes_list.value) != 1:
    raise DataError('no bytes feature "snippets" of one value')
  return bytes(feature['snippets'].bytes_list.value[0])


def _renamed(base, ids, original):
  """A ClientData over `ids` serving `base`'s datasets of `original[id]`."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tensorflow_federated.python.simulation.datasets import client_data  # pylint: disable=g-import-not-at-top

  base_fn = base.serializable_dataset_fn
  if all(original[c] == c for c in ids):
    return client_data.ClientData.from_clients_and_tf_fn(ids, base_fn)
  new_ids = list(ids)
  old_ids = [original[c] for c in ids]

  def dataset_fn(client_id):
    index = tf.argmax(tf.cast(tf.equal(client_id, tf.constant(new_ids)), tf.int32))
    return base_fn(tf.gather(tf.constant(old_ids), index))

  return client_data.ClientData.from_clients_and_tf_fn(ids, dataset_fn)


def _load(
    name, data_dir, splits, tff_load, convert, max_clients, client_order, seed,
    count_parse, num_classes, targets_of, extra_info,
):
  start = time.time()
  max_clients = _clients.check_max_clients(max_clients)
  path = sqlite_path(name, data_dir)
  by_split = check_database(path, splits)
  train_ids, test_ids = set(by_split[splits[0]]), set(by_split[splits[1]])
  common = sorted(train_ids & test_ids)
  info = collections.OrderedDict(
      source=path,
      format='tff_sqlite',
      splits=list(splits),
      dropped_train_only_clients=len(train_ids - test_ids),
      dropped_test_only_clients=len(test_ids - train_ids),
      index_space='per client and split: example positions in table row order',
  )
  info.update(extra_info)
  if not common:
    raise DataError(
        f'TFF database {path}: no client is in both split {splits[0]} and '
        f'split {splits[1]}'
    )
  selected = _clients.select_clients(common, max_clients, client_order, seed)
  ids, original = _clients.sanitize_client_ids(selected)

  try:
    tff_train, tff_test = tff_load(os.path.dirname(path))
  except Exception as e:  # TFF raises assorted types on a bad database.
    raise DataError(f'TFF database {path}: TFF could not open it ({e})') from e
  train = _renamed(tff_train, ids, original).preprocess(convert)
  test = _renamed(tff_test, ids, original).preprocess(convert)

  counts, indices = [None, None], [None, None]
  if count_parse is not None:
    for k, split in enumerate(splits):
      values = _read_split(path, split, selected, count_parse)
      c = np.zeros([len(ids), num_classes], np.int64)
      idx = {}
      for i, cid in enumerate(ids):
        y = targets_of(values[original[cid]])
        c[i] = np.bincount(y, minlength=num_classes)
        idx[cid] = np.arange(y.size, dtype=np.int64)
      counts[k], indices[k] = c, idx
    empty = [cid for i, cid in enumerate(ids) if counts[0][i].sum() == 0 or counts[1][i].sum() == 0]
    if empty:
      raise DataError(
          f'TFF database {path}: client(s) {empty[:5]} have no examples in '
          f'split {splits[0]} or {splits[1]}'
      )

  from fedmask_tff.data.federated import FederatedSplit  # pylint: disable=g-import-not-at-top

  split = FederatedSplit(
      train=train,
      test=test,
      client_ids=ids,
      num_classes=num_classes,
      train_label_counts=counts[0],
      test_label_counts=counts[1],
      train_indices=indices[0],
      test_indices=indices[1],
  )
  _clients.attach(split, original_ids=original, info=info)
  info['load_seconds'] = round(time.time() - start, 3)
  return split


def load_tff_emnist(
    data_dir=DEFAULT_CACHE_DIR,
    only_digits: bool = False,
    max_clients: Optional[int] = None,
    client_order: str = 'sorted',
    seed: int = 0,
    invert: bool = False,
    count_labels: bool = True,
):
  """Loads TFF's federated EMNIST (3,400 writers, 62 classes) from SQLite.

  Args:
    data_dir: folder holding `emnist_all.sqlite` (TFF's cache_dir).
    only_digits: use TFF's digits-only splits (10 classes) instead.
    max_clients, client_order, seed: which writers to keep (see
      `_clients.select_clients`).
    invert: 1 - pixels (0.0 = background) instead of TFF's 1.0 = background.
    count_labels: read and validate the examples once to fill label counts
      and indices (see the module doc); if False they are None.

  Returns:
    A `FederatedSplit`: `x` float32 [28, 28, 1], `y` int32.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  num_classes = 10 if only_digits else 62

  def tff_load(cache_dir):
    from tensorflow_federated.python.simulation.datasets import emnist  # pylint: disable=g-import-not-at-top

    return emnist.load_data(only_digits=bool(only_digits), cache_dir=cache_dir)

  def to_element(e):
    x = tf.expand_dims(e['pixels'], -1)
    if invert:
      x = 1.0 - x
    return collections.OrderedDict(x=x, y=tf.cast(e['label'], tf.int32))

  def convert(ds):
    return ds.map(to_element)

  return _load(
      'emnist', data_dir, EMNIST_SPLITS[bool(only_digits)], tff_load, convert,
      max_clients, client_order, seed,
      _emnist_label(num_classes) if count_labels else None, num_classes,
      lambda labels: np.asarray(labels, np.int64),
      {'only_digits': bool(only_digits), 'invert': bool(invert)},
  )


def load_tff_shakespeare(
    data_dir=DEFAULT_CACHE_DIR,
    seq_len: int = shakespeare.DEFAULT_SEQ_LEN,
    stride: int = 1,
    max_clients: Optional[int] = None,
    client_order: str = 'sorted',
    seed: int = 0,
    count_labels: bool = True,
):
  """Loads TFF's federated Shakespeare (715 roles) from SQLite.

  Each snippet becomes next-character examples (`shakespeare` module doc);
  the result has the same clients and examples as
  `shakespeare.load_shakespeare_h5` on the HDF5 copy.

  Returns:
    A `FederatedSplit`: `x` int32 [seq_len], `y` int32, 90 classes.
  """
  seq_len, stride = shakespeare._check_seq_len_stride(seq_len, stride)  # pylint: disable=protected-access

  def tff_load(cache_dir):
    from tensorflow_federated.python.simulation.datasets import shakespeare as tff_shakespeare  # pylint: disable=g-import-not-at-top

    return tff_shakespeare.load_data(cache_dir=cache_dir)

  def convert(ds):
    return ds.flat_map(
        lambda e: shakespeare.tf_snippet_to_dataset(e['snippets'], seq_len, stride)
    )

  return _load(
      'shakespeare', data_dir, SHAKESPEARE_SPLITS, tff_load, convert,
      max_clients, client_order, seed,
      _snippet if count_labels else None, shakespeare.NUM_CLASSES,
      lambda snippets: shakespeare.snippet_targets(snippets, stride),
      {'seq_len': seq_len, 'stride': stride},
  )
