"""The transport/storage form of a personalized model: architecture + seed + packed masks.

A FedMask client's model is W * m with W rebuilt from a seed, so all a device
needs to store or receive is the architecture, the seed and the client's
binary masks, 1 bit per element (8 per byte, :mod:`fedmask_tff.wire.bitpack` order).

File layout (``.fmpk``)::

    b"FMPK" | version: uint8 | header length: uint32 LE | header: UTF-8 JSON | payload

The JSON header holds ``architecture`` (:class:`tflite.runs.Architecture`),
``masks`` (name, shape, byte offset and length of each packed mask in the
uncompressed payload), ``codec`` (``"raw"`` or ``"zlib"``: the payload is
stored zlib-compressed when that is smaller, as for the pruned classifier's
mostly-zero masks) and ``sha256`` of the uncompressed payload. The loader
checks all of it and raises :class:`~tflite.runs.ArtifactError` naming the
file on any mismatch.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib

import numpy as np
import tensorflow as tf

from fedmask_tff.wire import bitpack
from tflite.runs import Architecture, ArtifactError, masked_model_with_masks

MAGIC = b"FMPK"
VERSION = 1


def encode(arch: Architecture, names, masks) -> bytes:
  payload, entries = bytearray(), []
  for name, m in zip(names, masks):
    m = np.asarray(m)
    packed = bitpack.pack_bits_np(m).tobytes()
    entries.append({"name": name, "shape": list(m.shape), "offset": len(payload),
                    "nbytes": len(packed)})
    payload += packed
  payload = bytes(payload)
  compressed = zlib.compress(payload, 9)
  codec = "zlib" if len(compressed) < len(payload) else "raw"
  header = json.dumps({"format": "fedmask-packed", "version": VERSION,
                       "architecture": arch.to_json(), "masks": entries, "codec": codec,
                       "payload_bytes": len(payload),
                       "sha256": hashlib.sha256(payload).hexdigest()},
                      separators=(",", ":")).encode()
  body = compressed if codec == "zlib" else payload
  return MAGIC + struct.pack("<BI", VERSION, len(header)) + header + body


def save(path: str, arch: Architecture, names, masks) -> int:
  data = encode(arch, names, masks)
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)
  return len(data)


def load(path: str) -> tuple[Architecture, list[str], list[np.ndarray]]:
  """``(architecture, mask names, masks)`` from a ``.fmpk`` file (masks float32 0/1)."""
  if not os.path.isfile(path):
    raise ArtifactError(f"packed model {path} is missing")
  with open(path, "rb") as f:
    data = f.read()

  def bad(why):
    return ArtifactError(f"packed model {path} is corrupt or not a FedMask packed model: {why}")

  if len(data) < 9 or data[:4] != MAGIC:
    raise bad("wrong magic bytes")
  version, hlen = struct.unpack("<BI", data[4:9])
  if version != VERSION:
    raise bad(f"unsupported version {version}")
  try:
    header = json.loads(data[9:9 + hlen].decode())
    arch = Architecture.from_json(header["architecture"])
    body = data[9 + hlen:]
    payload = zlib.decompress(body) if header["codec"] == "zlib" else body
  except (ValueError, KeyError, TypeError, UnicodeDecodeError, zlib.error) as e:
    raise bad(f"unreadable header or payload ({e})") from None
  if len(payload) != header.get("payload_bytes") or \
      hashlib.sha256(payload).hexdigest() != header.get("sha256"):
    raise bad("payload checksum mismatch")
  names, masks = [], []
  buf = np.frombuffer(payload, np.uint8)
  try:
    for e in header["masks"]:
      chunk = buf[int(e["offset"]):int(e["offset"]) + int(e["nbytes"])]
      masks.append(bitpack.unpack_bits_np(chunk, tuple(e["shape"])))
      names.append(str(e["name"]))
  except (KeyError, ValueError) as e:
    raise bad(f"mask table does not match the payload ({e})") from None
  return arch, names, masks


def load_model(path: str) -> tf.keras.Model:
  """The exact Keras masked model (frozen W from the seed, the stored masks)."""
  arch, _, masks = load(path)
  return masked_model_with_masks(arch, masks)
