"""Runtime measurements of ``.tflite`` files: side-by-side latency, peak memory, accuracy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np

from tflite import convert
from tflite.runs import ArtifactError


def latency_side_by_side(paths: dict, threads: int = 1, warmup: int = 20, runs: int = 200,
                         blocks: int = 10, x=None, log=None) -> dict:
  """Batch-1 latency of every model in ``paths``, measured interleaved in one process.

  All interpreters are loaded at once (XNNPACK on: TFLite's default delegate for
  float models in TF 2.14); each gets ``warmup`` invocations; then ``blocks``
  rounds, each timing ``runs / blocks`` single invocations of every model in
  turn (the order rotates each round), so background load hits all alike.
  Returns per name the median, 10th/90th percentile and mean in milliseconds.
  """
  names = list(paths)
  interps = {n: convert.make_interpreter(paths[n], num_threads=threads) for n in names}
  feeds = {}
  for n, it in interps.items():
    inp = it.get_input_details()[0]
    it.resize_tensor_input(inp["index"], [1] + list(inp["shape"][1:]))
    it.allocate_tensors()
    sample = (np.random.default_rng(0).random(inp["shape"][1:], dtype=np.float32)
              if x is None else np.asarray(x, np.float32).reshape(inp["shape"][1:]))
    feeds[n] = (inp["index"], sample[None])
    it.set_tensor(*feeds[n])
    for _ in range(warmup):
      it.invoke()
  times = {n: [] for n in names}
  per_block = max(1, runs // blocks)
  for b in range(blocks):
    order = names[b % len(names):] + names[:b % len(names)]
    for n in order:
      it = interps[n]
      it.set_tensor(*feeds[n])
      for _ in range(per_block):
        t0 = time.perf_counter_ns()
        it.invoke()
        times[n].append(time.perf_counter_ns() - t0)
    if log:
      log(f"[tflite] latency, {threads} thread(s): block {b + 1}/{blocks}")
  out = {}
  for n, t in times.items():
    ms = np.asarray(t) / 1e6
    out[n] = {"median": float(np.median(ms)), "p10": float(np.percentile(ms, 10)),
              "p90": float(np.percentile(ms, 90)), "mean": float(ms.mean()), "runs": int(ms.size)}
  return out


def peak_memory(path: str, threads: int = 1, timeout: float = 300) -> dict:
  """Runs :mod:`tflite.memprobe` in a fresh process; see its docstring for the method."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
  proc = subprocess.run([sys.executable, "-m", "tflite.memprobe", path, str(threads)],
                        capture_output=True, text=True, timeout=timeout, env=env, cwd=root)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
  if proc.returncode != 0 or not lines:
    raise ArtifactError(f"memory probe of {path} failed: {proc.stderr.strip()[-500:]}")
  result = json.loads(lines[-1])
  result["xnnpack_applied"] = "DELEGATE" in result.pop("ops_after_delegation", [])
  return result


def accuracy_and_parity(path: str, x: np.ndarray, y: np.ndarray, reference: np.ndarray) -> dict:
  """Accuracy on ``(x, y)`` and agreement with the Keras model's outputs ``reference``."""
  out = convert.predict(path, x)
  pred, ref_pred = out.argmax(-1), reference.argmax(-1)
  return {"accuracy": float((pred == y).mean()), "same_class_as_keras": float((pred == ref_pred).mean()),
          "max_abs_diff_vs_keras": float(np.abs(out - reference).max()), "examples": int(len(y))}
