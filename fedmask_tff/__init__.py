"""fedmask_tff: FedMask (Li et al., SenSys 2021) on TensorFlow Federated and Keras.

Plain-Keras parts (no TFF needed): :mod:`fedmask_tff.layers` (masked layers),
:mod:`fedmask_tff.masking`, :mod:`fedmask_tff.pruning`,
:mod:`fedmask_tff.aggregation`, :mod:`fedmask_tff.bitpack`.
TFF parts: :mod:`fedmask_tff.fedmask` (the iterative process),
:mod:`fedmask_tff.runtime` (execution context), :mod:`fedmask_tff.runner`.
"""

__version__ = "0.1.0"

from fedmask_tff.layers import MaskedConv2D, MaskedDense, masked_layers  # noqa: F401
from fedmask_tff.lstm import MaskedLSTM, MaskedLSTMCell  # noqa: F401
