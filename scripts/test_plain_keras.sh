#!/usr/bin/env bash
# The plain-Keras tests (tests/plain_keras/) under the newest TensorFlow with Keras 3 on a newer
# Python, in ./.venv-plain-keras: `pip install .` of this checkout (no TFF), then pytest on the
# installed package. CI runs it after scripts/test.sh.
#   PYTHON=/path/to/python3.12 bash scripts/test_plain_keras.sh   to choose the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/find_python.sh

root=$(pwd)
venv=.venv-plain-keras
export PIP_DISABLE_PIP_VERSION_CHECK=1
# The environment is made again when its requirements change; the package is reinstalled
# (a copy, as users get it) whenever the library's sources change.
env_want=$(sha256sum requirements-plain-keras.txt | cut -d' ' -f1)
pkg_want=$(cat pyproject.toml $(find fedmask_tff -name '*.py' | sort) | sha256sum | cut -d' ' -f1)
if [ ! -f "$venv/.env-stamp" ] || [ "$(cat "$venv/.env-stamp")" != "$env_want" ]; then
  PY=$(find_python 3.12 3.13) || { echo "error: the plain-Keras tests need Python 3.12 or 3.13 (set PYTHON=/path/to/python3.12)" >&2; exit 1; }
  echo "[plain-keras] creating $venv with $PY and the newest TensorFlow (Keras 3) ..." >&2
  rm -rf "$venv"
  "$PY" -m venv "$venv"
  "$venv/bin/python" -m pip install -q -r requirements-plain-keras.txt 2>&1 | grep -v "^WARNING: Location" >&2 || true
  "$venv/bin/python" -c 'import tensorflow, pytest' 2>/dev/null || { echo "error: installing requirements-plain-keras.txt failed" >&2; exit 1; }
  echo "$env_want" > "$venv/.env-stamp"
fi
if [ ! -f "$venv/.pkg-stamp" ] || [ "$(cat "$venv/.pkg-stamp")" != "$pkg_want" ]; then
  # First time: `pip install .` as a user types it (its requirements resolved); after a change
  # of the sources: the new copy only.
  if "$venv/bin/python" -m pip show -q fedmask_tff >/dev/null 2>&1; then
    again=(--force-reinstall --no-deps)
  else
    again=()
  fi
  echo "[plain-keras] pip install ${again[*]} . (no TFF) ..." >&2
  "$venv/bin/python" -m pip install -q "${again[@]}" . 2>&1 | grep -v "^WARNING: Location" >&2 || true
  "$venv/bin/python" -m pip show -q fedmask_tff >/dev/null 2>&1 || { echo "error: pip install . failed" >&2; exit 1; }
  echo "$pkg_want" > "$venv/.pkg-stamp"
fi
# From outside the checkout, so that the installed package (not ./fedmask_tff) is imported.
(cd /tmp && TF_CPP_MIN_LOG_LEVEL=3 "$root/$venv/bin/python" - <<'PY'
import sys, fedmask_tff, tensorflow as tf, keras
assert "site-packages" in fedmask_tff.__file__, fedmask_tff.__file__
assert "tensorflow_federated" not in sys.modules
print(f"[plain-keras] Python {sys.version.split()[0]}, TensorFlow {tf.__version__}, Keras "
      f"{keras.__version__}, fedmask_tff from {fedmask_tff.__file__}", file=sys.stderr)
PY
)
# The pytest script (not `python -m pytest`) keeps the checkout off sys.path.
exec "$venv/bin/pytest" -q tests/plain_keras -p no:cacheprovider "$@"
