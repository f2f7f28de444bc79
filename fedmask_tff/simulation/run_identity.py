"""Whose a run's state files are: the run's identity, and the check of every client file.

A run's identity is two strings, written to ``results.json["config"]`` and to every checkpoint:

* ``run_id``: 16 random hex digits chosen when the run starts (kept when it resumes);
* ``fingerprint``: SHA-256 of the settings that change results (every flag not at its default
  but those a resumed run may change, :data:`fedmask_tff.simulation.run_config.RESUME_FREE`),
  and of the data's
  partition (each client's id and its train/test example indices, or, for data sets split by
  their files, its example counts).

Each client state file records its client id, the ``run_id`` and the round after which it was
written (:mod:`fedmask_tff.wire.client_state`). :func:`verify_client_files` checks every file
of a run's store against the checkpoint when the run starts or resumes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import secrets
from typing import Optional

import numpy as np

from fedmask_tff.simulation.run_config import RESUME_FREE, RunConfig, unused_settings


class StateMismatch(RuntimeError):
  """A state file that is not this run's (another run, client or round), or a missing one."""


def new_run_id() -> str:
  return secrets.token_hex(8)


def result_settings(config: RunConfig) -> dict:
  """The settings that change a run's results and differ from their defaults (the fingerprint's
  first part; a setting added to a later version, at its default, leaves fingerprints as
  they were)."""
  ignored = set(RESUME_FREE) | unused_settings(config)
  default = RunConfig()
  return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
          if f.name not in ignored and getattr(config, f.name) != getattr(default, f.name)}


def partition_digest(split) -> str:
  """SHA-256 of ``split``'s clients: ids and example indices (or counts where it has none)."""
  h = hashlib.sha256()
  for cid in split.client_ids:
    h.update(cid.encode() + b"\0")
    for indices in (split.train_indices, split.test_indices):
      if indices is not None:
        h.update(np.asarray(indices[cid], np.int64).tobytes())
  if split.train_indices is None or split.test_indices is None:
    h.update(json.dumps(split.summary(), sort_keys=True, default=str).encode())
  return h.hexdigest()


def fingerprint(config: RunConfig, split) -> str:
  """The run's fingerprint: settings that change results, and the data's partition."""
  payload = json.dumps(result_settings(config), sort_keys=True, default=str)
  return hashlib.sha256((payload + "\n" + partition_digest(split)).encode()).hexdigest()


def verify_client_files(directory: str, run_id: str, last_written: dict, pending: set,
                        checkpoint_path: Optional[str], checkpoint_round: int) -> None:
  """Checks every client file in ``directory`` (the run's ``client_states``) against the run's
  record (``run_id``, and the checkpoint's): each file is intact (checksum), its client's, this run's, and written after the round
  ``last_written`` records (client id -> round; empty for a fresh run); every client the record
  names has its file; no other client has one. ``pending``: the clients of the checkpoint's own
  round, whose files the resume writes again from the checkpoint (theirs may be of an earlier
  round, or missing for a first-time client).

  Raises:
    StateMismatch: naming the file and what does not match.
  """
  from fedmask_tff.wire.client_state import ClientStateError, ClientStateStore
  if not os.path.isdir(directory):
    if last_written:
      raise StateMismatch(f"{directory} is missing, but the checkpoint {checkpoint_path} says "
                          f"{len(last_written)} clients have a state there: rerun with "
                          "--overwrite to start again")
    return
  store = ClientStateStore(directory, [], lambda: None)  # reads identities only (any store's files)
  store.owner = run_id
  again = "rerun with --overwrite to start again, or restore the run's own file"
  stored = set(store.client_ids())
  foreign = sorted(stored - set(last_written))
  if foreign and not checkpoint_path:
    raise StateMismatch(f"client state file {store.path(foreign[0])} exists, but this run has "
                        "not started (no results.json): left by another run? Remove "
                        f"{directory}, or pass --overwrite")
  record = f"the checkpoint {checkpoint_path} (round {checkpoint_round})"
  if foreign:
    raise StateMismatch(f"client state file {store.path(foreign[0])} is of a client that {record} "
                        f"says has no state (copied from another run?): {again}")
  for cid, round_num in sorted(last_written.items()):
    path = store.path(cid)
    if cid not in stored:
      if cid in pending:
        continue
      raise StateMismatch(f"client state file {path} is missing, but {record} says {cid} "
                          f"took part (its state was written after round {round_num}): {again}")
    try:
      found = store.read_identity(cid)["written_after_round"]
    except ClientStateError as e:
      raise StateMismatch(f"{e}: {again}") from None
    expected_ok = found <= round_num if cid in pending else found == round_num
    if not expected_ok:
      raise StateMismatch(f"client state file {path} was written after round {found}, but "
                          f"{record} says {cid}'s state was last written after round {round_num} "
                          f"(a file of another moment of this run): {again}")
