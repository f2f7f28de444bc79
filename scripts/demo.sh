#!/usr/bin/env bash
# The README's main command: install, make sure the embedded default data set is present,
# and run FedMask on Fashion-MNIST (pathological, 2 classes per client). Extra arguments are
# passed to `python -m experiments.run` (e.g. --rounds=5 --output_dir=runs/try).
# The demo never deletes finished work: an unfinished runs/demo (stopped by Ctrl-C, a crash or a
# full disk) resumes where it stopped; a finished one is kept and the run is refused, saying how
# to replace it (add --overwrite) or where else to run (--output_dir=DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh

FMNIST=/usr/share/datasets/fashion-mnist
have_data() { [ -f "$FMNIST/train-images-idx3-ubyte.gz" ] || [ -f "$HOME/.keras/datasets/fashion-mnist/train-images-idx3-ubyte.gz" ]; }
if ! have_data && [[ " $* " != *" --data_dir"* ]]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[demo] installing Debian's dataset-fashion-mnist ..." >&2
    (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 ||
     { apt-get update -qq >/dev/null && apt-get install -y -qq dataset-fashion-mnist >/dev/null; }) || true
  fi
  if ! have_data; then
    echo "error: Fashion-MNIST is missing. Install Debian's package as root:" >&2
    echo "         apt-get install dataset-fashion-mnist      (files go to $FMNIST)" >&2
    echo "       or pass --data_dir=DIR with the four *-ubyte.gz files of Fashion-MNIST." >&2
    exit 1
  fi
fi
exec .venv/bin/python -m experiments.run --output_dir=runs/demo --eval_every=25 "$@"
