"""Round checkpoints: a run stopped at any moment resumes exactly where its last round ended.

After every round the runner writes ``<output_dir>/checkpoint.npz`` (atomically:
temporary file, ``fsync``, ``os.replace``) holding

* ``meta``: JSON with the round number, the client-sampling RNG's state
  (``numpy.random.Generator.bit_generator.state``), the clients that have taken
  part so far, the ids of this round's clients, the run's identity (``run_id``, chosen when
  the run started, and ``fingerprint``, a digest of the settings that change results and of
  the data's partition: :mod:`fedmask_tff.simulation.run_identity`), the round after which
  each client's state file was last written (``last_written``) and the round's row of
  ``results.json`` as it stood when the checkpoint was written (``row``);
* ``server_i``: the leaves of the server state (``tf.nest`` order; TFF's
  ``LearningAlgorithmState`` is an attrs class, which ``tf.nest`` flattens);
* ``client_j/...``: this round's new client states, encoded by the run's
  client-state store (packed as on disk);
* ``sha256``: a checksum of all of the above, checked on load.

The checkpoint is written *before* the round's client states go to the store.
A crash before it is replaced leaves the previous checkpoint and store intact
(nothing of the round was stored); a crash after it, while client files are
being written, is repaired on resume by writing the checkpoint's client states
again; a crash before the round's row reached ``results.json`` is repaired from ``row``. Every other client file was finished in an earlier round. Clients'
shuffling seeds derive from (seed, round, client), so a resumed run computes
exactly what an uninterrupted one would.
"""

from __future__ import annotations

import io
import json
from typing import Any, Optional

import numpy as np

from fedmask_tff.wire.client_state import digest, write_file_atomic

FORMAT = "fedmask_tff.simulation.checkpoint/v2"


class CheckpointError(RuntimeError):
  """A checkpoint is unreadable, corrupt or of another run."""


def save(path: str, round_num: int, server_state, rng_state: dict, participated,
         round_clients: list, encoded_client_states: Optional[list], *, run: dict,
         last_written: dict, row: dict) -> int:
  """Writes a checkpoint atomically; returns its size in bytes. ``run``: ``dict(run_id,
  fingerprint)``; ``last_written``: client id -> round after which its file was last written;
  ``row``: the round's row of ``results.json``."""
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
          "has_client_states": encoded_client_states is not None, "run_id": run["run_id"],
          "fingerprint": run["fingerprint"], "last_written": dict(sorted(last_written.items())),
          "row": row}
  arrays["meta"] = np.array(json.dumps(meta))
  arrays["sha256"] = np.array(digest(arrays))
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  write_file_atomic(f"{path}.tmp", path, buf.getvalue())
  return len(buf.getvalue())


def _read(path: str) -> tuple[dict, dict]:
  """``(arrays, meta)`` of a checkpoint, after checking its checksum and format."""
  try:
    with np.load(path, allow_pickle=False) as f:
      arrays = {k: f[k] for k in f.files}
  except Exception as e:
    raise CheckpointError(f"checkpoint {path} is unreadable ({e}): rerun with --overwrite to "
                          "start again") from None
  stored = str(arrays.pop("sha256", np.array("")))
  if stored != digest(arrays):
    raise CheckpointError(f"checkpoint {path} fails its checksum (corrupt or edited); "
                          "rerun with --overwrite to start again")
  try:
    meta = json.loads(str(arrays.pop("meta")))
  except (KeyError, ValueError) as e:
    raise CheckpointError(f"checkpoint {path} has no readable meta data") from e
  if meta.get("format") != FORMAT:
    raise CheckpointError(f"checkpoint {path} is not a {FORMAT} file (written by another version "
                          "of fedmask_tff?); rerun with --overwrite to start again")
  return arrays, meta


def read_meta(path: str) -> dict:
  """A checkpoint's record without its arrays (checksum checked): ``round``, ``run_id``,
  ``fingerprint``, ``last_written``, ``round_clients``, ``has_client_states``, ``row``, ... ."""
  return _read(path)[1]


def load(path: str, server_template) -> dict:
  """Reads a checkpoint; returns ``dict(round, rng_state, participated, round_clients,
  server_state, encoded_client_states, run_id, fingerprint, last_written, row)``. The server
  state is rebuilt in the structure of ``server_template`` (the algorithm's ``initialize()``),
  each leaf cast to its dtype."""
  import tensorflow as tf
  arrays, meta = _read(path)
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
          "encoded_client_states": encoded, "run_id": meta["run_id"],
          "fingerprint": meta["fingerprint"], "last_written": meta["last_written"],
          "row": meta["row"]}


def check_belongs(ckpt: dict, path: str, run: dict, results_path: str, rounds: list) -> None:
  """Refuses a checkpoint that is not this run's latest: of another run (``run``: the run id
  ``results.json`` records and the fingerprint of the current settings and data), or of a round
  other than the last one of ``results.json`` (``rounds``: its rows) or the one after it (a
  crash between the checkpoint and ``results.json``; its row is in the checkpoint).

  Raises:
    CheckpointError: naming both files and what does not match.
  """
  again = "rerun with --overwrite to start again"
  if ckpt["run_id"] != run["run_id"]:
    raise CheckpointError(f"checkpoint {path} belongs to another run (run id {ckpt['run_id']}; "
                          f"{results_path} is of run {run['run_id']}): {again}")
  if ckpt["fingerprint"] != run["fingerprint"]:
    raise CheckpointError(f"checkpoint {path} was written with other settings or another data "
                          f"partition than this command's (fingerprint {ckpt['fingerprint'][:12]}, "
                          f"now {run['fingerprint'][:12]}): {again}")
  last = max((r["round"] for r in rounds), default=0)
  if ckpt["round"] not in (last, last + 1):
    raise CheckpointError(f"checkpoint {path} is of round {ckpt['round']}, but {results_path} "
                          f"ends with round {last}: the two files are not of the same moment of "
                          f"this run; {again}")
