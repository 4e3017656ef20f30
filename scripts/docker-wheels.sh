#!/usr/bin/env bash
# Fill nodes/wheels/ with wheels of every dependency of zmesh (from pyproject.toml),
# built on this host, so that nodes/Dockerfile installs without network access
# (build containers here cannot reach PyPI). llama-cpp-python comes from pip's wheel
# cache when setup.sh already compiled it. Skipped when nothing changed (FORCE=1 redoes).
#
#   scripts/docker-wheels.sh          (PYTHON=... picks the interpreter; default .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=nodes/wheels

reqs=$("$PY" -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))')
build_reqs=$("$PY" -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"]))')
# The wheels must suit the image's Python: record which one built them.
stamp=$(printf '%s\n%s\n%s\n' "$reqs" "$build_reqs" "$("$PY" -c 'import sys; print(sys.version_info[:2])')")
if [ "${FORCE:-0}" != 1 ] && [ -f "$OUT/COMPLETE" ] && [ "$(cat "$OUT/COMPLETE")" = "$stamp" ]; then
  echo "docker-wheels: $OUT is up to date"
  exit 0
fi
find "$OUT" -maxdepth 1 \( -name '*.whl' -o -name COMPLETE \) -delete
echo "docker-wheels: building wheels into $OUT"
# shellcheck disable=SC2086  # one requirement per word
"$PY" -m pip wheel --quiet --wheel-dir "$OUT" $reqs $build_reqs
printf '%s\n' "$stamp" >"$OUT/COMPLETE"
du -sh "$OUT" | sed 's/^/docker-wheels: /'
