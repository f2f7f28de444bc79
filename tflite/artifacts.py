"""Checksums of exported artifacts: each file's SHA-256, variant, dtypes and shapes beside it.

``tflite.export`` and ``tflite.evaluate`` write, next to every artifact ``NAME`` (each
``.tflite``, ``model.fmpk``, ``bnn.signs``, ``reference.npz``, ``model_info.json``), a sidecar
``NAME.sha256.json``::

    {"file": "compacted_float32.tflite", "variant": "compacted_float32",
     "sha256": "<64 hex digits>", "size_bytes": 12345, "weights": "float32",
     "input": {"dtype": "float32", "shape": [-1, 28, 28, 1]},
     "output": {"dtype": "float32", "shape": [-1, 10]}}

:func:`verify` refuses a file whose bytes do not hash to the recorded SHA-256 (a flipped byte,
a truncated file, another file copied over it), whose sidecar is missing or unreadable, or whose
sidecar names another file or variant than the one expected. Standard library only: the
LiteRT check (:mod:`tflite.check_runtime`) runs without TensorFlow or this package's library.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

SUFFIX = ".sha256.json"


class ArtifactMismatch(RuntimeError):
  """An artifact that is not what its sidecar records (the message names the file)."""


def sha256_file(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def weights_dtype(variant: str) -> str:
  """The dtype of a variant's stored weights, by its name."""
  if "int8" in variant:
    return "int8"
  if variant in ("packed_transport", "bnn_packed_storage"):
    return "1-bit packed"
  return "float32"


def seal(path: str, variant: str, input_shape: Optional[list] = None,
         output_shape: Optional[list] = None) -> str:
  """Writes ``path``'s sidecar (SHA-256, size in bytes, variant, weights dtype, and the float32
  input/output shapes of a model, ``-1`` for the batch); returns the sidecar's path."""
  record = {"file": os.path.basename(path), "variant": variant, "sha256": sha256_file(path),
            "size_bytes": os.path.getsize(path), "weights": weights_dtype(variant)}
  if input_shape is not None:
    record["input"] = {"dtype": "float32", "shape": [-1, *input_shape]}
  if output_shape is not None:
    record["output"] = {"dtype": "float32", "shape": [-1, *output_shape]}
  sidecar = path + SUFFIX
  tmp = sidecar + ".tmp"
  with open(tmp, "w") as f:
    json.dump(record, f, indent=1)
  os.replace(tmp, sidecar)
  return sidecar


def verify(path: str, variant: Optional[str] = None) -> dict:
  """Checks ``path`` against its sidecar; returns the sidecar's record.

  Raises:
    ArtifactMismatch: a missing file or sidecar, a checksum that differs, or a sidecar of
      another file or variant than ``variant`` (when given).
  """
  again = "export it again with `python -m tflite.evaluate --run_dir=...`"
  if not os.path.isfile(path):
    raise ArtifactMismatch(f"{path} is missing ({again})")
  sidecar = path + SUFFIX
  try:
    with open(sidecar) as f:
      record = json.load(f)
    recorded = record["sha256"]
  except FileNotFoundError:
    raise ArtifactMismatch(f"{path} has no checksum file {os.path.basename(sidecar)}; "
                           f"{again}") from None
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ArtifactMismatch(f"{sidecar} is unreadable ({e}); {again}") from None
  if record.get("file") != os.path.basename(path):
    raise ArtifactMismatch(f"{sidecar} is the checksum file of {record.get('file')!r}, not of "
                           f"{os.path.basename(path)}; {again}")
  if variant is not None and record.get("variant") != variant:
    raise ArtifactMismatch(f"{path} is recorded as variant {record.get('variant')!r}, expected "
                           f"{variant!r}; {again}")
  actual = sha256_file(path)
  if actual != recorded:
    raise ArtifactMismatch(f"{path} does not match its recorded SHA-256 (corrupt, truncated, or "
                           f"another file copied over it: {actual[:12]}... is not "
                           f"{recorded[:12]}...); {again}")
  return record
