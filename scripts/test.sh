#!/usr/bin/env bash
# The README's test command: install, then run the test suite (no data set needed).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/python -m pytest -q tests "$@"
