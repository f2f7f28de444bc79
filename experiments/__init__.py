"""Runnable studies and the command-line entry point (``python -m experiments.run``)."""
