"""Data layer of fedmask_tff: IDX reading, Fashion-MNIST, non-IID partitions.

Importing this package does not import TensorFlow Federated; only
`build_federated_split` (and `load_partitioned_fashion_mnist`) does.
"""

from fedmask_tff.data.errors import DataError
from fedmask_tff.data.fashion_mnist import DEFAULT_DIRS
from fedmask_tff.data.fashion_mnist import find_fashion_mnist_dir
from fedmask_tff.data.fashion_mnist import load_fashion_mnist
from fedmask_tff.data.fashion_mnist import load_idx_dataset
from fedmask_tff.data.federated import build_federated_split
from fedmask_tff.data.federated import FederatedSplit
from fedmask_tff.data.federated import load_partitioned_fashion_mnist
from fedmask_tff.data.federated import PARTITIONS
from fedmask_tff.data.federated import split_client_examples
from fedmask_tff.data.idx import read_idx
from fedmask_tff.data.partition import dirichlet_partition
from fedmask_tff.data.partition import pathological_partition
from fedmask_tff.data.registry import DATASETS
from fedmask_tff.data.registry import describe
from fedmask_tff.data.registry import load_federated

__all__ = [
    'DATASETS',
    'DEFAULT_DIRS',
    'describe',
    'load_federated',
    'DataError',
    'FederatedSplit',
    'PARTITIONS',
    'build_federated_split',
    'dirichlet_partition',
    'find_fashion_mnist_dir',
    'load_fashion_mnist',
    'load_idx_dataset',
    'load_partitioned_fashion_mnist',
    'pathological_partition',
    'read_idx',
    'split_client_examples',
]

