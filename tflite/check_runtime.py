"""Runs every exported ``.tflite`` with LiteRT, the runtime Android apps ship, without TensorFlow.

``.venv-litert/bin/python -m tflite.check_runtime --run_dir=DIR`` (after ``python -m
tflite.evaluate --run_dir=DIR``) loads, for each client in ``DIR/tflite/``, every model named in
its ``model_info.json`` through the ``serving_default`` signature (input ``image``, output
``logits``), runs it on the client's test examples saved by ``tflite.evaluate``
(``reference.npz``: inputs, labels, the Keras model's logits) and compares:

* float32 variants: the predicted class must equal Keras' on every example, and no logit may
  differ from Keras' by more than float tolerance (``FLOAT_TOLERANCE`` times the largest
  Keras logit's magnitude, at least 1); the largest difference is reported;
* int8: the share of examples with Keras' class is reported (quantization may change some);
* the baselines (untrained dense and BNN models) are only loaded and run: no Keras reference.

It also measures each model's latency on LiteRT (batch 1, one thread, median of ``--runs``).
Every file is checked against the SHA-256 and variant ``tflite.evaluate`` recorded beside it
(:mod:`tflite.artifacts`) before it is used. Writes ``DIR/tflite/runtime_check.json`` and
``.md``; exits 1 when a float32 variant disagrees with Keras, 2 on a missing, unreadable,
corrupt or swapped file (naming it). Imports numpy and ``ai_edge_litert`` only: this
module must never import TensorFlow (the test runs it in an environment without it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from tflite import artifacts

FLOAT_VARIANTS = ("folded_float32", "packed_runtime", "compacted_float32", "compacted_sparse_float32",
                  "structured_demo_float32")
BASELINES = ("dense_float32", "bnn")
FLOAT_TOLERANCE = 1e-3  # of the largest |logit|: float32 variants differ from Keras by ~1e-6


class CheckError(RuntimeError):
  """A missing or unreadable export; the message names the file."""


def _litert():
  try:
    from ai_edge_litert import interpreter
  except ImportError as e:
    raise CheckError("ai-edge-litert is not installed here: run this with .venv-litert/bin/python "
                     "(made by scripts/install.sh) or `pip install ai-edge-litert`") from e
  import importlib.metadata
  return interpreter, importlib.metadata.version("ai-edge-litert")


def _verified(path: str, variant: str) -> str:
  """``path``, after checking it against its checksum sidecar (:mod:`tflite.artifacts`)."""
  try:
    artifacts.verify(path, variant)
  except artifacts.ArtifactMismatch as e:
    raise CheckError(str(e)) from None
  return path


def _read_json(path: str) -> dict:
  if not os.path.isfile(path):
    raise CheckError(f"{path} is missing (run `python -m tflite.evaluate --run_dir=...` first)")
  _verified(path, "model_info")
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise CheckError(f"{path} is unreadable: {e}") from e


def load_runner(interpreter_module, path: str, info: dict):
  """LiteRT's runner of the model's named signature (one thread), as an app uses it."""
  try:
    interp = interpreter_module.Interpreter(model_path=path, num_threads=1)
    return interp.get_signature_runner(info["signature"])
  except (ValueError, RuntimeError) as e:
    raise CheckError(f"{path} cannot be loaded by LiteRT or lacks signature "
                     f"{info['signature']!r}: {e}") from e


def run_model(runner, info: dict, x: np.ndarray) -> np.ndarray:
  """Logits for ``x`` (float32 ``[n, ...]``), one example per call."""
  outputs = [runner(**{info["input"]["name"]: x[i:i + 1].astype(np.float32)})[info["output"]["name"]]
             for i in range(x.shape[0])]
  return np.concatenate(outputs)


def latency_ms(runner, info: dict, example: np.ndarray, runs: int, warmup: int) -> float:
  """Median wall time of one invocation (batch 1, one thread), milliseconds."""
  feed = {info["input"]["name"]: example[None].astype(np.float32)}
  for _ in range(warmup):
    runner(**feed)
  times = []
  for _ in range(runs):
    t0 = time.perf_counter()
    runner(**feed)
    times.append((time.perf_counter() - t0) * 1e3)
  return float(np.median(times))


def check_client(interpreter_module, client_dir: str, baselines_dir: str, runs: int,
                 warmup: int) -> list[dict]:
  info = _read_json(os.path.join(client_dir, "model_info.json"))
  ref_path = os.path.join(client_dir, "reference.npz")
  if not os.path.isfile(ref_path):
    raise CheckError(f"{ref_path} is missing (run `python -m tflite.evaluate --run_dir=...` first)")
  _verified(ref_path, "reference")
  try:
    with np.load(ref_path, allow_pickle=False) as ref:
      x, y, keras = ref["x"], ref["y"], ref["keras_logits"]
      demo = ref["keras_logits_structured_demo"] if "keras_logits_structured_demo" in ref else None
  except Exception as e:  # zipfile.BadZipFile, KeyError, ValueError, OSError ...
    raise CheckError(f"{ref_path} is unreadable ({type(e).__name__}: {e}); run `python -m "
                     "tflite.evaluate --run_dir=...` again") from None
  models = {k: os.path.join(client_dir, v) for k, v in info["models"].items()}
  base_info = _read_json(os.path.join(baselines_dir, "model_info.json"))
  models.update({k: os.path.join(baselines_dir, v) for k, v in base_info["models"].items()})
  rows = []
  for variant, path in models.items():
    runner = load_runner(interpreter_module, _verified(path, variant), info)
    logits = run_model(runner, info, x)
    row = {"client_id": os.path.basename(client_dir), "variant": variant, "file": path,
           "examples": int(x.shape[0]), "accuracy": float((logits.argmax(-1) == y).mean()),
           "latency_ms_median": latency_ms(runner, info, x[0], runs, warmup)}
    reference = demo if variant == "structured_demo_float32" else keras
    if variant not in BASELINES and reference is not None:
      row["same_class_as_keras"] = float((logits.argmax(-1) == reference.argmax(-1)).mean())
      row["max_abs_diff_vs_keras"] = float(np.abs(logits - reference).max())
      row["must_match"] = variant in FLOAT_VARIANTS
      row["tolerance"] = FLOAT_TOLERANCE * max(1.0, float(np.abs(reference).max()))
      row["ok"] = ((row["same_class_as_keras"] == 1.0
                    and row["max_abs_diff_vs_keras"] <= row["tolerance"])
                   if row["must_match"] else True)
    rows.append(row)
  return rows


def markdown(rows: list[dict], runtime: str) -> str:
  lines = [f"Runtime: {runtime} (no TensorFlow in this environment). Float32 variants must give "
           "Keras' class on every example, with logits within float tolerance "
           f"({FLOAT_TOLERANCE:g} of the largest); int8 agreement is reported. Latency: batch 1, one "
           "thread, median.", "",
           "| client | variant | examples | accuracy | same class as Keras | max abs logit diff "
           "| latency ms (LiteRT) | ok |", "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    same = f"{100 * r['same_class_as_keras']:.2f} %" if "same_class_as_keras" in r else "–"
    diff = f"{r['max_abs_diff_vs_keras']:.2e}" if "max_abs_diff_vs_keras" in r else "–"
    ok = {True: "yes", False: "**NO**"}.get(r.get("ok"), "– (no Keras reference)")
    lines.append(f"| {r['client_id']} | {r['variant']} | {r['examples']} | {100 * r['accuracy']:.2f} % "
                 f"| {same} | {diff} | {r['latency_ms_median']:.3f} | {ok} |")
  return "\n".join(lines) + "\n"


def check(run_dir: str, runs: int = 100, warmup: int = 10) -> tuple[list[dict], str]:
  """Checks every exported client of ``run_dir``; writes the reports; returns rows and runtime."""
  interpreter_module, version = _litert()
  root = os.path.join(run_dir, "tflite")
  if not os.path.isdir(root):
    raise CheckError(f"{root} is missing (run `python -m tflite.evaluate --run_dir={run_dir}` first)")
  clients = sorted(d for d in os.listdir(root)
                   if d != "baselines" and os.path.isfile(os.path.join(root, d, "model_info.json")))
  if not clients:
    raise CheckError(f"{root} holds no exported client (no */model_info.json)")
  rows = []
  for cid in clients:
    print(f"[check_runtime] {cid}: LiteRT {version}", file=sys.stderr, flush=True)
    rows += check_client(interpreter_module, os.path.join(root, cid), os.path.join(root, "baselines"),
                         runs, warmup)
  runtime = f"LiteRT (ai-edge-litert {version})"
  with open(os.path.join(root, "runtime_check.json"), "w") as f:
    json.dump({"runtime": runtime, "rows": rows}, f, indent=1)
  with open(os.path.join(root, "runtime_check.md"), "w") as f:
    f.write(markdown(rows, runtime))
  return rows, runtime


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m tflite.check_runtime", description=__doc__.split("\n")[0])
  p.add_argument("--run_dir", required=True, help="a run whose models tflite.evaluate exported")
  p.add_argument("--runs", type=int, default=100, help="timed invocations per model")
  p.add_argument("--warmup", type=int, default=10, help="untimed invocations first")
  args = p.parse_args(argv)
  if args.runs < 1 or args.warmup < 0:
    print("error: --runs must be >= 1 and --warmup >= 0", file=sys.stderr)
    return 2
  try:
    rows, runtime = check(args.run_dir, args.runs, args.warmup)
  except CheckError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(markdown(rows, runtime))
  bad = [f"{r['client_id']}/{r['variant']}" for r in rows if r.get("ok") is False]
  if bad:
    print(f"error: LiteRT's predictions differ from Keras' for {', '.join(bad)}", file=sys.stderr)
    return 1
  print(f"wrote {os.path.join(args.run_dir, 'tflite', 'runtime_check.json')} and .md")
  return 0


if __name__ == "__main__":
  sys.exit(main())
