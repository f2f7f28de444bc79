#!/usr/bin/env bash
# Installs fedmask_tff and its pinned stack into ./.venv (Python 3.11). Safe to rerun:
# a second run with unchanged requirements only checks the stamp and returns.
#   PYTHON=/path/to/python3.11 bash scripts/install.sh   to choose the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/find_python.sh

if [ ! -x .venv/bin/python ]; then
  PY=$(find_python 3.11) || { echo "error: fedmask_tff needs Python 3.11 (set PYTHON=/path/to/python3.11)" >&2; exit 1; }
  echo "[install] creating .venv with $PY" >&2
  "$PY" -m venv .venv
fi

stamp=.venv/.fedmask-install-stamp
want=$(cat requirements.txt requirements-tff.txt pyproject.toml | sha256sum | cut -d' ' -f1)
export PIP_DISABLE_PIP_VERSION_CHECK=1
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && .venv/bin/python -c 'import fedmask_tff, tensorflow_federated' 2>/dev/null; then
  echo "[install] .venv is up to date" >&2
else
  echo "[install] installing the pinned stack (about a minute on a fresh machine) ..." >&2
  .venv/bin/python -m pip install -q -r requirements.txt
  # TFF 0.87.0 pins jaxlib==0.4.14, which the registry no longer serves: install it without its
  # dependencies; requirements.txt has pinned all of them, with jax/jaxlib 0.4.13.
  .venv/bin/python -m pip install -q --no-deps -r requirements-tff.txt
  .venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .
  .venv/bin/python -c 'import fedmask_tff, tensorflow_federated as tff; print("[install] ok: tensorflow_federated", tff.__version__)' >&2 2>/dev/null
  echo "$want" > "$stamp"
fi

# jemalloc for TFF's worker process (fedmask_tff.runtime: its memory stays flat over rounds;
# without it the worker falls back to glibc with fewer arenas). Optional: tried only as root.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! dpkg -s libjemalloc2 >/dev/null 2>&1; then
  echo "[install] installing libjemalloc2 (the TFF worker's allocator) ..." >&2
  (apt-get install -y -qq libjemalloc2 >/dev/null 2>&1 ||
   { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq libjemalloc2 >/dev/null 2>&1; }) ||
    echo "[install] libjemalloc2 not installed; the TFF worker uses glibc's malloc" >&2
fi

# The phone's runtime (LiteRT) in an environment of its own, without TensorFlow, for
# `python -m tflite.check_runtime` (docs/tflite.md).
litert_stamp=.venv-litert/.fedmask-install-stamp
litert_want=$(sha256sum requirements-litert.txt | cut -d' ' -f1)
if [ ! -f "$litert_stamp" ] || [ "$(cat "$litert_stamp")" != "$litert_want" ]; then
  PY=$(find_python 3.11) || { echo "error: the LiteRT environment needs Python 3.11" >&2; exit 1; }
  echo "[install] creating .venv-litert (LiteRT, no TensorFlow) ..." >&2
  rm -rf .venv-litert
  "$PY" -m venv .venv-litert
  .venv-litert/bin/python -m pip install -q -r requirements-litert.txt
  .venv-litert/bin/python -c 'import ai_edge_litert.interpreter' >&2
  echo "$litert_want" > "$litert_stamp"
fi
