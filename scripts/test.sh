#!/usr/bin/env bash
# The README's test command: install, then run the test suite (no data set needed).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# Two processes (pytest-xdist), a test file to each at a time (module fixtures built once):
# 1,277 s on a 2-core machine (2026-12-08); `-n 0` runs the suite in this process.
exec .venv/bin/python -m pytest -q -n "${PYTEST_WORKERS:-2}" --dist loadfile tests "$@"
