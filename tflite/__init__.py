"""TFLite export and on-device runtime evaluation of personalized FedMask models.

Uses the library (``fedmask_tff``), never the reverse. The exporters and the
runtime evaluator are tracked in the project's TFLite issue; this package is
their home.
"""
