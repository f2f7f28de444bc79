"""Validation data held out of each client's training set (``--validation_fraction``).

Defaults and learning rates must be chosen on data the reported test accuracy never
sees. :func:`holdout_validation` turns a :class:`FederatedSplit` into one whose
``train`` is each client's training examples minus a held-out share and whose
``test`` is that share: a run on it reports *validation* accuracy, and the
client's real test examples are not touched.
"""

from __future__ import annotations

import numpy as np

from fedmask_tff.data.errors import DataError


def check_validation_fraction(fraction: float) -> float:
  fraction = float(fraction)
  if not (0.0 <= fraction < 1.0) or np.isnan(fraction):
    raise DataError(f"validation_fraction must be in [0, 1), got {fraction}")
  return fraction


def client_arrays(client_data, cid):
  """A client's examples as numpy: ``{'x': [n, ...], 'y': int32 [n]}``."""
  xs, ys = [], []
  for element in client_data.create_tf_dataset_for_client(cid).as_numpy_iterator():
    xs.append(element["x"])
    ys.append(element["y"])
  return {"x": np.stack(xs), "y": np.asarray(ys, np.int32)}


def holdout_validation(split, fraction: float, seed: int):
  """Returns a split whose test sets are ``fraction`` of each client's *training* examples.

  Per client and label, ``round(fraction * n)`` training examples (clipped so
  that both parts keep every label with at least 2 examples, seeded by
  ``[seed, 7717, client index]``) become its validation set; the remaining
  training examples are its new training set. The original test examples are
  dropped from the returned split, which records no source indices (a run saves the
  partition of the split it was given, so ``--partition_file`` reproduces its clients).

  Raises:
    DataError: for a fraction outside (0, 1), or a client with fewer than 2
      training examples (it cannot give up any).
  """
  from fedmask_tff.data import _clients
  from fedmask_tff.data.federated import split_client_examples
  fraction = check_validation_fraction(fraction)
  if fraction == 0.0:
    raise DataError("validation_fraction must be > 0 to hold out validation data")
  train, valid = {}, {}
  for i, cid in enumerate(split.client_ids):
    arrays = client_arrays(split.train, cid)
    n = arrays["y"].size
    if n < 2:
      raise DataError(f"client {cid} has {n} training example(s): too few to hold out validation data")
    keep, held = split_client_examples(np.arange(n), arrays["y"], fraction, [seed, 7717, i])
    train[cid] = {"x": arrays["x"][keep], "y": arrays["y"][keep]}
    valid[cid] = {"x": arrays["x"][held], "y": arrays["y"][held]}
  info = dict(getattr(split, "info", None) or {})
  info["validation_fraction"] = fraction
  info["evaluated_on"] = "validation (held out of each client's training examples)"
  out = _clients.make_split(train, valid, split.num_classes,
                            original_ids=getattr(split, "original_ids", None), info=info)
  out.num_source_examples = split.num_source_examples
  return out
