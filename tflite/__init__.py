"""TFLite export and on-device runtime evaluation of personalized FedMask models.

Uses the library (``fedmask_tff``), never the reverse. Entry points:

* ``python -m tflite.export --run_dir=DIR [--client_id=ID|all]``: writes every variant
  (:mod:`tflite.export`);
* ``python -m tflite.evaluate --run_dir=DIR``: exports, measures (size, latency, peak
  memory, accuracy, energy *estimate*) and writes ``DIR/tflite/report.{json,csv,md}``;
* :func:`tflite.packed.load_model`: the exact Keras model from a packed ``.fmpk`` file.

See ``docs/tflite.md``.
"""
