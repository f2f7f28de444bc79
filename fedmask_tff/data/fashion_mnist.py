"""Locating and loading Fashion-MNIST (and other MNIST-like IDX datasets)."""

import os
from typing import Optional

import numpy as np

from fedmask_tff.data.errors import DataError
from fedmask_tff.data.idx import read_idx

# Searched in order by `find_fashion_mnist_dir` when no directory is given:
# Debian's `dataset-fashion-mnist` package, then the Keras download cache.
# `~` is expanded at lookup time.
DEFAULT_DIRS = (
    '/usr/share/datasets/fashion-mnist',
    '~/.keras/datasets/fashion-mnist',
)

# The four IDX files of Fashion-MNIST; each may exist as `<name>.gz` or raw.
TRAIN_IMAGES = 'train-images-idx3-ubyte'
TRAIN_LABELS = 'train-labels-idx1-ubyte'
TEST_IMAGES = 't10k-images-idx3-ubyte'
TEST_LABELS = 't10k-labels-idx1-ubyte'
FILE_NAMES = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)

NUM_CLASSES = 10
IMAGE_SHAPE = (28, 28, 1)


def _find_file(directory: str, name: str) -> Optional[str]:
  """Returns `directory/name.gz` or `directory/name` (first existing), else None."""
  for candidate in (name + '.gz', name):
    path = os.path.join(directory, candidate)
    if os.path.isfile(path):
      return path
  return None


def _missing_files(directory: str) -> list[str]:
  return [n for n in FILE_NAMES if _find_file(directory, n) is None]


def find_fashion_mnist_dir(data_dir=None) -> str:
  """Returns the directory holding the four Fashion-MNIST IDX files.

  Args:
    data_dir: a directory to use instead of searching (`~` is expanded). It
      must hold all four files of `FILE_NAMES`, each gzipped or raw.

  Returns:
    The directory path (with `~` expanded).

  Raises:
    DataError: if `data_dir` is given but missing or incomplete, or, when it is
      None, if no directory of `DEFAULT_DIRS` holds all four files.
  """
  if data_dir is not None:
    directory = os.path.expanduser(os.fspath(data_dir))
    if not os.path.isdir(directory):
      raise DataError(
          f'Fashion-MNIST data_dir {directory} does not exist or is not a '
          'directory'
      )
    missing = _missing_files(directory)
    if missing:
      raise DataError(
          f'Fashion-MNIST data_dir {directory} lacks '
          + ', '.join(missing)
          + ' (looked for NAME.gz and NAME); it needs all of '
          + ', '.join(f'{n}.gz' for n in FILE_NAMES)
      )
    return directory

  searched = [os.path.expanduser(d) for d in DEFAULT_DIRS]
  for directory in searched:
    if os.path.isdir(directory) and not _missing_files(directory):
      return directory
  raise DataError(
      f'Fashion-MNIST not found in {", ".join(searched)}. Install Debian\'s '
      'package: `apt-get install dataset-fashion-mnist` (as root; it puts the '
      'files in /usr/share/datasets/fashion-mnist), or pass --data_dir=DIR '
      'pointing at a folder with train-images-idx3-ubyte.gz, '
      'train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, '
      't10k-labels-idx1-ubyte.gz (the Keras cache layout '
      '~/.keras/datasets/fashion-mnist works too).'
  )


def load_idx_dataset(
    image_path, label_path, num_classes: int, image_size=None
) -> tuple[np.ndarray, np.ndarray]:
  """Loads one split of an MNIST-like dataset from an image and a label file.

  Args:
    image_path: IDX file of uint8 images, shape [N, H, W].
    label_path: IDX file of integer labels, shape [N].
    num_classes: labels must lie in [0, num_classes).
    image_size: optional expected (H, W), e.g. (28, 28).

  Returns:
    `(images, labels)`: images float32 [N, H, W, 1] scaled to [0, 1] (pixel /
    255), labels int32 [N].

  Raises:
    DataError: naming the offending file, if a file cannot be read (see
      `read_idx`), the images are not 3-D uint8 (of size `image_size` if
      given), the labels are not 1-D integers in range, the two counts differ
      or the split is empty.
  """
  image_path, label_path = os.fspath(image_path), os.fspath(label_path)
  images = read_idx(image_path)
  labels = read_idx(label_path)
  if images.ndim != 3:
    raise DataError(
        f'Image file {image_path}: expected 3-D images [N, H, W], got shape '
        f'{images.shape}'
    )
  if image_size is not None and tuple(images.shape[1:]) != tuple(image_size):
    raise DataError(
        f'Image file {image_path}: expected images of size '
        f'{tuple(image_size)}, got {tuple(images.shape[1:])}'
    )
  if images.dtype != np.uint8:
    raise DataError(
        f'Image file {image_path}: expected uint8 pixels, got {images.dtype}'
    )
  if labels.ndim != 1:
    raise DataError(
        f'Label file {label_path}: expected 1-D labels [N], got shape '
        f'{labels.shape}'
    )
  if not np.issubdtype(labels.dtype, np.integer):
    raise DataError(
        f'Label file {label_path}: expected integer labels, got {labels.dtype}'
    )
  if images.shape[0] != labels.shape[0]:
    raise DataError(
        f'Image file {image_path} has {images.shape[0]} images but label file '
        f'{label_path} has {labels.shape[0]} labels'
    )
  if labels.shape[0] == 0:
    raise DataError(f'Label file {label_path}: holds no examples')
  bad = (labels < 0) | (labels >= num_classes)
  if bad.any():
    first = int(np.argmax(bad))
    raise DataError(
        f'Label file {label_path}: {int(bad.sum())} labels outside '
        f'0..{num_classes - 1} (first: label {int(labels[first])} at index '
        f'{first})'
    )
  images = (images.astype(np.float32) / np.float32(255.0))[..., np.newaxis]
  return images, labels.astype(np.int32)


def load_fashion_mnist(data_dir=None) -> tuple[np.ndarray, np.ndarray]:
  """Loads Fashion-MNIST, pooling its train and t10k splits.

  The federated train/test split is made later, per client, so the official
  60k/10k split is not kept: the train examples come first, then the t10k ones.

  Args:
    data_dir: directory with the four IDX files, or None to search
      `DEFAULT_DIRS` (see `find_fashion_mnist_dir`).

  Returns:
    `(images, labels)`: images float32 [N, 28, 28, 1] in [0, 1], labels int32
    [N] in 0..9; N = 70000 for the official files.

  Raises:
    DataError: if the files cannot be found or are invalid.
  """
  directory = find_fashion_mnist_dir(data_dir)
  splits = [
      load_idx_dataset(
          _find_file(directory, images_name),
          _find_file(directory, labels_name),
          num_classes=NUM_CLASSES,
          image_size=IMAGE_SHAPE[:2],
      )
      for images_name, labels_name in (
          (TRAIN_IMAGES, TRAIN_LABELS),
          (TEST_IMAGES, TEST_LABELS),
      )
  ]
  images = np.concatenate([s[0] for s in splits], axis=0)
  labels = np.concatenate([s[1] for s in splits], axis=0)
  return images, labels
