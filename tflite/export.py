"""Exports a client's personalized FedMask model in every deployable form.

``python -m tflite.export --run_dir=DIR [--client_id=ID|all]`` writes, per client,
``DIR/tflite/<client_id>/``:

* ``model.fmpk``: the transport/storage form (architecture, seed, packed masks;
  :mod:`tflite.packed`), reloaded bit-exactly by ``tflite.packed.load_model``;
* ``folded_float32.tflite``: W * m folded into float32 weights;
* ``packed_runtime.tflite``: masks (and the signed-constant W) packed in the
  model, unpacked at run time with builtin ops;
* ``compacted_float32.tflite``: hidden filters/neurons that are dead or unused
  removed (exact), so the dense model is physically smaller;
* ``compacted_sparse_float32.tflite``: the compacted model with TFLite's sparse-weight
  encoding of its zeros (the converter's ``EXPERIMENTAL_SPARSITY``), densified at load;
* ``compacted_int8.tflite``: the compacted model, full-integer int8
  (float32 input/output);
* ``structured_demo_float32.tflite``: **not the client's trained model**: its
  masks with the weakest-norm ``--structured_fraction`` of each hidden layer's
  filters/neurons zeroed, then compacted; it shows the speed that whole-group
  sparsity (the paper's structured regularizer) buys.

and once per run ``DIR/tflite/baselines/``: ``dense_float32.tflite`` (the dense
model of the same architecture) and ``bnn.tflite`` (its binarized version,
signs folded into float32 weights; ``bnn.signs`` is its 1-bit packed storage
form). Every ``.tflite`` uses builtin ops only. Beside every file, ``NAME.sha256.json`` records
its SHA-256, variant, dtypes and shapes (:mod:`tflite.artifacts`). Errors (missing run, client or
file; corrupt state) print ``error: ...`` naming the file and exit with code 2.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads
import json
import sys
import time
from typing import Optional

import numpy as np
import tensorflow as tf

from fedmask_tff.wire import bitpack
from tflite import artifacts, convert, graph, packed
from tflite.runs import (ArtifactError, RunInfo, client_ids, load_client_masks, load_run,
                         masked_model_with_masks)

CLIENT_VARIANTS = ("folded_float32", "packed_runtime", "compacted_float32",
                   "compacted_sparse_float32", "compacted_int8",
                   "structured_demo_float32")
BASELINES = ("dense_float32", "bnn")


def _log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def export_dir(run_dir: str) -> str:
  return os.path.join(run_dir, "tflite")


def export_client(info: RunInfo, client_id: str, out_dir: str, *,
                  calibration: Optional[np.ndarray] = None,
                  structured_fraction: float = 0.5, masks=None) -> dict:
  """Writes the client's artifacts into ``out_dir``; returns a manifest (paths and facts).

  ``calibration``: float32 examples for int8 calibration (without them the int8
  variant is skipped). ``masks``: override the stored masks (tests).
  """
  os.makedirs(out_dir, exist_ok=True)
  if masks is None:
    masks = load_client_masks(info, client_id)
  manifest = {"client_id": client_id, "run_dir": info.run_dir, "files": {}, "facts": {}}
  files, facts = manifest["files"], manifest["facts"]

  path = os.path.join(out_dir, "model.fmpk")
  packed.save(path, info.arch, info.names, masks)
  files["packed_transport"] = path

  model = masked_model_with_masks(info.arch, masks)
  ops, input_shape = graph.from_keras(model)
  facts["mask_density"] = float(sum(m.sum() for m in masks) / sum(m.size for m in masks))

  _log(f"[tflite] {client_id}: folded_float32")
  files["folded_float32"] = _write(out_dir, "folded_float32",
                                   convert.keras_to_tflite(graph.to_keras(ops, input_shape)))
  _log(f"[tflite] {client_id}: packed_runtime")
  files["packed_runtime"] = _write(out_dir, "packed_runtime",
                                   convert.packed_runtime_tflite(model, masks))
  compacted, stats = graph.compact(ops)
  facts["compaction"] = stats
  facts["weights_before_compaction"] = graph.weight_count(ops)
  facts["weights_after_compaction"] = graph.weight_count(compacted)
  _log(f"[tflite] {client_id}: compacted_float32 (removed {stats['removed_units']} units: "
       f"{stats['layers']})")
  compacted_keras = graph.to_keras(compacted, input_shape)
  files["compacted_float32"] = _write(out_dir, "compacted_float32",
                                      convert.keras_to_tflite(compacted_keras))
  _log(f"[tflite] {client_id}: compacted_sparse_float32 (TFLite's sparse-weight encoding)")
  files["compacted_sparse_float32"] = _write(out_dir, "compacted_sparse_float32",
                                             convert.keras_to_tflite(compacted_keras, sparse=True))
  if calibration is not None:
    _log(f"[tflite] {client_id}: compacted_int8 (calibrating on {len(calibration)} examples)")
    files["compacted_int8"] = _write(out_dir, "compacted_int8",
                                     convert.keras_to_tflite(compacted_keras, calibration))
  if structured_fraction > 0:
    demo_masks = graph.weakest_groups_zeroed(ops, masks, structured_fraction)
    demo_ops, _ = graph.from_keras(masked_model_with_masks(info.arch, demo_masks))
    demo_compacted, demo_stats = graph.compact(demo_ops)
    facts["structured_demo"] = {
        "fraction": structured_fraction, "compaction": demo_stats,
        "weights_after_compaction": graph.weight_count(demo_compacted),
        "what": (f"NOT the client's trained model: its masks with the {structured_fraction:.0%} "
                 "weakest-L2-norm filters/neurons of each hidden layer zeroed, then compacted")}
    _log(f"[tflite] {client_id}: structured_demo_float32 (removed "
         f"{demo_stats['removed_units']} units)")
    files["structured_demo_float32"] = _write(
        out_dir, "structured_demo_float32",
        convert.keras_to_tflite(graph.to_keras(demo_compacted, input_shape)))
    np.savez(os.path.join(out_dir, "structured_demo_masks.npz"),
             **{f"mask_{i}": bitpack.pack_bits_np(m) for i, m in enumerate(demo_masks)})
  write_model_info(info, out_dir, files)
  seal_all(info, out_dir, files)
  with open(os.path.join(out_dir, "manifest.json"), "w") as f:
    json.dump(manifest, f, indent=1)
  return manifest


def seal_all(info: RunInfo, out_dir: str, files: dict) -> None:
  """Writes the checksum sidecar (:mod:`tflite.artifacts`) of every file in ``files``
  (variant -> path) and of ``out_dir/model_info.json``."""
  for variant, path in files.items():
    artifacts.seal(path, variant, list(info.arch.input_shape), [info.arch.num_classes])
  artifacts.seal(os.path.join(out_dir, "model_info.json"), "model_info")


def write_model_info(info: RunInfo, out_dir: str, files: dict) -> str:
  """``model_info.json``: what an app needs beside the ``.tflite`` files (the sidecar of
  docs/tflite.md): the signature's names, the input's shape and preprocessing, the labels."""
  from tflite.runs import DEPLOYMENT
  dataset = info.config.get("dataset", "fashion_mnist")
  facts = DEPLOYMENT[dataset]
  payload = {
      "signature": convert.SIGNATURE_KEY,
      "input": {"name": convert.INPUT_NAME, "shape": [-1, *info.arch.input_shape],
                "dtype": "float32", **facts["input"]},
      "output": {"name": convert.OUTPUT_NAME, "shape": [-1, info.arch.num_classes],
                 "dtype": "float32",
                 "meaning": "unnormalized logits; the predicted class is the argmax"},
      "labels": facts["labels"][:info.arch.num_classes],
      "dataset": dataset,
      "models": {k: os.path.basename(v) for k, v in files.items() if v.endswith(".tflite")},
      "note": "every model takes and returns float32 (the int8 model quantizes inside)"}
  path = os.path.join(out_dir, "model_info.json")
  with open(path, "w") as f:
    json.dump(payload, f, indent=1)
  return path


def export_baselines(info: RunInfo, out_dir: str, dense_weights: Optional[str] = None,
                     bnn_weights: Optional[str] = None) -> dict:
  """``dense_float32.tflite`` and ``bnn.tflite`` (+ ``bnn.signs``) for the run's architecture."""
  from fedmask_tff.models import binarized
  os.makedirs(out_dir, exist_ok=True)
  manifest = {"files": {}, "facts": {}}
  dense = info.arch.build_dense()
  trained = False
  if dense_weights:
    if not os.path.exists(dense_weights):
      raise ArtifactError(f"dense weights file {dense_weights} is missing")
    dense.load_weights(dense_weights)
    trained = True
  manifest["facts"]["dense_trained"] = trained
  _log("[tflite] baselines: dense_float32")
  manifest["files"]["dense_float32"] = _write(out_dir, "dense_float32",
                                              convert.keras_to_tflite(dense))
  bnn = binarized.BINARY_MODEL_BUILDERS[info.arch.model](
      input_shape=info.arch.input_shape, num_classes=info.arch.num_classes,
      width=info.arch.width, seed=info.arch.seed)
  if bnn_weights:
    if not os.path.exists(bnn_weights):
      raise ArtifactError(f"BNN weights file {bnn_weights} is missing")
    bnn.load_weights(bnn_weights)
  manifest["facts"]["bnn_trained"] = bool(bnn_weights)
  ops, input_shape = graph.from_keras(bnn)
  _log("[tflite] baselines: bnn (signs folded into float32 weights)")
  manifest["files"]["bnn"] = _write(out_dir, "bnn",
                                    convert.keras_to_tflite(graph.to_keras(ops, input_shape)))
  signs_path = os.path.join(out_dir, "bnn.signs")
  with open(signs_path, "wb") as f:  # 1 bit per weight, 8 per byte; scales are fixed by shapes
    for layer in binarized.binary_layers(bnn):
      f.write(bitpack.pack_bits_np(binarized.sign_bits(layer.kernel).numpy()).tobytes())
  manifest["files"]["bnn_packed_storage"] = signs_path
  write_model_info(info, out_dir, manifest["files"])
  seal_all(info, out_dir, manifest["files"])
  with open(os.path.join(out_dir, "manifest.json"), "w") as f:
    json.dump(manifest, f, indent=1)
  return manifest


def _write(out_dir, name, data) -> str:
  path = os.path.join(out_dir, f"{name}.tflite")
  convert.write(path, data)
  return path


def resolve_clients(info: RunInfo, client_id: Optional[str]) -> list[str]:
  ids = client_ids(info)
  if client_id in (None, ""):
    return ids[:1]
  if client_id == "all":
    return ids
  return [client_id]


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m tflite.export", description=__doc__.split("\n")[0])
  p.add_argument("--verbose", action="store_true",
                 help="show TensorFlow's C++ log lines (silenced by default)")
  p.add_argument("--run_dir", required=True)
  p.add_argument("--client_id", default=None, help="a client id, or 'all' (default: the first)")
  p.add_argument("--structured_fraction", type=float, default=0.5)
  p.add_argument("--calibration_examples", type=int, default=200)
  args = p.parse_args(argv)
  if not 0 <= args.structured_fraction < 1 or args.calibration_examples < 1:
    print("error: --structured_fraction must be in [0, 1) and --calibration_examples >= 1, got "
          f"{args.structured_fraction} and {args.calibration_examples}", file=sys.stderr)
    return 2
  try:
    info = load_run(args.run_dir)
    from tflite.runs import load_client_calibration_data, dataset_to_numpy
    for cid in resolve_clients(info, args.client_id):
      masks = load_client_masks(info, cid)  # the state first: a missing/corrupt one fails fast
      calib, _ = dataset_to_numpy(load_client_calibration_data(args.run_dir, cid),
                                  args.calibration_examples)
      t = time.time()
      m = export_client(info, cid, os.path.join(export_dir(args.run_dir), cid), calibration=calib,
                        structured_fraction=args.structured_fraction, masks=masks)
      for k, v in m["files"].items():
        print(f"{cid}\t{k}\t{os.path.getsize(v)}\t{v}")
      _log(f"[tflite] {cid} exported in {time.time() - t:.1f} s")
    export_baselines(info, os.path.join(export_dir(args.run_dir), "baselines"))
  except ArtifactError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
