"""Bounds that make a setting meaningless or impossible, checked before any data is loaded.

No TensorFlow here: :mod:`fedmask_tff.simulation.run_config` calls these while it validates.
"""

from __future__ import annotations

import os
from typing import Optional

# Keras parameters (weights, mask scores and masks) of each masked model at --model_width=1,
# the smallest over the data sets it serves (tests/unit/test_limits.py builds them). Every
# hidden layer scales with the width, so at width w >= 1 a model holds at least w times this.
MIN_PARAMETERS_AT_WIDTH_1 = {"mlp": 627_600, "cnn": 1_284_192, "vgg16": 45_719_616,
                             "har_mlp": 3_305_472, "shakespeare_lstm": 2_714_576}
BYTES_PER_PARAMETER = 4  # float32

MAX_SEED = 2**32 - 1  # numpy's and Keras' global seeds are 32-bit
MAX_ROUNDS = 1_000_000
MAX_BATCH_SIZE = 1_000_000
# A TFF worker needs more than this to start; the environment variable lowers it only for the
# test that forces a worker restart after every round.
MIN_WORKER_MEMORY_MB = int(os.environ.get("FEDMASK_TFF_MIN_WORKER_MEMORY_MB", "256"))


def physical_memory_bytes() -> int:
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def min_model_bytes(model: Optional[str], width: float) -> int:
  """A lower bound on the bytes of the model's parameters at ``width`` (0 for ``width <= 1``:
  those models are at most the documented sizes). ``model`` ``None``: the data set's model,
  bounded by the smallest model's size."""
  if width <= 1:
    return 0
  base = MIN_PARAMETERS_AT_WIDTH_1.get(model, min(MIN_PARAMETERS_AT_WIDTH_1.values()))
  return int(min(base * width * BYTES_PER_PARAMETER, 2**62))


def check_model_fits(model: Optional[str], width: float) -> None:
  """Raises ValueError when the model at ``width`` cannot fit this machine's memory."""
  need, have = min_model_bytes(model, width), physical_memory_bytes()
  if need > have:
    what = f"{model} model" if model else "data set's model"
    raise ValueError(f"--model_width={width:g}: the {what} would hold at "
                     f"least {need / BYTES_PER_PARAMETER:.3g} parameters ({need / 1e9:.3g} GB as "
                     f"float32), more than this machine's {have / 1e9:.3g} GB of memory: use a "
                     "smaller --model_width")
