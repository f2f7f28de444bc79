"""FedMask in one package: ``config`` (:class:`FedMaskConfig`), ``process`` (its TFF
iterative process, composed from ``client_work``, ``server_sums``, ``server_state``,
``federated`` and ``wire_forms``: computations each built by a short factory from the facts
they share) and ``algorithm``
(FedMask and ``local_masks`` under the shared algorithm interface). The rule it aggregates
with is :mod:`fedmask_tff.masks.aggregation`."""

from fedmask_tff.algorithms.fedmask.config import UPLOADS, FedMaskConfig  # noqa: F401
from fedmask_tff.algorithms.fedmask.process import (  # noqa: F401
    FedMaskProcess, MaskSpec, build_fedmask_process, mask_specs)
