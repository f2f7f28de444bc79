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


# Files that take minutes run first. scripts/test.sh runs the suite on two processes with
# `--dist loadfile`, each taking the next file in collection order: the longest started last
# would leave one process working alone at the end (longest first is the classic fix).
SLOW_FILES_FIRST = ("e2e/test_documented_commands.py", "e2e/test_compare.py", "e2e/test_workers.py",
                    "e2e/test_resume.py", "e2e/test_cli.py", "e2e/test_failures.py")


def pytest_collection_modifyitems(config, items):
  def rank(item):
    path = item.nodeid.split("::")[0]
    return next((i for i, name in enumerate(SLOW_FILES_FIRST) if path.endswith(name)),
                len(SLOW_FILES_FIRST))
  items.sort(key=rank)  # stable: the other files keep their order
