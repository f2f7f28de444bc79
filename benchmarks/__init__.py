"""Benchmarks: ratios measured side by side in one run (``python -m benchmarks.run``)."""

import os as _os
import sys as _sys

# TensorFlow's C++ log lines (CUDA probing at import, grappler's "Starting new session" each
# trace) would interleave with the progress bars; they are silenced unless the command line has
# --verbose or the user set TF_CPP_MIN_LOG_LEVEL. Set here, before anything imports TensorFlow.
if "--verbose" not in _sys.argv[1:]:
  _os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
