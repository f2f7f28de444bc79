"""Client states as files that TF computations read and write where the work runs.

TFF keeps no client state, so by default each sampled client's state crosses the TFF
boundary twice a round inside the executor's messages; TFF's worker then holds several copies
of every state of the round (request, tensors, results, gRPC buffers: measured ~75 MB per
HAR client whose state is 7.25 MB). With states as files, a round's TFF values
carry only a path per client: the client's computation reads its state from the file and
writes its new state to a new file, so the worker holds at most the states of the
computations running at that moment.

**Format.** One file per state: ``tf.io.serialize_tensor`` of a 1-D string tensor whose
element ``i`` is ``tf.io.serialize_tensor`` of the state's ``i``-th leaf (``tf.nest`` order).
TF computations read and write it (:func:`read_tf`, :func:`write_next_tf`); the driver reads
and writes the same bytes with numpy in and out (:class:`StateExchange`). Every leaf's dtype
and shape is checked against a template state on both sides.

**Paths.** A computation that returns a new state writes it next to the state it read, at
``path + "+"`` (:func:`next_path_tf`), and returns that path: the file it read is never
overwritten, so a computation that TFF runs again (a worker restarted mid-round) reads the
same input. The driver removes a call's files when the call ends.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import shutil
import tempfile
import weakref

import numpy as np
import tensorflow as tf

from fedmask_tff.wire.client_state import ClientStateError


def _leaf_specs(template) -> list[tuple[tf.DType, tuple]]:
  """``(dtype, shape)`` of each leaf of ``template`` (arrays or ``tf.TensorSpec``s)."""
  return [(x.dtype, tuple(x.shape)) if isinstance(x, tf.TensorSpec)
          else (tf.as_dtype(np.asarray(x).dtype), tuple(np.shape(x))) for x in tf.nest.flatten(template)]


def next_path_tf(path: tf.Tensor) -> tf.Tensor:
  """Where a computation writes the state that follows the one at ``path`` (tf.string)."""
  return path + "+"


def read_tf(path: tf.Tensor, template):
  """The state in the file at ``path`` (a tf.string scalar), inside a TF computation:
  ``template``'s structure, each leaf checked to its dtype and shape."""
  specs = _leaf_specs(template)
  parts = tf.io.parse_tensor(tf.io.read_file(path), tf.string)
  check = tf.debugging.assert_equal(tf.size(parts), len(specs),
                                    message="client state file: wrong number of arrays")
  with tf.control_dependencies([check]):
    leaves = [tf.ensure_shape(tf.io.parse_tensor(parts[i], dtype), shape)
              for i, (dtype, shape) in enumerate(specs)]
  return tf.nest.pack_sequence_as(template, leaves)


def write_next_tf(path: tf.Tensor, state) -> tf.Tensor:
  """Writes ``state`` (tensors) to ``next_path_tf(path)`` inside a TF computation; returns
  that path, computed after the write (so whoever receives it can read the file)."""
  data = tf.io.serialize_tensor(tf.stack([tf.io.serialize_tensor(x) for x in tf.nest.flatten(state)]))
  new_path = next_path_tf(path)
  write = tf.io.write_file(new_path, data)
  with tf.control_dependencies([write]):
    return tf.identity(new_path)


def encode_np(state) -> bytes:
  """The file's bytes for ``state`` (numpy leaves), the same as :func:`write_next_tf` writes."""
  parts = [tf.io.serialize_tensor(np.asarray(x)) for x in tf.nest.flatten(state)]
  return tf.io.serialize_tensor(tf.stack(parts)).numpy()


def decode_np(data: bytes, template, where: str = "client state file"):
  """The state (numpy leaves, ``template``'s structure) that ``data`` holds; a clear
  :class:`ClientStateError` when it is not one of ``template``'s shape."""
  specs = _leaf_specs(template)
  try:
    parts = tf.io.parse_tensor(data, tf.string).numpy()
  except (tf.errors.OpError, ValueError) as e:
    raise ClientStateError(f"{where} is not a client state file: {e}") from None
  if parts.shape != (len(specs),):
    raise ClientStateError(f"{where} holds {parts.size} arrays, the model's state has {len(specs)}")
  leaves = []
  for i, (part, (dtype, shape)) in enumerate(zip(parts, specs)):
    try:
      leaf = tf.io.parse_tensor(part, dtype).numpy()
    except (tf.errors.OpError, ValueError):
      leaf = None
    if leaf is None or leaf.shape != shape:
      raise ClientStateError(f"{where}: array {i} is not {dtype.name}{list(shape)} (another model?)")
    leaves.append(leaf)
  return tf.nest.pack_sequence_as(template, leaves)


class StateExchange:
  """The driver's side: a directory of state files for TF computations to read and write.

  ``with exchange.call(states) as (paths, read):`` writes each state to its own file and gives
  their paths (pass them to the computation as the clients' states); ``read(returned_paths)``
  reads the states the computation wrote. The call's files are removed when the block ends.

  Args:
    directory: where the files go (created; files left by an earlier process are removed).
      ``None``: a temporary directory, removed with this object. The worker must be able to
      read and write it at the same path.
    template: a state (numpy leaves): the structure, dtypes and shapes every file has.
  """

  def __init__(self, directory: str | None, template):
    if directory is None:
      directory = tempfile.mkdtemp(prefix="fedmask_states_")
      weakref.finalize(self, shutil.rmtree, directory, True)
    else:
      shutil.rmtree(directory, ignore_errors=True)
      os.makedirs(directory)
    self.directory = os.path.abspath(directory)
    self.template = template
    self._calls = itertools.count()

  def write(self, state, path: str) -> None:
    data = encode_np(state)
    with open(path, "wb") as f:
      f.write(data)

  def read(self, path) -> object:
    path = path.decode() if isinstance(path, bytes) else str(path)
    if not path.startswith(self.directory + os.sep):
      raise ClientStateError(f"a computation returned the state path {path!r}, outside "
                             f"{self.directory}")
    try:
      with open(path, "rb") as f:
        data = f.read()
    except OSError as e:
      raise ClientStateError(f"client state file {path} was not written: {e}") from None
    return decode_np(data, self.template, f"client state file {path}")

  @contextlib.contextmanager
  def call(self, states: list):
    """Writes ``states``; yields ``(paths, read)``; removes the call's files afterwards."""
    prefix = os.path.join(self.directory, f"{next(self._calls)}.")
    try:
      paths = []
      for i, state in enumerate(states):
        paths.append(f"{prefix}{i}")
        self.write(state, paths[-1])
      yield paths, lambda returned: [self.read(p) for p in returned]
    finally:
      for path in glob.glob(glob.escape(prefix) + "*"):
        os.remove(path)
