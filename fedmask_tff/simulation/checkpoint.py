"""Round checkpoints: a run stopped at any moment resumes exactly where its last round ended.

After every round the runner writes ``<output_dir>/checkpoint.npz`` (atomically:
temporary file, ``fsync``, ``os.replace``) holding

* ``meta``: JSON with the round number, the client-sampling RNG's state
  (``numpy.random.Generator.bit_generator.state``), the clients that have taken
  part so far and the ids of this round's clients;
* ``server_i``: the leaves of the server state (``tf.nest`` order; TFF's
  ``LearningAlgorithmState`` is an attrs class, which ``tf.nest`` flattens);
* ``client_j/...``: this round's new client states, encoded by the run's
  client-state store (packed as on disk);
* ``sha256``: a checksum of all of the above, checked on load.

The checkpoint is written *before* the round's client states go to the store.
A crash before it is replaced leaves the previous checkpoint and store intact
(nothing of the round was stored); a crash after it, while client files are
being written, is repaired on resume by writing the checkpoint's client states
again. Every other client file was finished in an earlier round. Clients'
shuffling seeds derive from (seed, round, client), so a resumed run computes
exactly what an uninterrupted one would.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any, Optional

import numpy as np

from fedmask_tff.wire.client_state import digest

FORMAT = "fedmask_tff.simulation.checkpoint/v1"


class CheckpointError(RuntimeError):
  """A checkpoint is unreadable, corrupt or of another run."""


def save(path: str, round_num: int, server_state, rng_state: dict, participated,
         round_clients: list, encoded_client_states: Optional[list]) -> int:
  """Writes a checkpoint atomically; returns its size in bytes."""
  import tensorflow as tf
  arrays: dict[str, Any] = {}
  for i, leaf in enumerate(tf.nest.flatten(server_state)):
    arrays[f"server_{i}"] = np.asarray(leaf)
  if encoded_client_states is not None:
    for j, enc in enumerate(encoded_client_states):
      for k, v in enc.items():
        arrays[f"client_{j}/{k}"] = np.asarray(v)
  meta = {"format": FORMAT, "round": int(round_num), "rng_state": rng_state,
          "participated": sorted(participated), "round_clients": list(round_clients),
          "has_client_states": encoded_client_states is not None}
  arrays["meta"] = np.array(json.dumps(meta))
  arrays["sha256"] = np.array(digest(arrays))
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  tmp = f"{path}.tmp"
  with open(tmp, "wb") as f:
    f.write(buf.getvalue())
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  return len(buf.getvalue())


def load(path: str, server_template) -> dict:
  """Reads a checkpoint; returns ``dict(round, rng_state, participated, round_clients,
  server_state, encoded_client_states)``. The server state is rebuilt in the structure
  of ``server_template`` (the algorithm's ``initialize()``), each leaf cast to its dtype."""
  import tensorflow as tf
  try:
    with np.load(path, allow_pickle=False) as f:
      arrays = {k: f[k] for k in f.files}
  except Exception as e:
    raise CheckpointError(f"checkpoint {path} is unreadable: {e}") from e
  stored = str(arrays.pop("sha256", np.array("")))
  if stored != digest(arrays):
    raise CheckpointError(f"checkpoint {path} fails its checksum (corrupt or edited); "
                          "rerun with --overwrite to start again")
  try:
    meta = json.loads(str(arrays.pop("meta")))
  except (KeyError, ValueError) as e:
    raise CheckpointError(f"checkpoint {path} has no readable meta data") from e
  if meta.get("format") != FORMAT:
    raise CheckpointError(f"checkpoint {path} is not a {FORMAT} file")
  template = tf.nest.flatten(server_template)
  leaves = []
  for i, ref in enumerate(template):
    if f"server_{i}" not in arrays:
      raise CheckpointError(f"checkpoint {path} lacks server leaf {i} (another algorithm or model?)")
    a = arrays[f"server_{i}"]
    ref = np.asarray(ref)
    if a.shape != ref.shape:
      raise CheckpointError(f"checkpoint {path}: server leaf {i} has shape {a.shape}, the "
                            f"algorithm needs {ref.shape} (another model?)")
    leaves.append(a.astype(ref.dtype) if ref.dtype != object else a)
  if f"server_{len(template)}" in arrays:
    raise CheckpointError(f"checkpoint {path} has more server leaves than the algorithm")
  encoded = None
  if meta["has_client_states"]:
    encoded = [{} for _ in meta["round_clients"]]
    for key, value in arrays.items():
      if key.startswith("client_"):
        head, _, name = key.partition("/")
        encoded[int(head[len("client_"):])][name] = value
  return {"round": meta["round"], "rng_state": meta["rng_state"],
          "participated": set(meta["participated"]), "round_clients": meta["round_clients"],
          "server_state": tf.nest.pack_sequence_as(server_template, leaves),
          "encoded_client_states": encoded}
