"""FedMask in one package: ``process`` (its TFF computations and ``FedMaskConfig``) and
``algorithm`` (FedMask and ``local_masks`` under the shared algorithm interface). The rule it
aggregates with is :mod:`fedmask_tff.masks.aggregation`."""

from fedmask_tff.algorithms.fedmask.process import (  # noqa: F401
    UPLOADS, FedMaskConfig, FedMaskProcess, MaskSpec, build_fedmask_process, mask_specs)
