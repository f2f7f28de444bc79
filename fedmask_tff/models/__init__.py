"""The one registry of models: ``--model`` names to their masked, dense and binarized builders,
each data set's default model, and how many last masked layers one-shot pruning thins.

Builders live in :mod:`fedmask_tff.models.basic` (``cnn``, ``mlp``), :mod:`fedmask_tff.models.paper`
(the paper's ``vgg16``, ``har_mlp``, ``shakespeare_lstm``), :mod:`fedmask_tff.models.vgg16_paper`
(``vgg16_paper``, torchvision's ImageNet-shaped VGG-16) and :mod:`fedmask_tff.models.binarized`;
this module imports them, never the reverse.
"""

from __future__ import annotations

from typing import Callable, Optional

from fedmask_tff.models import binarized, basic, paper, vgg16_paper

MASKED_BUILDERS = {**basic.MODEL_BUILDERS, **paper.PAPER_MODEL_BUILDERS,
                   **vgg16_paper.MASKED_BUILDERS}
DENSE_BUILDERS = {**basic.DENSE_MODEL_BUILDERS, **paper.PAPER_DENSE_BUILDERS,
                  **vgg16_paper.DENSE_BUILDERS}
BINARY_BUILDERS = {**binarized.BINARY_MODEL_BUILDERS, **paper.PAPER_BINARY_BUILDERS,
                   **vgg16_paper.BINARY_BUILDERS}
# Models without a paper pruning setting prune their last two masked layers.
DEFAULT_PRUNE_LAST_LAYERS = 2


def masked_builder(name: str) -> Callable:
  """The masked (FedMask) builder of ``--model`` ``name``: ``cnn``, ``mlp`` or a paper model."""
  if name not in MASKED_BUILDERS:
    raise ValueError(f"unknown model {name!r}; valid: {', '.join(sorted(MASKED_BUILDERS))}")
  return MASKED_BUILDERS[name]


def dense_builder(name: str) -> Callable:
  """The dense, trainable counterpart of ``name`` (what FedAvg-style baselines train)."""
  if name not in DENSE_BUILDERS:
    raise ValueError(f"unknown model {name!r}; valid: {', '.join(sorted(DENSE_BUILDERS))}")
  return DENSE_BUILDERS[name]


def binary_builder(name: str) -> Callable:
  """The binarized counterpart of ``name`` (BNN-FedAvg); LSTM models have none."""
  if name not in BINARY_BUILDERS:
    raise ValueError(f"model {name!r} has no binarized counterpart (BNN-FedAvg needs Dense/Conv2D "
                     f"layers); models with one: {', '.join(sorted(BINARY_BUILDERS))}")
  return BINARY_BUILDERS[name]


def model_for(dataset: str, model: Optional[str] = None) -> str:
  """``model`` if given, else the paper's model for ``dataset`` (``cnn`` for others)."""
  return model or paper.DEFAULT_MODEL_FOR_DATASET.get(dataset, "cnn")


def prune_last_layers(model_name: str, requested: Optional[int] = None) -> int:
  """How many last masked layers are pruned: ``requested`` if given, else the paper's setting
  for the model, else :data:`DEFAULT_PRUNE_LAST_LAYERS`."""
  if requested is not None:
    return int(requested)
  return paper.prune_last_layers_for(model_name, DEFAULT_PRUNE_LAST_LAYERS)
