"""Exports every variant of a client's personalized model and measures them on the TFLite runtime.

``python -m tflite.evaluate --run_dir=DIR [--client_id=ID|all]`` (after
``python -m experiments.run --output_dir=DIR``) exports (see :mod:`tflite.export`),
then measures each variant against the dense model of the same architecture
(``dense_float32``) and the binarized one (``bnn``): file size, batch-1 latency
(1 and 2 threads, XNNPACK on, interleaved side by side), interpreter peak
memory (fresh process per variant), accuracy on the client's own test data,
agreement with the Keras model, and an **energy estimate** (:mod:`tflite.energy`).

Writes ``DIR/tflite/report.json`` (a list, one entry per variant and client),
``report.csv`` and ``report.md`` (the paper's Table 5 shape plus latency and
energy columns and the ratios to the dense model), and prints the table.
A missing or corrupt artifact prints ``error: ...`` naming the file; exit code 2.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads
import csv
import json
import sys
import time

import numpy as np

from tflite import artifacts, energy, export, measure, packed
from tflite.runs import (ArtifactError, dataset_to_numpy, load_client_calibration_data,
                         load_client_masks,
                         load_client_test_data, load_run, masked_model_with_masks)

DESCRIPTIONS = {
    "packed_transport": "storage/transport form: seed + architecture + masks, 1 bit each (not runnable; accuracy = the Keras model rebuilt from it)",
    "folded_float32": "W*m folded into float32 weights",
    "packed_runtime": "masks (and +-scale W signs) packed 8/byte inside the .tflite, unpacked every invocation",
    "compacted_float32": "dead/unused filters and neurons removed (exact), float32",
    "compacted_sparse_float32": "compacted, float32 weights in TFLite's sparse encoding (the converter's EXPERIMENTAL_SPARSITY; densified at load)",
    "compacted_int8": "compacted, full-integer int8 (float32 in/out)",
    "structured_demo_float32": "NOT the client's model: its masks with the weakest 50% filters/neurons per hidden layer zeroed, compacted (what structured sparsity buys)",
    "dense_float32": "dense model of the same architecture (FedAvg's model)",
    "bnn": "binarized model (BNN-FedAvg's), signs folded into float32 weights",
}
FIELDS = ["client_id", "variant", "size_bytes", "size_ratio_vs_dense", "latency_ms_median",
          "latency_ms_p10", "latency_ms_p90", "latency_ms_median_2threads", "speedup_vs_dense",
          "speedup_vs_dense_2threads", "peak_memory_bytes", "accuracy", "same_class_as_keras",
          "max_abs_diff_vs_keras", "energy_mj_estimate", "energy_ratio_vs_dense_estimate",
          "macs", "default", "latency_runtime", "file"]


def latency_runtime() -> str:
  """The runtime this report's latencies were measured with."""
  import tensorflow as tf
  return f"tf.lite.Interpreter of TensorFlow {tf.__version__} (XNNPACK on)"


def _log(msg):
  print(msg, file=sys.stderr, flush=True)


def _choose_default(rows):
  """Fastest (1 thread) runnable variant of the client's own model whose predicted class equals
  the Keras model's on every test example; ties broken by size."""
  ok = [r for r in rows if r["variant"] in export.CLIENT_VARIANTS
        and r["variant"] != "structured_demo_float32" and r.get("same_class_as_keras") == 1.0
        and r.get("latency_ms_median") is not None]
  if not ok:
    return None
  return min(ok, key=lambda r: (round(r["latency_ms_median"], 2), r["size_bytes"]))["variant"]


def _keras_references(info, files, out_dir, x, y):
  """The Keras logits the TFLite variants are compared with; saves them to ``reference.npz``.

  Returns ``(ref, demo_ref)``: float32 logits [n, num_classes] on the test inputs ``x`` of the
  client's model rebuilt *from the packed file* (round trip), and of the structured demo (None
  when there is no ``structured_demo_float32`` variant). ``reference.npz`` (``x``, ``y``, the
  logits) is what ``python -m tflite.check_runtime`` compares the phone's runtime (LiteRT) with.
  """
  keras_model = packed.load_model(files["packed_transport"])
  ref = keras_model.predict(x, batch_size=256, verbose=0)
  demo_ref = None
  if "structured_demo_float32" in files:
    from fedmask_tff.wire import bitpack
    with np.load(os.path.join(out_dir, "structured_demo_masks.npz")) as f:
      demo_masks = [bitpack.unpack_bits_np(f[f"mask_{i}"], s) for i, s in enumerate(info.shapes)]
    demo_ref = masked_model_with_masks(info.arch, demo_masks).predict(x, batch_size=256, verbose=0)
  np.savez_compressed(os.path.join(out_dir, "reference.npz"), x=x, y=y, keras_logits=ref,
                      **({"keras_logits_structured_demo": demo_ref} if demo_ref is not None else {}))
  artifacts.seal(os.path.join(out_dir, "reference.npz"), "reference")
  return ref, demo_ref


def _tflite_files(files, baselines) -> dict:
  """Variant name -> ``.tflite`` path: the client's runnable variants, then the baselines'."""
  tfl = {k: v for k, v in files.items() if v.endswith(".tflite")}
  tfl.update(baselines["files"])
  return {k: v for k, v in tfl.items() if v.endswith(".tflite")}


def _quality(tfl, cid, x, y, ref, demo_ref) -> dict:
  """Variant name -> accuracy and agreement with the Keras logits (``measure.accuracy_and_parity``).

  The agreement fields are None for the dense and BNN baselines (other models: agreement with
  FedMask is meaningless); the structured demo is compared with ``demo_ref``.
  """
  _log(f"[tflite] {cid}: accuracy and parity on {len(y)} test examples")
  quality = {}
  for name, path in tfl.items():
    reference = demo_ref if name == "structured_demo_float32" else ref
    quality[name] = measure.accuracy_and_parity(path, x, y, reference)
    if name in ("dense_float32", "bnn"):
      quality[name]["same_class_as_keras"] = None
      quality[name]["max_abs_diff_vs_keras"] = None
  return quality


def _latencies(tfl, cid, args, x) -> dict:
  """Thread count -> variant name -> batch-1 latency stats in ms (``median``, ``p10``, ``p90``)."""
  lat = {}
  for threads in args.threads:
    _log(f"[tflite] {cid}: latency, {threads} thread(s), {len(tfl)} models side by side, "
         f"{args.runs} runs each after {args.warmup} warm-up")
    lat[threads] = measure.latency_side_by_side(tfl, threads=threads, warmup=args.warmup,
                                                runs=args.runs, x=x[0])
  return lat


def _peak_memories(tfl, cid, args) -> dict:
  """Variant name -> ``measure.peak_memory`` (bytes, fresh process); empty with --skip_memory."""
  mem = {}
  if not args.skip_memory:
    for name, path in tfl.items():
      _log(f"[tflite] {cid}: peak memory of {name} (fresh process)")
      mem[name] = measure.peak_memory(path, 1)
  return mem


def _transport_row(cid, files, ref, y) -> dict:
  """The row of ``packed_transport`` (not runnable: accuracy = the Keras model rebuilt from it)."""
  keras_acc = float((ref.argmax(-1) == y).mean())
  return {"client_id": cid, "variant": "packed_transport",
          "size_bytes": os.path.getsize(files["packed_transport"]),
          "latency_ms_median": None, "peak_memory_bytes": None, "accuracy": keras_acc,
          "energy_mj_estimate": None, "file": files["packed_transport"]}


def _tflite_row(cid, name, path, args, quality, lat, mem) -> dict:
  """The row of one ``.tflite`` variant: size (bytes), latency (ms), memory, quality, energy (mJ).

  ``quality`` is this variant's ``_quality`` entry, ``lat`` and ``mem`` are ``_latencies`` and
  ``_peak_memories`` of all variants.
  """
  e = energy.estimate(path)
  t1 = lat[args.threads[0]][name]
  row = {"client_id": cid, "variant": name, "size_bytes": os.path.getsize(path),
         "latency_ms_median": t1["median"], "latency_ms_p10": t1["p10"],
         "latency_ms_p90": t1["p90"], "latency_threads": args.threads[0],
         "latency_runtime": latency_runtime(),
         "peak_memory_bytes": mem.get(name, {}).get("peak_memory_bytes"),
         "xnnpack_applied": mem.get(name, {}).get("xnnpack_applied"),
         **quality, "energy_mj_estimate": e["energy_mj_estimate"],
         "energy_breakdown_estimate": e, "macs": e["macs_fp32"] + e["macs_int8"], "file": path}
  if len(args.threads) > 1:
    row["latency_ms_median_2threads"] = lat[args.threads[1]][name]["median"]
    row["latency_2threads_p10_p90"] = [lat[args.threads[1]][name]["p10"],
                                       lat[args.threads[1]][name]["p90"]]
  return row


def _add_ratios_vs_dense(rows) -> None:
  """Adds each row's description and its dense ÷ variant ratios (size, latency, energy)."""
  dense = next(r for r in rows if r["variant"] == "dense_float32")
  for r in rows:
    r["what"] = DESCRIPTIONS.get(r["variant"], "")
    r["size_ratio_vs_dense"] = dense["size_bytes"] / r["size_bytes"]
    if r.get("latency_ms_median"):
      r["speedup_vs_dense"] = dense["latency_ms_median"] / r["latency_ms_median"]
    if r.get("latency_ms_median_2threads"):
      r["speedup_vs_dense_2threads"] = (dense["latency_ms_median_2threads"]
                                        / r["latency_ms_median_2threads"])
    if r.get("energy_mj_estimate"):
      r["energy_ratio_vs_dense_estimate"] = dense["energy_mj_estimate"] / r["energy_mj_estimate"]


def _add_notes(rows, baselines, facts) -> None:
  """Marks the default variant, flags untrained baselines, adds the BNN's packed storage size
  and the compaction facts of the export manifest (``facts``)."""
  default = _choose_default(rows)
  for r in rows:
    r["default"] = r["variant"] == default
    if r["variant"] == "dense_float32" and not baselines["facts"].get("dense_trained"):
      r["what"] += "; UNTRAINED weights: its accuracy is chance level (pass --dense_weights)"
    if r["variant"] == "bnn":
      r["packed_storage_bytes"] = os.path.getsize(baselines["files"]["bnn_packed_storage"])
      if not baselines["facts"].get("bnn_trained"):
        r["what"] += "; UNTRAINED weights: chance-level accuracy (pass --bnn_weights)"
  next(r for r in rows if r["variant"] == "compacted_float32")["compaction"] = facts["compaction"]
  if "structured_demo" in facts:
    next(r for r in rows if r["variant"] == "structured_demo_float32")["compaction"] = \
        facts["structured_demo"]["compaction"]


def evaluate_client(info, cid, args, baselines) -> list[dict]:
  """Exports client ``cid``'s variants and measures them and the baselines on its test data.

  Returns one report row (a dict with the ``FIELDS`` and more) per variant: ``packed_transport``
  first, then every ``.tflite`` variant of the client, then the baselines (``dense_float32``,
  ``bnn``). Sizes in bytes, latencies in ms, energy estimates in mJ.
  """
  out_dir = os.path.join(export.export_dir(args.run_dir), cid)
  masks = load_client_masks(info, cid)  # the state first: a missing/corrupt one fails fast
  x, y = dataset_to_numpy(load_client_test_data(args.run_dir, cid), args.max_test_examples)
  calib, _ = dataset_to_numpy(load_client_calibration_data(args.run_dir, cid),
                              args.calibration_examples)
  manifest = export.export_client(info, cid, out_dir, calibration=calib,
                                  structured_fraction=args.structured_fraction, masks=masks)
  files = dict(manifest["files"])
  ref, demo_ref = _keras_references(info, files, out_dir, x, y)
  tfl = _tflite_files(files, baselines)
  quality = _quality(tfl, cid, x, y, ref, demo_ref)
  lat = _latencies(tfl, cid, args, x)
  mem = _peak_memories(tfl, cid, args)
  rows = [_transport_row(cid, files, ref, y)]
  for name, path in tfl.items():
    rows.append(_tflite_row(cid, name, path, args, quality[name], lat, mem))
  _add_ratios_vs_dense(rows)
  _add_notes(rows, baselines, manifest["facts"])
  return rows


def _fmt(v, kind):
  if v is None:
    return "–"
  if kind == "bytes":
    return f"{v / 1024:.1f} KiB"
  if kind == "ms":
    return f"{v:.3f}"
  if kind == "pct":
    return f"{100 * v:.2f} %"
  if kind == "x":
    return f"{v:.2f}×"
  if kind == "mj":
    return f"{v * 1000:.1f} µJ"
  return str(v)


def markdown(rows) -> str:
  head = ("| client | variant | size | size vs dense | latency ms (1 thr, median [p10–p90]) | "
          "speedup vs dense (1 thr) | latency ms (2 thr) | speedup (2 thr) | peak memory | "
          "accuracy | same class as Keras | energy (estimate) | energy vs dense (estimate) |")
  lines = [head, "|" + "---|" * 13]
  for r in rows:
    lat = (f"{r['latency_ms_median']:.3f} [{r['latency_ms_p10']:.3f}–{r['latency_ms_p90']:.3f}]"
           if r.get("latency_ms_median") is not None else "–")
    name = r["variant"] + (" **(default)**" if r.get("default") else "")
    lines.append("| " + " | ".join([
        r["client_id"], name, _fmt(r["size_bytes"], "bytes"), _fmt(r.get("size_ratio_vs_dense"), "x"),
        lat, _fmt(r.get("speedup_vs_dense"), "x"), _fmt(r.get("latency_ms_median_2threads"), "ms"),
        _fmt(r.get("speedup_vs_dense_2threads"), "x"), _fmt(r.get("peak_memory_bytes"), "bytes"),
        _fmt(r.get("accuracy"), "pct"), _fmt(r.get("same_class_as_keras"), "pct"),
        _fmt(r.get("energy_mj_estimate"), "mj"),
        _fmt(r.get("energy_ratio_vs_dense_estimate"), "x")]) + " |")
  notes = ["", "Energy: **estimate** from counted MACs and memory traffic (" + energy.SOURCE + "); "
           "no power monitor was used.", "",
           "Ratios are dense ÷ variant (higher is better). Latency: batch 1, XNNPACK on, all "
           f"models interleaved in one process, measured with {latency_runtime()}; "
           "`python -m tflite.check_runtime` runs the same files with LiteRT (the runtime Android "
           "apps ship) and measures its latency. Variants:"]
  seen = set()
  for r in rows:
    if r["variant"] not in seen:
      seen.add(r["variant"])
      notes.append(f"- `{r['variant']}`: {r['what']}")
  return "\n".join(lines + notes) + "\n"


def write_reports(out_dir, rows) -> None:
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "report.json"), "w") as f:
    json.dump(rows, f, indent=1)
  with open(os.path.join(out_dir, "report.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
      w.writerow(r)
  with open(os.path.join(out_dir, "report.md"), "w") as f:
    f.write(markdown(rows))


def check_args(args) -> str:
  """What is wrong with the command line's values (``""`` if nothing); sets ``args.threads``
  to the list of thread counts."""
  try:
    args.threads = [int(t) for t in str(args.threads).split(",") if t.strip()]
  except ValueError:
    return f"--threads must be thread counts separated by commas, got {args.threads!r}"
  problems = [
      (not args.threads or min(args.threads) < 1, f"--threads must be counts >= 1, got {args.threads}"),
      (args.runs < 1, f"--runs must be >= 1 (timed invocations per model), got {args.runs}"),
      (args.warmup < 0, f"--warmup must be >= 0, got {args.warmup}"),
      (args.max_test_examples is not None and args.max_test_examples < 1,
       f"--max_test_examples must be >= 1, got {args.max_test_examples}"),
      (args.calibration_examples < 1,
       f"--calibration_examples must be >= 1, got {args.calibration_examples}"),
      (not 0 <= args.structured_fraction < 1,
       f"--structured_fraction must be in [0, 1) (the share of each hidden layer's filters or "
       f"neurons the demo zeroes; 0: no demo), got {args.structured_fraction}")]
  return next((why for bad, why in problems if bad), "")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m tflite.evaluate", description=__doc__.split("\n")[0])
  p.add_argument("--verbose", action="store_true",
                 help="show TensorFlow's C++ log lines (silenced by default)")
  p.add_argument("--run_dir", required=True)
  p.add_argument("--client_id", default=None, help="a client id or 'all' (default: the first stored)")
  p.add_argument("--threads", default="1,2", help="thread counts; the first is the report's main one")
  p.add_argument("--runs", type=int, default=300, help="timed invocations per model and thread count")
  p.add_argument("--warmup", type=int, default=30)
  p.add_argument("--max_test_examples", type=int, default=None)
  p.add_argument("--calibration_examples", type=int, default=200)
  p.add_argument("--structured_fraction", type=float, default=0.5)
  p.add_argument("--dense_weights", default=None, help="Keras weights of a trained dense model")
  p.add_argument("--bnn_weights", default=None, help="Keras weights of a trained BNN model")
  p.add_argument("--skip_memory", action="store_true")
  args = p.parse_args(argv)
  problem = check_args(args)
  if problem:
    print(f"error: {problem}", file=sys.stderr)
    return 2
  t0 = time.time()
  try:
    info = load_run(args.run_dir)
    clients = export.resolve_clients(info, args.client_id)
    out = export.export_dir(args.run_dir)
    baselines = export.export_baselines(info, os.path.join(out, "baselines"),
                                        args.dense_weights, args.bnn_weights)
    rows = []
    for i, cid in enumerate(clients):
      _log(f"[tflite] client {i + 1}/{len(clients)}: {cid}")
      rows += evaluate_client(info, cid, args, baselines)
      write_reports(out, rows)
  except ArtifactError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(markdown(rows))
  print(f"wrote {os.path.join(out, 'report.json')}, report.csv, report.md "
        f"({time.time() - t0:.0f} s)")
  return 0


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  sys.exit(main())
