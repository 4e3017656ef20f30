#!/usr/bin/env bash
# Build the node image where no container registry and no PyPI is reachable from a
# build container (this project's machines):
#   1. a local Debian bookworm + Python 3.11 base image (scripts/docker-base-image.sh),
#   2. a host-built wheelhouse in nodes/wheels/ (scripts/docker-wheels.sh),
#   3. docker build -f nodes/Dockerfile --build-arg BASE_IMAGE=<that base>.
# Each step reuses what is there (an image by tag, the wheelhouse by its stamp, and
# Docker's layer cache), so a repeat run takes seconds.
#
#   scripts/docker-build.sh [TAG]        (default zmesh-node:cpu, compose.yaml's image)
#
# BASE_IMAGE=python:3.11-slim (or any image) skips step 1.
set -euo pipefail
cd "$(dirname "$0")/.."
TAG=${1:-zmesh-node:cpu}
BASE=${BASE_IMAGE:-zmesh-base:bookworm}

if [ -z "${BASE_IMAGE:-}" ]; then
  ./scripts/docker-base-image.sh "$BASE"
fi
./scripts/docker-wheels.sh
echo "docker-build: building $TAG on $BASE"
t0=$(date +%s)
# DOCKER_BUILDKIT is left to the caller: the Dockerfile works with either builder.
docker build -f nodes/Dockerfile --build-arg BASE_IMAGE="$BASE" -t "$TAG" .
echo "docker-build: $TAG built in $(($(date +%s) - t0))s"
