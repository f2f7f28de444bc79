"""Per-client state kept between rounds, on disk, keyed by client id.

TFF keeps no client state: the driver loads the states of the sampled clients,
passes them into ``next`` as CLIENTS-placed values and stores what comes back.
Memory is bounded by the clients of one round: nothing is cached.

A client's state (see :func:`fedmask_tff.algorithms.fedmask.process.build_fedmask_process`) is
``OrderedDict(scores=(S_i...), keep=(S_i...), personal=(S_i...), rounds=int32)``.
On disk, one ``.npz`` file per client holds

* ``keep_i``: the pruning mask, bit-packed (``ceil(n_i / 8)`` bytes);
* ``scores_i``: float32 scores at the kept positions only (pruned positions
  never matter again: their mask is 0 for good, and they load as 0);
* ``personal_i``: the binary mask of the client's personalized model (after
  its last local training), bit-packed, at the kept positions only;
* ``rounds``: how many rounds the client has taken part in;
* ``client_id``, ``run_id`` and ``written_after_round``: whose state it is (the client, the run
  that wrote it, and the round after which it was written; 0: before round 1), so that a file of
  another client, another run or another round is refused (:meth:`ClientStateStore.identity`);
* ``sha256``: a checksum of all of the above, checked on load.

:class:`PackedStateStore` reads and writes the same files in the process's wire form (masks
bit-packed over all elements), so that FedMask's driver never holds a round's states at full
size.

Writes are atomic (temporary file, ``fsync``, ``os.replace``): a crash mid-write
leaves the previous state readable. A client never seen has no file and gets
the process's initial state.
"""

from __future__ import annotations

import collections
import hashlib
import io
import os
import re
from typing import Callable, Sequence

import numpy as np

from fedmask_tff.wire import bitpack

_SAFE_ID = re.compile(r"^[A-Za-z0-9_.\-]+$")
IDENTITY_KEYS = ("client_id", "run_id", "written_after_round")


class ClientStateError(RuntimeError):
  """A stored client state is missing parts, corrupt or of the wrong model."""


def digest(arrays: dict) -> str:
  """SHA-256 over the names, dtypes, shapes and bytes of ``arrays`` (sorted by name)."""
  h = hashlib.sha256()
  for key in sorted(arrays):
    a = np.ascontiguousarray(arrays[key])
    h.update(key.encode())
    h.update(str(a.dtype).encode())
    h.update(str(a.shape).encode())
    h.update(a.tobytes())
  return h.hexdigest()


class ClientStateStore:
  """Client states on disk under ``directory``, one packed file per client.

  Args:
    directory: where the files live (created if missing).
    shapes: the shape of each masked weight, in the process's order.
    initial_state_fn: returns the state of a client never seen.
  """

  # Whose files this store writes and reads: the run's id (``None``: a reader of a finished run,
  # such as the TFLite export, that does not check it) and the round the files written now follow.
  owner = None
  round_num = 0

  def __init__(self, directory: str, shapes: Sequence[tuple], initial_state_fn: Callable):
    self.directory = directory
    self.shapes = [tuple(s) for s in shapes]
    self._initial_state_fn = initial_state_fn
    os.makedirs(directory, exist_ok=True)

  def path(self, client_id: str) -> str:
    if not _SAFE_ID.fullmatch(client_id):  # fullmatch: `$` would accept a trailing newline
      raise ValueError(f"client id {client_id!r} has characters unsafe for a file name")
    return os.path.join(self.directory, f"{client_id}.npz")

  def __contains__(self, client_id: str) -> bool:
    return os.path.exists(self.path(client_id))

  def client_ids(self) -> list[str]:
    """Ids of the clients that have a stored state, sorted."""
    return sorted(f[:-4] for f in os.listdir(self.directory)
                  if f.endswith(".npz") and not f.startswith("."))

  def get(self, client_id: str):
    path = self.path(client_id)
    if not os.path.exists(path):
      return self._initial_state_fn()
    arrays = _read_npz(path)
    self.identity(arrays, client_id, path)
    return self.decode(arrays, path)

  def read_identity(self, client_id: str) -> dict:
    """The identity of ``client_id``'s stored file (checksum and owner checked; see
    :meth:`identity`)."""
    path = self.path(client_id)
    return self.identity(_read_npz(path), client_id, path)

  def identity(self, arrays: dict, client_id: str, where: str) -> dict:
    """``dict(client_id, run_id, written_after_round)`` of a stored state, after checking its
    checksum, that it is ``client_id``'s, and (when :attr:`owner` is set) that this run wrote it.

    Raises:
      ClientStateError: naming ``where`` and what does not match.
    """
    arrays = _checked(arrays, where, strip_identity=False)
    if any(k not in arrays for k in IDENTITY_KEYS):
      if self.owner is None:
        return {"client_id": client_id, "run_id": None, "written_after_round": None}
      raise ClientStateError(f"client state file {where} records no client, run or round (written "
                             "by an older version of fedmask_tff?); pass --overwrite to start again")
    found = {"client_id": str(arrays["client_id"]), "run_id": str(arrays["run_id"]),
             "written_after_round": int(arrays["written_after_round"])}
    if found["client_id"] != client_id:
      raise ClientStateError(f"client state file {where} is the state of {found['client_id']}, "
                             f"not of {client_id} (files swapped or copied?)")
    if self.owner is not None and found["run_id"] != self.owner:
      raise ClientStateError(f"client state file {where} was written by another run (run id "
                             f"{found['run_id']}; this run is {self.owner})")
    return found

  def decode(self, arrays: dict, where: str = "client state"):
    """The state that :meth:`encode` made ``arrays`` from (checksum checked)."""
    packed = self.decode_packed(arrays, where)
    unpack = lambda masks: tuple(bitpack.unpack_bits_np(m, shape)
                                 for m, shape in zip(masks, self.shapes))
    return collections.OrderedDict(scores=packed["scores"], keep=unpack(packed["keep"]),
                                   personal=unpack(packed["personal"]), rounds=packed["rounds"])

  def put(self, client_id: str, state) -> int:
    """Stores ``state`` atomically; returns the file's size in bytes."""
    return self.put_encoded(client_id, self.encode(state, client_id))

  def put_encoded(self, client_id: str, arrays: dict) -> int:
    """Stores the arrays :meth:`encode` made (identity and checksum as they are); returns the
    file's size in bytes."""
    return _write_npz_atomic(self.directory, client_id, self.path(client_id), arrays)

  def encode(self, state, client_id: str = "?") -> dict:
    """The packed arrays (with their checksum) that represent ``state`` on disk."""
    if len(state["scores"]) != len(self.shapes):
      raise ValueError(f"state has {len(state['scores'])} masks, the store expects {len(self.shapes)}")
    for i, (s, k) in enumerate(zip(state["scores"], state["keep"])):
      if np.shape(s) != self.shapes[i] or np.shape(k) != self.shapes[i]:
        raise ValueError(f"mask {i}: shapes {np.shape(s)}/{np.shape(k)}, expected {self.shapes[i]}")
    return self.encode_packed(collections.OrderedDict(
        scores=state["scores"], keep=tuple(bitpack.pack_bits_np(k) for k in state["keep"]),
        personal=tuple(bitpack.pack_bits_np(p) for p in state["personal"]),
        rounds=state["rounds"]), client_id)

  def decode_packed(self, arrays: dict, where: str = "client state"):
    """The wire-form state (masks packed) that ``arrays`` hold (checksum checked)."""
    arrays, path = _checked(arrays, where), where
    if "rounds" not in arrays:
      raise ClientStateError(f"client state file {path} lacks rounds")
    scores, keeps, personal = [], [], []
    for i, shape in enumerate(self.shapes):
      n = int(np.prod(shape))
      try:
        packed, kept_scores = arrays[f"keep_{i}"], arrays[f"scores_{i}"]
      except KeyError as e:
        raise ClientStateError(f"client state file {path} lacks {e.args[0]}") from None
      keep = (bitpack.unpack_bits_np(packed, (n,), bool)
              if packed.dtype == np.uint8 and packed.size == bitpack.packed_size_bytes(n) else None)
      if keep is None or kept_scores.shape != (int(keep.sum()),):
        raise ClientStateError(f"client state file {path} does not match the model's mask "
                               f"{i} of shape {shape}")
      full = np.zeros(n, np.float32)
      full[keep] = kept_scores
      scores.append(full.reshape(shape))
      keeps.append(bitpack.pack_bits_np(keep))
      packed_personal = arrays.get(f"personal_{i}")
      if packed_personal is None or packed_personal.size != bitpack.packed_size_bytes(kept_scores.size):
        raise ClientStateError(f"client state file {path} lacks a valid personal_{i}")
      mine = np.zeros(n, bool)
      mine[keep] = bitpack.unpack_bits_np(packed_personal, (kept_scores.size,), bool)
      personal.append(bitpack.pack_bits_np(mine))
    return collections.OrderedDict(scores=tuple(scores), keep=tuple(keeps),
                                   personal=tuple(personal), rounds=np.int32(arrays["rounds"]))

  def encode_packed(self, state, client_id: str = "?") -> dict:
    """The arrays (with their checksum) that represent the wire-form ``state`` on disk."""
    arrays = {"rounds": np.asarray(state["rounds"], np.int32)}
    if len(state["scores"]) != len(self.shapes):
      raise ValueError(f"state has {len(state['scores'])} masks, the store expects {len(self.shapes)}")
    for i, (s, k, p) in enumerate(zip(state["scores"], state["keep"], state["personal"])):
      s, k, p = np.asarray(s, np.float32), np.asarray(k), np.asarray(p)
      n, nbytes = int(np.prod(self.shapes[i])), bitpack.packed_size_bytes(int(np.prod(self.shapes[i])))
      if s.shape != self.shapes[i] or k.shape != (nbytes,) or p.shape != (nbytes,):
        raise ValueError(f"mask {i}: scores {s.shape}, packed keep {k.shape} and personal "
                         f"{p.shape}; expected {self.shapes[i]} and ({nbytes},)")
      if not np.all(np.isfinite(s)):
        raise ValueError(f"client {client_id}: mask {i} has non-finite scores")
      keep = bitpack.unpack_bits_np(k.astype(np.uint8), (n,), bool)
      arrays[f"keep_{i}"] = bitpack.pack_bits_np(keep)
      arrays[f"scores_{i}"] = s.reshape(-1)[keep]
      arrays[f"personal_{i}"] = bitpack.pack_bits_np(bitpack.unpack_bits_np(p.astype(np.uint8), (n,), bool)[keep])
    return _sealed(arrays, client_id, self.owner, self.round_num)



class PackedStateStore(ClientStateStore):
  """The files of :class:`ClientStateStore`, read and written in FedMask's *wire form*:
  ``OrderedDict(scores=(float32 S_i...), keep=(uint8 [ceil(n_i/8)]...), personal=(uint8
  [ceil(n_i/8)]...), rounds=int32)``, the masks bit-packed over all ``n_i`` elements
  (:mod:`fedmask_tff.wire.bitpack`), as the process takes them. A round's states never exist
  at full size in the driver (4.25 bytes a mask element, not 12); the files are byte for byte
  those of :class:`ClientStateStore`.
  """

  def decode(self, arrays: dict, where: str = "client state"):
    return self.decode_packed(arrays, where)

  def encode(self, state, client_id: str = "?") -> dict:
    return self.encode_packed(state, client_id)


def _sealed(arrays: dict, client_id: str, owner, round_num: int) -> dict:
  """``arrays`` with the state's identity and the checksum of everything."""
  arrays["client_id"] = np.array(str(client_id))
  arrays["run_id"] = np.array(owner or "")
  arrays["written_after_round"] = np.asarray(round_num, np.int64)
  arrays["sha256"] = np.array(digest(arrays))
  return arrays


def _checked(arrays: dict, path: str, strip_identity: bool = True) -> dict:
  """``arrays`` without its ``sha256`` entry (and, with ``strip_identity``, without the
  identity entries), after checking the checksum."""
  arrays = dict(arrays)
  stored = str(arrays.pop("sha256", np.array("")))
  if stored != digest(arrays):
    raise ClientStateError(f"client state file {path} fails its checksum (corrupt, truncated or "
                           "edited)")
  if strip_identity:
    for key in IDENTITY_KEYS:
      arrays.pop(key, None)
  return arrays


def _read_npz(path: str) -> dict:
  try:
    with np.load(path, allow_pickle=False) as f:
      return {k: f[k] for k in f.files}
  except Exception as e:  # zipfile.BadZipFile, ValueError, OSError, EOFError ...
    raise ClientStateError(f"client state file {path} is unreadable: {e}") from e


def _write_npz_atomic(directory: str, client_id: str, path: str, arrays: dict) -> int:
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  tmp = os.path.join(directory, f".{client_id}.npz.tmp")
  write_file_atomic(tmp, path, buf.getvalue())
  return len(buf.getvalue())


def write_file_atomic(tmp: str, path: str, data: bytes) -> None:
  """Writes ``data`` to ``tmp``, ``fsync``s it and renames it to ``path``: ``path`` holds its
  old bytes or the new ones, never a part. A failed write (a full disk) removes ``tmp``."""
  try:
    with open(tmp, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    try:
      os.remove(tmp)
    except OSError:
      pass
    raise


class ArrayStateStore(ClientStateStore):
  """Client states that are any nested structure of arrays (the baselines' local weights).

  A state is a structure (``OrderedDict``/tuple/list) of numpy arrays of fixed
  shapes and dtypes, the same structure as ``initial_state_fn()`` returns. On
  disk: one ``.npz`` per client with the flattened leaves ``leaf_i`` and a
  SHA-256 checksum, written atomically like :class:`ClientStateStore`.
  """

  def __init__(self, directory: str, initial_state_fn: Callable):
    import tensorflow as tf  # tf.nest only
    self._nest = tf.nest
    self.directory = directory
    self._initial_state_fn = initial_state_fn
    template = initial_state_fn()
    self._template = template
    self._leaves = [np.asarray(x) for x in self._nest.flatten(template)]
    self.shapes = [x.shape for x in self._leaves]
    os.makedirs(directory, exist_ok=True)

  def decode(self, arrays: dict, where: str = "client state"):
    """The state that :meth:`encode` made ``arrays`` from (checksum checked)."""
    arrays, path = _checked(arrays, where), where
    leaves = []
    for i, ref in enumerate(self._leaves):
      a = arrays.get(f"leaf_{i}")
      if a is None or a.shape != ref.shape or a.dtype != ref.dtype:
        raise ClientStateError(f"client state file {path}: leaf {i} is missing or not "
                               f"{ref.dtype}{list(ref.shape)} (another model?)")
      leaves.append(a)
    if len(arrays) != len(self._leaves):
      raise ClientStateError(f"client state file {path} has {len(arrays)} arrays, "
                             f"the model needs {len(self._leaves)}")
    return self._nest.pack_sequence_as(self._template, leaves)

  def encode(self, state, client_id: str = "?") -> dict:
    """The arrays (with their identity and checksum) that represent ``state`` on disk."""
    leaves = [np.asarray(x) for x in self._nest.flatten(state)]
    if len(leaves) != len(self._leaves):
      raise ValueError(f"state has {len(leaves)} arrays, the store expects {len(self._leaves)}")
    arrays = {}
    for i, (a, ref) in enumerate(zip(leaves, self._leaves)):
      if a.shape != ref.shape:
        raise ValueError(f"client {client_id}: leaf {i} has shape {a.shape}, expected {ref.shape}")
      a = a.astype(ref.dtype, copy=False)
      if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
        raise ValueError(f"client {client_id}: leaf {i} has non-finite values")
      arrays[f"leaf_{i}"] = a
    return _sealed(arrays, client_id, self.owner, self.round_num)
