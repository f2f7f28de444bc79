"""fedmask_tff: FedMask (Li et al., SenSys 2021) on TensorFlow Federated and Keras.

Plain-Keras parts (no TFF needed; Keras 2 with TF 2.14 up to Keras 3 with current TF):
:mod:`fedmask_tff.masks.layers` and :mod:`fedmask_tff.masks.lstm` (masked layers, ``pack_masks``),
:mod:`fedmask_tff.masks.masking`, :mod:`fedmask_tff.masks.pruning` (``prune_model``),
:mod:`fedmask_tff.masks.aggregation`, :mod:`fedmask_tff.wire.bitpack`, :mod:`fedmask_tff.masks.vote_rules`.
TFF parts: :mod:`fedmask_tff.algorithms.fedmask.process` (the iterative process),
:mod:`fedmask_tff.runtime` (execution context), :mod:`fedmask_tff.simulation.runner`.
"""

__version__ = "0.1.0"

from fedmask_tff.masks.layers import MaskedConv2D, MaskedDense, masked_layers, pack_masks  # noqa: F401
from fedmask_tff.masks.lstm import MaskedLSTM, MaskedLSTMCell  # noqa: F401
from fedmask_tff.masks.pruning import prune_model  # noqa: F401
