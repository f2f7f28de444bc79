"""TFLite export and on-device runtime evaluation of personalized FedMask models.

Uses the library (``fedmask_tff``), never the reverse. Entry points:

* ``python -m tflite.export --run_dir=DIR [--client_id=ID|all]``: writes every variant
  (:mod:`tflite.export`);
* ``python -m tflite.evaluate --run_dir=DIR``: exports, measures (size, latency, peak
  memory, accuracy, energy *estimate*) and writes ``DIR/tflite/report.{json,csv,md}``;
* :func:`tflite.packed.load_model`: the exact Keras model from a packed ``.fmpk`` file.

See ``docs/tflite.md``.
"""

import os as _os
import sys as _sys

# TensorFlow's C++ log lines (CUDA probing at import, grappler's "Starting new session" each
# trace) would interleave with the progress bars; they are silenced unless the command line has
# --verbose or the user set TF_CPP_MIN_LOG_LEVEL. Set here, before anything imports TensorFlow.
if "--verbose" not in _sys.argv[1:]:
  _os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
