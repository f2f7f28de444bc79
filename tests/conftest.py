"""Shared test set-up: quiet TF logs and one TFF context whose worker dies with pytest."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tff_context():
  """Installs fedmask_tff's local TFF context (worker tied to this process) once."""
  from fedmask_tff import runtime
  runtime.install_local_context()
  yield
  runtime.stop_workers()

