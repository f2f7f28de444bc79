"""How FedMask's client states cross the TFF boundary, and its TF computations in two forms.

``make_wire(...)``: the argument and result *forms* of a client state (its wire form in TFF's
values, or the path of a file holding it), as a :class:`Wire`; ``computations(wire, body, ...)``:
one TF body as the ``(logical, federated)`` pair of computations (full-size tensors for tests
and the driver; the wire form for the federated computations). Part of
:mod:`fedmask_tff.algorithms.fedmask.process`, whose builder passes each factory its arguments.
"""

from __future__ import annotations

import collections
from typing import Callable, NamedTuple

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from fedmask_tff.wire import bitpack, state_files


class Wire(NamedTuple):
  """How client states cross the TFF boundary (:func:`make_wire` builds it).

  forms: ``{form: (tff_type, unpack)}`` for the forms ``"state"``, ``"keep"`` and ``"masks"``:
    the TFF type an argument in that form has, and the TF function that turns it into
    full-size tensors. result: ``(arg, state) -> value``: a client state returned in the form
    states travel in (``arg``: the state argument it came from). files: whether states travel
    as paths of files.
  """
  forms: dict
  result: Callable
  files: bool


def make_wire(specs, client_states, packed_masks_type, wire_state_type, wire_state_spec) -> Wire:
  """How client states cross the TFF boundary, as argument and result *forms* for
  :func:`computations`.

  The state's *wire form*: the scores as they are (float32), the pruning mask ``keep`` and the
  ``personal`` mask bit-packed (uint8 ``[ceil(n/8)]`` per weight,
  :mod:`fedmask_tff.wire.bitpack`); 4.25 bytes a mask element instead of 12, exact (both masks
  are 0/1). ``FedMaskProcess.pack_state`` and ``unpack_state`` are the numpy side.

  * ``"messages"``: the wire form travels in TFF's values.
  * ``"files"``: a client's state in TFF's values is the path of a file holding its wire form
    (:mod:`fedmask_tff.wire.state_files`); a computation reads it there and writes the state
    it returns next to it, returning the new path.

  Forms: ``"state"`` (a client state), ``"keep"`` (the pruning masks of a trained state:
  packed masks, or with files the state's path) and ``"masks"`` (packed 0/1 masks).

  Args:
    specs: the model's masked weights (``process.MaskSpec``), in order.
    client_states: ``"messages"`` or ``"files"``, as above.
    packed_masks_type: TFF type of the bit-packed masks, uint8 ``[ceil(n/8)]`` per weight.
    wire_state_type: TFF type of a client state in its wire form.
    wire_state_spec: the same as ``tf.TensorSpec`` s (the template of a state file).
  """

  def unpack_masks(packed):
    return tuple(tf.reshape(bitpack.unpack_bits_tf(p, s.size), s.shape) for p, s in zip(packed, specs))

  def pack_masks(masks):
    return tuple(tf.reshape(bitpack.pack_bits_tf(m), [bitpack.packed_size_bytes(s.size)])
                 for m, s in zip(masks, specs))

  def from_wire(state):
    return collections.OrderedDict(scores=state["scores"], keep=unpack_masks(state["keep"]),
                                   personal=unpack_masks(state["personal"]), rounds=state["rounds"])

  def to_wire(state):
    return collections.OrderedDict(scores=state["scores"], keep=pack_masks(state["keep"]),
                                   personal=pack_masks(state["personal"]), rounds=state["rounds"])

  masks = (packed_masks_type, unpack_masks)
  if client_states == "files":
    path_type, template = tff.TensorType(np.str_), wire_state_spec
    forms = {"state": (path_type, lambda p: from_wire(state_files.read_tf(p, template))),
             "keep": (path_type, lambda p: unpack_masks(state_files.read_tf(p, template)["keep"])),
             "masks": masks}
    result = lambda arg, state: state_files.write_next_tf(arg, to_wire(state))
  else:
    forms = {"state": (wire_state_type, from_wire), "keep": masks, "masks": masks}
    result = lambda arg, state: to_wire(state)
  return Wire(forms=forms, result=result, files=client_states == "files")


def computations(wire: Wire, body, arg_types, forms: dict, result: str | None = None):
  """``body`` as two TF computations ``(logical, federated)``, client states in ``wire``'s forms.

  ``logical`` takes ``arg_types`` (tests and the driver call it). ``federated`` is what the
  federated computations run: the argument at each position ``i`` of ``forms`` (``{i: form}``,
  see :func:`make_wire`) arrives in that form and ``body`` sees it unpacked (full-size
  tensors); ``result`` ``"state"`` (the whole result is a client state) or ``"first"`` (its
  first element is) returns that state in the form the process's states travel in, written
  next to the state argument's file when states are files. A client's state is unpacked and
  packed inside its own computation, so its full-size masks live only there.
  """
  logical = tff.tensorflow.computation(body, *arg_types)
  wire_types = [wire.forms[forms[i]][0] if i in forms else t for i, t in enumerate(arg_types)]
  state_at = next((i for i, f in forms.items() if f == "state"), None)

  def call(args):
    out = body(*[wire.forms[forms[i]][1](a) if i in forms else a for i, a in enumerate(args)])
    if result == "state":
      return wire.result(args[state_at], out)
    if result == "first":
      return (wire.result(args[state_at], out[0]),) + tuple(out[1:])
    return out

  if len(arg_types) == 2:  # TFF takes no *args: one function per arity.
    def federated(a, b):
      return call([a, b])
  else:
    def federated(a, b, c):
      return call([a, b, c])
  return logical, tff.tensorflow.computation(federated, *wire_types)
