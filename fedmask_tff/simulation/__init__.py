"""The simulation harness: ``runner`` (the run's settings, validated once, and the round loop),
``checkpoint`` (server state between rounds), ``outputs`` (results.json, metrics.csv,
TensorBoard). It knows algorithms only through ``fedmask_tff.algorithms.base``.
"""
