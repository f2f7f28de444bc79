"""Peak memory of one TFLite interpreter, measured in a fresh process (used by the evaluator).

``python -m tflite.memprobe MODEL.tflite THREADS`` prints one JSON line.

Method: after importing the runtime and making the input, read the current
resident set (``VmRSS``) and reset the kernel's high-water mark by writing
``5`` to ``/proc/self/clear_refs``; then create the interpreter (XNNPACK on),
allocate tensors and invoke 20 times; the peak is ``VmHWM - VmRSS_before``:
the native memory (model mapping, arena, delegate packing, threads) the
interpreter added at its highest. Python's ``tracemalloc`` would miss all of
it (native allocations). Where ``clear_refs`` cannot be written the fallback
is the growth of ``ru_maxrss`` (a lower bound), and the method says so.
"""

from __future__ import annotations

import json
import os
import resource
import sys


def _status_kb(key: str) -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(key + ":"):
        return int(line.split()[1])
  raise KeyError(key)


def main(argv) -> int:
  path, threads = argv[0], int(argv[1])
  import numpy as np
  from tensorflow.lite.python.interpreter import Interpreter
  probe = Interpreter(model_path=path)  # read input shape, then drop it
  inp = probe.get_input_details()[0]
  x = np.random.default_rng(0).random(inp["shape"], dtype=np.float32)
  del probe
  before = _status_kb("VmRSS")
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    method = "VmHWM after reset via /proc/self/clear_refs minus VmRSS before"
    before_max = None
  except OSError:
    method = "ru_maxrss growth (lower bound: clear_refs not writable)"
    before_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  interp = Interpreter(model_path=path, num_threads=threads)
  interp.allocate_tensors()
  interp.set_tensor(interp.get_input_details()[0]["index"], x)
  for _ in range(20):
    interp.invoke()
  ops = [o["op_name"] for o in interp._get_ops_details()]  # pylint: disable=protected-access
  if before_max is None:
    peak_kb = _status_kb("VmHWM") - before
  else:
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before_max
  print(json.dumps({"peak_memory_bytes": max(0, peak_kb) * 1024, "method": method,
                    "ops_after_delegation": ops}))
  return 0


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  sys.exit(main(sys.argv[1:]))
