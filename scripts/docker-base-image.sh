#!/usr/bin/env bash
# Build a local Debian bookworm + Python 3.11 base image without a container registry:
# debootstrap a minimal rootfs from Debian's own packages, then `docker import` it.
# The node image takes it as BASE_IMAGE when python:3.11-slim cannot be pulled.
#
#   scripts/docker-base-image.sh [TAG]      (default: zmesh-base:bookworm)
#
# An existing TAG is reused (FORCE=1 rebuilds). Needs root for debootstrap; installs
# debootstrap with apt-get when it is missing. DEBIAN_MIRROR picks the mirror.
set -euo pipefail
TAG=${1:-zmesh-base:bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm  # Debian 12: its python3 is 3.11, what zmesh needs

if [ "${FORCE:-0}" != 1 ] && docker image inspect "$TAG" >/dev/null 2>&1; then
  echo "docker-base-image: $TAG exists (FORCE=1 rebuilds)"
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "docker-base-image: debootstrap needs root; run as root or build $TAG elsewhere" >&2
  exit 1
fi
if ! command -v debootstrap >/dev/null 2>&1; then
  echo "docker-base-image: installing debootstrap"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
fi

work=$(mktemp -d "${TMPDIR:-/var/tmp}/zmesh-rootfs.XXXXXX")
cleanup() {
  # debootstrap mounts proc/sys inside the target; never rm -rf through a live mount.
  for m in proc sys dev/pts; do umount "$work/rootfs/$m" 2>/dev/null || true; done
  rm -rf --one-file-system "$work"
}
trap cleanup EXIT

echo "docker-base-image: debootstrap $SUITE from $MIRROR (a few minutes)"
# minbase + python3 (3.11) + venv (ensurepip, so the image can make a venv offline).
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
  "$SUITE" "$work/rootfs" "$MIRROR" >"$work/debootstrap.log" 2>&1 || {
  tail -n 30 "$work/debootstrap.log" >&2
  echo "docker-base-image: debootstrap failed" >&2
  exit 1
}
root="$work/rootfs"
# What the official slim images leave out too: package lists, downloaded .debs, docs.
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/archives/*.deb \
  "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/*
echo "deb $MIRROR $SUITE main" >"$root/etc/apt/sources.list"

echo "docker-base-image: importing as $TAG"
tar -C "$root" --numeric-owner -c . | docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["/bin/bash"]' \
  - "$TAG" >/dev/null
docker run --rm "$TAG" python3 -c 'import sys, venv; print("docker-base-image: python", sys.version.split()[0])'
