"""One entry point for every federated dataset: `load_federated(name, ...)`.

Names (`DATASETS`): fashion_mnist, emnist, shakespeare, femnist_leaf,
shakespeare_leaf, shakespeare_h5, har, har_features, cifar10.

Default data folders (`data_dir=None`), searched in order, the first that
holds the dataset's files wins:

1. `$FEDMASK_DATA_DIR/<folder>` when the environment variable is set;
2. `<repository>/../shared/data/<folder>` (the project's shared real data);
3. `~/.cache/fedmask_tff/<folder>`;
4. dataset-specific places: Fashion-MNIST's `DEFAULT_DIRS`; for emnist and
   shakespeare (TFF SQLite) also `~/.tff`, TFF's own cache; for cifar10 also
   `~/.keras/datasets` (Keras' `cifar-10-batches-py/`).

`<folder>` is `DEFAULT_FOLDERS[name]`. When nothing is found, a `DataError`
says which files to put where.

Arguments: `num_clients` is the number of synthetic clients for the
partitioned datasets (fashion_mnist, cifar10) and the maximum number of
natural clients kept for the others (`max_clients`: first N ids in sorted
order, or random with `client_order='random'`). `test_fraction` is used where
the loader splits each client (fashion_mnist, cifar10, har, har_features); the LEAF, TFF
SQLite and HDF5 datasets come with their own per-client train/test split and
ignore it. Other keyword options go to the loader (see each loader's doc).
"""

from __future__ import annotations

import inspect
import os
from typing import Any, Optional

from fedmask_tff.data.errors import DataError

DATASETS = (
    'fashion_mnist',
    'emnist',
    'shakespeare',
    'femnist_leaf',
    'shakespeare_leaf',
    'shakespeare_h5',
    'har',
    'har_features',
    'cifar10',
)

DEFAULT_FOLDERS = {
    'fashion_mnist': 'fashion-mnist',
    'emnist': 'tff',
    'shakespeare': 'tff',
    'femnist_leaf': 'femnist_leaf',
    'shakespeare_leaf': 'shakespeare_leaf',
    'shakespeare_h5': 'shakespeare_tff_h5',
    'har': 'har_inertial',
    'har_features': 'har_features',
    'cifar10': 'cifar10_jpeg',
}

# What each dataset's folder must hold, for error messages.
EXPECTED_FILES = {
    'fashion_mnist': 'train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, '
                     't10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz',
    'emnist': 'emnist_all.sqlite (TFF\'s, decompressed from '
              'https://storage.googleapis.com/tff-datasets-public/emnist_all.sqlite.lzma)',
    'shakespeare': 'shakespeare.sqlite (TFF\'s, decompressed from '
                   'https://storage.googleapis.com/tff-datasets-public/shakespeare.sqlite.lzma)',
    'femnist_leaf': 'train/ and test/ folders of LEAF *.json or *.json.gz shards',
    'shakespeare_leaf': 'train/ and test/ folders of LEAF *.json or *.json.gz shards',
    'shakespeare_h5': 'shakespeare_train.h5 and shakespeare_test.h5',
    'har': 'subject_NN.npz files, or UCI\'s "UCI HAR Dataset" layout '
           '(train/y_train.txt, train/subject_train.txt, train/Inertial Signals/..., '
           'the same for test/)',
    'har_features': 'subject_NN.npz files (x: n x 561 features, y: labels 0..5), or UCI\'s '
                    '"UCI HAR Dataset" layout (train/X_train.txt, train/y_train.txt, '
                    'train/subject_train.txt, the same for test/)',
    'cifar10': 'cifar-10-batches-py/ (data_batch_1..5, test_batch, batches.meta) '
               'or cifar10_train_jpeg.tar.gz and cifar10_test_jpeg.tar.gz',
}

_REPO_ROOT = os.path.dirname(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)


def _check_name(name: str) -> None:
  if name not in DATASETS:
    raise DataError(
        f'unknown dataset {name!r}; valid names: {", ".join(DATASETS)}'
    )


def _holds(name: str, d: str) -> bool:
  """Whether folder `d` looks like it holds dataset `name`."""
  join = os.path.join
  if not os.path.isdir(d):
    return False
  if name == 'fashion_mnist':
    from fedmask_tff.data import fashion_mnist  # pylint: disable=g-import-not-at-top

    return not fashion_mnist._missing_files(d)  # pylint: disable=protected-access
  if name == 'emnist':
    return os.path.isfile(join(d, 'emnist_all.sqlite'))
  if name == 'shakespeare':
    return os.path.isfile(join(d, 'shakespeare.sqlite'))
  if name in ('femnist_leaf', 'shakespeare_leaf'):
    return os.path.isdir(join(d, 'train')) and os.path.isdir(join(d, 'test'))
  if name == 'shakespeare_h5':
    return os.path.isfile(join(d, 'shakespeare_train.h5'))
  if name == 'har':
    from fedmask_tff.data import har  # pylint: disable=g-import-not-at-top

    if har.find_uci_root(d) is not None:
      return True
    return any(har._NPZ_NAME.match(n) for n in os.listdir(d))  # pylint: disable=protected-access
  if name == 'har_features':
    from fedmask_tff.data import har_features  # pylint: disable=g-import-not-at-top

    return har_features.holds_data(d)
  if name == 'cifar10':
    from fedmask_tff.data import cifar10  # pylint: disable=g-import-not-at-top

    return cifar10.find_pickle_dir(d) is not None or os.path.isfile(
        join(d, cifar10.JPEG_ARCHIVES['train'])
    )
  return False


def candidate_dirs(name: str) -> list[str]:
  """The folders searched for `name` when no data_dir is given, in order."""
  _check_name(name)
  folder = DEFAULT_FOLDERS[name]
  out = []
  env = os.environ.get('FEDMASK_DATA_DIR')
  if env:
    out.append(os.path.join(os.path.expanduser(env), folder))
  out.append(os.path.normpath(os.path.join(_REPO_ROOT, '..', 'shared', 'data', folder)))
  out.append(os.path.expanduser(os.path.join('~', '.cache', 'fedmask_tff', folder)))
  if name == 'fashion_mnist':
    from fedmask_tff.data import fashion_mnist  # pylint: disable=g-import-not-at-top

    out.extend(os.path.expanduser(d) for d in fashion_mnist.DEFAULT_DIRS)
  elif name in ('emnist', 'shakespeare'):
    out.append(os.path.expanduser('~/.tff'))
  elif name == 'cifar10':
    out.append(os.path.expanduser('~/.keras/datasets'))
  return out


def find_data_dir(name: str, data_dir=None) -> str:
  """Returns `data_dir` (expanded) or the first default folder holding `name`."""
  _check_name(name)
  if data_dir is not None:
    return os.path.expanduser(os.fspath(data_dir))
  searched = candidate_dirs(name)
  for d in searched:
    if _holds(name, d):
      return d
  raise DataError(
      f'{name}: no data found in {", ".join(searched)}. Put '
      f'{EXPECTED_FILES[name]} in one of them (e.g. {searched[0]}), or pass '
      'data_dir.'
  )


def describe(name: str, **options) -> dict[str, Any]:
  """What a model for `name` needs: kind, input_shape, num_classes.

  `kind` is 'image' (x float32 [H, W, C]), 'chars' (x int32 [seq_len] of
  character ids; also `vocab_size`), 'sequence' (x float32 [T, channels]) or
  'features' (x float32 [features]).
  Options that change the shape (`seq_len`, `only_digits`) are honoured.
  """
  _check_name(name)
  if name == 'fashion_mnist':
    return dict(kind='image', input_shape=(28, 28, 1), num_classes=10)
  if name in ('emnist', 'femnist_leaf'):
    classes = 10 if options.get('only_digits') else 62
    return dict(kind='image', input_shape=(28, 28, 1), num_classes=classes)
  if name == 'cifar10':
    return dict(kind='image', input_shape=(32, 32, 3), num_classes=10)
  if name == 'har':
    return dict(kind='sequence', input_shape=(128, 9), num_classes=6)
  if name == 'har_features':
    return dict(kind='features', input_shape=(561,), num_classes=6)
  from fedmask_tff.data import shakespeare  # pylint: disable=g-import-not-at-top

  seq_len = int(options.get('seq_len', shakespeare.DEFAULT_SEQ_LEN))
  return dict(
      kind='chars',
      input_shape=(seq_len,),
      num_classes=shakespeare.NUM_CLASSES,
      vocab_size=shakespeare.VOCAB_SIZE,
  )


def _call(name, fn, *args, **kwargs):
  """Calls loader `fn`, turning unknown keyword options into a DataError."""
  params = inspect.signature(fn).parameters
  unknown = sorted(k for k in kwargs if k not in params)
  if unknown:
    valid = sorted(
        p for p in params
        if p != 'data_dir' and params[p].kind == inspect.Parameter.POSITIONAL_OR_KEYWORD
    )
    raise DataError(
        f'{name}: unknown option(s) {", ".join(unknown)}; valid: '
        f'{", ".join(valid)}'
    )
  return fn(*args, **kwargs)


def load_federated(
    name: str,
    data_dir=None,
    num_clients: Optional[int] = None,
    seed: int = 0,
    test_fraction: float = 0.2,
    **options,
):
  """Loads dataset `name` as a `FederatedSplit` (see the module doc).

  Raises:
    DataError: for an unknown name (listing the valid ones), missing data
      (saying what to put where) or invalid files.
  """
  _check_name(name)
  if name == 'femnist_leaf' and options.get('only_digits'):
    raise DataError('only_digits is an option of emnist, not of femnist_leaf')
  directory = find_data_dir(name, data_dir)
  if name == 'fashion_mnist':
    from fedmask_tff.data import federated  # pylint: disable=g-import-not-at-top

    kwargs = dict(options)
    if num_clients is not None:
      kwargs['num_clients'] = num_clients
    return _call(name, federated.load_partitioned_fashion_mnist,
        directory, seed=seed, test_fraction=test_fraction, **kwargs
    )
  if name == 'cifar10':
    from fedmask_tff.data import cifar10  # pylint: disable=g-import-not-at-top

    kwargs = dict(options)
    if num_clients is not None:
      kwargs['num_clients'] = num_clients
    return _call(name, cifar10.load_cifar10,
        directory, seed=seed, test_fraction=test_fraction, **kwargs
    )
  if name == 'har':
    from fedmask_tff.data import har  # pylint: disable=g-import-not-at-top

    return _call(name, har.load_har,
        directory, test_fraction=test_fraction, seed=seed,
        max_clients=num_clients, **options
    )
  if name == 'har_features':
    from fedmask_tff.data import har_features  # pylint: disable=g-import-not-at-top

    return _call(name, har_features.load_har_features,
        directory, test_fraction=test_fraction, seed=seed,
        max_clients=num_clients, **options
    )
  if name in ('femnist_leaf', 'shakespeare_leaf'):
    from fedmask_tff.data import leaf  # pylint: disable=g-import-not-at-top

    fn = leaf.load_femnist_leaf if name == 'femnist_leaf' else leaf.load_shakespeare_leaf
    return _call(name, fn, directory, max_clients=num_clients, seed=seed, **options)
  if name == 'shakespeare_h5':
    from fedmask_tff.data import shakespeare  # pylint: disable=g-import-not-at-top

    return _call(name, shakespeare.load_shakespeare_h5,
        directory, max_clients=num_clients, seed=seed, **options
    )
  from fedmask_tff.data import tff_sqlite  # pylint: disable=g-import-not-at-top

  fn = tff_sqlite.load_tff_emnist if name == 'emnist' else tff_sqlite.load_tff_shakespeare
  return _call(name, fn, directory, max_clients=num_clients, seed=seed, **options)
